"""Baseline placements without affinity, reported beside ours: contiguous blocks, round-robin, greedy balance.

Each takes the same arguments as `place_affinity` and respects memory; contiguous and round-robin ignore load
balance (they are what a plain expert-parallel deployment does), greedy packing balances without affinity.
"""
from __future__ import annotations

import numpy as np

from moecompress.artifacts.placement import Placement
from moecompress.shard.partition import Graph, greedy_balanced
from moecompress.shard.problem import affinity_graph, to_placement
from moecompress.shard.routing import RoutingStats
from moecompress.shard.spec import ServerSpec


def place_contiguous(stats: RoutingStats, expert_bytes, dense_bytes: int, spec: ServerSpec) -> Placement:
    """In every layer, experts 0..E-1 cut into consecutive blocks, one per server (sized by server memory)."""
    g = affinity_graph(stats, expert_bytes, dense_bytes, spec)
    E = stats.num_experts
    share = np.cumsum(np.maximum(g.capacity, 0)) / max(np.maximum(g.capacity, 0).sum(), 1)  # [N]
    block = np.searchsorted(share, (np.arange(E) + 0.5) / E)  # [E] server of each expert id
    x = np.tile(np.minimum(block, spec.num_servers - 1), stats.num_layers)
    return to_placement(_fit_memory(g, x), expert_bytes, dense_bytes, spec, "contiguous")


def place_round_robin(stats: RoutingStats, expert_bytes, dense_bytes: int, spec: ServerSpec) -> Placement:
    """Expert e of every layer on server e mod N."""
    g = affinity_graph(stats, expert_bytes, dense_bytes, spec)
    x = np.tile(np.arange(stats.num_experts) % spec.num_servers, stats.num_layers)
    return to_placement(_fit_memory(g, x), expert_bytes, dense_bytes, spec, "round_robin")


def place_greedy_balanced(stats: RoutingStats, expert_bytes, dense_bytes: int, spec: ServerSpec) -> Placement:
    """Most-loaded expert first onto the least-loaded server with room (per balance group), no affinity."""
    g = affinity_graph(stats, expert_bytes, dense_bytes, spec)
    x = greedy_balanced(g.load, g.group, g.size, g.capacity, len(g.caps))
    return to_placement(x, expert_bytes, dense_bytes, spec, "greedy_balanced")


def _fit_memory(g: Graph, x: np.ndarray) -> np.ndarray:
    """Move the smallest experts off over-full servers to the server with most free bytes; else pack by bytes."""
    x = x.copy()
    used = g.used_bytes(x)
    for s in np.flatnonzero(used > g.capacity):
        for v in np.flatnonzero(x == s)[np.argsort(g.size[x == s], kind="stable")]:
            if used[s] <= g.capacity[s]:
                break
            free = g.capacity - used
            free[s] = -1
            t = int(np.argmax(free))
            if free[t] >= g.size[v]:
                x[v], used[s], used[t] = t, used[s] - g.size[v], used[t] + g.size[v]
    if (used > g.capacity).any():
        return greedy_balanced(g.size, np.zeros_like(x), g.size, g.capacity, 1)
    return x
