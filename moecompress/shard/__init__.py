"""Placement across edge servers: pure functions from routing statistics and sizes to a Placement, for the expert
or the pipeline execution model (moecompress/execution/)."""
from moecompress.shard.affinity import place_affinity
from moecompress.shard.baselines import place_contiguous, place_greedy_balanced, place_round_robin
from moecompress.shard.compare import METHODS, compare_placements, place, traffic_row
from moecompress.shard.ilp import place_ilp
from moecompress.shard.layers import LayerSizes, place_all_servers, place_fewest_servers, place_pipeline
from moecompress.shard.replicate import replicate_hot
from moecompress.shard.routing import RoutingStats, RoutingTrace
from moecompress.shard.spec import ServerSpec, parse_bytes, parse_servers

__all__ = [
    "METHODS", "LayerSizes", "RoutingStats", "RoutingTrace", "ServerSpec",
    "compare_placements", "parse_bytes", "parse_servers", "place", "place_affinity", "place_all_servers",
    "place_contiguous", "place_fewest_servers", "place_greedy_balanced", "place_ilp", "place_pipeline",
    "place_round_robin", "replicate_hot", "traffic_row",
]
