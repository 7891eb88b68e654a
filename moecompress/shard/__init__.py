"""Expert placement across edge servers: pure functions from routing statistics to a Placement."""
from moecompress.shard.affinity import place_affinity
from moecompress.shard.baselines import place_contiguous, place_greedy_balanced, place_round_robin
from moecompress.shard.compare import compare_placements
from moecompress.shard.ilp import place_ilp
from moecompress.shard.replicate import replicate_hot
from moecompress.shard.routing import RoutingStats, RoutingTrace
from moecompress.shard.spec import ServerSpec, parse_bytes, parse_servers
from moecompress.shard.traffic import TrafficReport, estimate_traffic, expected_traffic

__all__ = [
    "RoutingStats", "RoutingTrace", "ServerSpec", "TrafficReport",
    "compare_placements", "estimate_traffic", "expected_traffic", "parse_bytes", "parse_servers",
    "place_affinity", "place_contiguous", "place_greedy_balanced", "place_ilp", "place_round_robin",
    "replicate_hot",
]
