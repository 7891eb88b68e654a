"""Our placement: balanced partitioning of the expert affinity graph, refined, optionally per device too.

Nodes are (layer, expert); edges are within-layer co-activation weighted by the messages they save in the expert
execution model, plus a bonus for experts on the home server (problem.py). Several starts (greedy by affinity,
greedy by balance, randomised affinity orders) are each refined by Fiduccia-Mattheyses moves and swaps under the
memory and load caps, and by renaming servers so that the most connected group sits on the home; the best is kept. With several devices per server, the experts of each server are partitioned again among its
devices the same way (hierarchical: servers first, the slow links, then devices).
"""
from __future__ import annotations

import numpy as np

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.shard.partition import Graph, greedy_affinity, greedy_balanced, refine
from moecompress.shard.problem import affinity_graph, balance_caps, to_placement
from moecompress.shard.routing import RoutingStats
from moecompress.shard.spec import ServerSpec


def place_affinity(
    stats: RoutingStats,
    expert_bytes,
    dense_bytes: int,
    spec: ServerSpec,
    *,
    restarts: int = 8,
    seed: int = 0,
) -> Placement:
    """Experts placed to minimise expected cross-server traffic under memory and load balance (deterministic)."""
    g = affinity_graph(stats, expert_bytes, dense_bytes, spec)
    x = partition(g, restarts, seed)
    devices = None
    if spec.devices_per_server > 1:  # hierarchical: each server's experts over its devices
        devices = np.zeros_like(x)
        for s in range(spec.num_servers):
            nodes = np.flatnonzero(x == s)
            if len(nodes):
                devices[nodes] = partition(_device_graph(g, nodes, s, spec.devices_per_server, spec), restarts, seed)
    return to_placement(x, expert_bytes, dense_bytes, spec, "affinity", devices)


def partition(g: Graph, restarts: int = 8, seed: int = 0) -> np.ndarray:
    """Best refined partition over the greedy starts."""
    rng = np.random.default_rng(seed)
    starts = [greedy_affinity(g), greedy_balanced(g.load, g.group, g.size, g.capacity, len(g.caps))]
    starts += [greedy_affinity(g, rng) for _ in range(restarts)]
    refined = [refine(g, relabel_home(g, refine(g, x))) for x in starts if x is not None]
    return min(refined, key=g.objective)


def relabel_home(g: Graph, x: np.ndarray) -> np.ndarray:
    """The cut does not depend on the servers' names, the home bonus does: swap the names of two servers where that
    fits in memory and gains (moving a whole co-firing group onto the home, which single moves cannot)."""
    best = x
    for a in range(g.num_parts):
        for b in range(a + 1, g.num_parts):
            y = best.copy()
            y[best == a], y[best == b] = b, a
            if (g.used_bytes(y) <= g.capacity).all() and g.objective(y) < g.objective(best) - 1e-12:
                best = y
    return best


def _device_graph(g: Graph, nodes: np.ndarray, server: int, devices: int, spec: ServerSpec) -> Graph:
    """The sub-problem of one server: its experts over its devices, each with an equal share of its memory."""
    size, load, group = g.size[nodes], g.load[nodes], g.group[nodes]
    capacity = np.full(devices, int(g.capacity[server]) // devices)
    packed = greedy_balanced(load, group, size, capacity, len(g.caps))
    if packed is None:
        raise MoecompressError(
            f"server {server}'s experts ({int(size.sum())} bytes, largest {int(size.max())}) do not fit on "
            f"{devices} devices of {capacity[0]} bytes each; give the server more memory or fewer devices"
        )
    caps = balance_caps(load, group, packed, devices, len(g.caps), spec.balance_epsilon)
    return Graph(
        weights=g.weights[nodes][:, nodes].tocsr(),
        bias=np.zeros((len(nodes), devices)),
        load=load, group=group, size=size, capacity=capacity, caps=caps,
    )
