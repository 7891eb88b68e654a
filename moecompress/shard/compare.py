"""All placement methods side by side on one routing trace: the table the benchmark prints."""
from __future__ import annotations

import time

from moecompress.shard.affinity import place_affinity
from moecompress.shard.baselines import place_contiguous, place_greedy_balanced, place_round_robin
from moecompress.shard.ilp import place_ilp
from moecompress.shard.problem import affinity_graph, primaries
from moecompress.shard.replicate import replicate_hot
from moecompress.shard.routing import RoutingStats, RoutingTrace
from moecompress.shard.spec import ServerSpec
from moecompress.shard.traffic import estimate_traffic, expected_traffic

BASELINES = {
    "contiguous": place_contiguous,
    "round_robin": place_round_robin,
    "greedy_balanced": place_greedy_balanced,
}
METHODS = {**BASELINES, "affinity": place_affinity, "ilp": place_ilp}


def compare_placements(
    stats: RoutingStats,
    trace: RoutingTrace,
    expert_bytes,
    dense_bytes: int,
    spec: ServerSpec,
    hidden_size: int,
    payload_bytes: int = 2,
    methods: tuple[str, ...] = ("contiguous", "round_robin", "greedy_balanced", "affinity"),
    replicate: bool = False,
) -> list[dict]:
    """One row per method: placed from `stats`, measured by replaying `trace` (take it from other data).

    `replicate` adds a "<method>+replicas" row for each method. `reduction` is the share of bytes saved
    against the best baseline row without replicas (negative: more bytes); `objective` is the optimiser's
    surrogate (lower is better), `estimate` the bytes per token predicted from `stats` alone.
    """
    graph = affinity_graph(stats, expert_bytes, dense_bytes, spec)
    rows = []
    for name in methods:
        start = time.perf_counter()
        placed = [METHODS[name](stats, expert_bytes, dense_bytes, spec)]
        seconds = time.perf_counter() - start
        if replicate:
            placed.append(replicate_hot(placed[0], stats, spec))
        for p in placed:
            report = expected_traffic(p, trace, hidden_size, payload_bytes, spec.link_bandwidth)
            rows.append({
                "method": p.method,
                "bytes_per_token": report.bytes_per_token,
                "messages_per_token": report.messages_per_token,
                "local_fraction": report.local_fraction,
                "balance": report.balance,
                "layer_balance": report.layer_balance,
                "seconds_per_token": report.seconds_per_token,
                "estimate": estimate_traffic(p, stats, hidden_size, payload_bytes),
                "objective": graph.objective(primaries(p)),
                "copies": sum(len(s) for layer in p.assignment for s in layer),
                "max_server_bytes": max(p.server_bytes),
                "place_seconds": seconds,
            })
    best = min((r["bytes_per_token"] for r in rows if r["method"] in BASELINES), default=None)
    for r in rows:
        r["reduction"] = 1 - r["bytes_per_token"] / best if best else None
    return rows
