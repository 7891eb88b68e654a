"""The expert-model placement problem as a graph: nodes are (layer, expert), edges the routing affinities.

Cost model = the expert execution model of moecompress/execution/routing.py (the runtime's, the replay's): every
token lives on the home server h (dense weights, KV cache). At a MoE layer its k pairs are computed on a set S of
servers (route_pairs); the home sends its hidden state once to every server of S other than h and each returns
one partial sum: 2 |S - {h}| messages (rows) per token and layer. An expert on h costs nothing; experts that fire
together on the same remote server share one send. Nothing depends on the previous layer (no activation paths).

Optimiser surrogate, linear in which pairs of experts share a server (a weighted graph cut plus a bonus per node
on h), in messages per token: each (token, expert) not on h costs 2/k, each co-activated pair on different
servers 2 x 2/k. It is exact when a token's experts are all on h (0), all on one remote server (2) or on k
distinct remote servers (2k); it over-counts tokens split between h and one remote server. `place_affinity`
minimises it; `place_ilp` solves it exactly; the replay (execution/replay.py) measures the real count.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from moecompress.artifacts.placement import Placement, as_grid
from moecompress.errors import MoecompressError
from moecompress.shard.partition import Graph, greedy_balanced
from moecompress.shard.routing import RoutingStats
from moecompress.shard.spec import ServerSpec


def affinity_graph(stats: RoutingStats, expert_bytes, dense_bytes: int, spec: ServerSpec) -> Graph:
    """The graph of `stats` for `spec`; raises MoecompressError with the smallest fitting memory if none fits."""
    L, E, N, k, T = stats.num_layers, stats.num_experts, spec.num_servers, stats.top_k, stats.num_tokens
    size = check_expert_bytes(expert_bytes, L, E).ravel()
    capacity = np.array(spec.expert_capacity(dense_bytes))
    group = np.repeat(np.arange(L), E) if spec.balance == "layer" else np.zeros(L * E, dtype=np.int64)
    load = stats.tokens.ravel().astype(np.float64)
    packed = greedy_balanced(load, group, size, capacity, group.max() + 1) if (capacity >= 0).all() else None
    if packed is None:
        raise_memory_error(size, dense_bytes, spec)
    coact = [stats.coact[layer] * (1 - np.eye(E)) * (2 * (2 / k) / T) for layer in range(L)]  # [E, E] each
    weights = sp.csr_matrix(sp.block_diag([sp.csr_matrix(c) for c in coact]))
    weights.eliminate_zeros()
    bias = np.zeros((L * E, N))
    bias[:, spec.home] = 2 * load / (k * T)  # an expert on the home is never sent
    caps = balance_caps(load, group, packed, N, int(group.max()) + 1, spec.balance_epsilon)
    return Graph(weights, bias, load, group, size, capacity, caps)


def balance_caps(load, group, packed, num_parts: int, num_groups: int, epsilon: float) -> np.ndarray:
    """Load cap of each group: (1 + epsilon) x the mean part, or what balanced packing reaches if that is more."""
    mean = np.bincount(group, weights=load, minlength=num_groups) / num_parts
    reached = np.zeros((num_parts, num_groups))
    np.add.at(reached, (packed, group), load)
    return np.maximum((1 + epsilon) * mean, reached.max(0))


def check_expert_bytes(expert_bytes, num_layers: int, num_experts: int) -> np.ndarray:
    b = np.asarray(expert_bytes)
    if b.shape != (num_layers, num_experts) or (b < 0).any() or not np.issubdtype(b.dtype, np.integer):
        raise MoecompressError(
            f"expert bytes must be whole non-negative bytes of shape [layers={num_layers}, experts={num_experts}], "
            f"got shape {b.shape}"
        )
    return b.astype(np.int64)


def min_server_memory(size: np.ndarray, dense_bytes: int, num_servers: int, replicate_dense: bool) -> int:
    """Smallest memory, the same on every server, with which our packing (largest expert first onto the server
    with most free bytes) fits every expert; with one dense holder, server 0 holds the dense weights."""
    total, largest = int(size.sum()), int(size.max(initial=0))
    if replicate_dense:
        lo = dense_bytes + max(largest, math.ceil(total / num_servers))
    else:
        lo = max(largest, dense_bytes, math.ceil((total + dense_bytes) / num_servers))
    hi = dense_bytes + math.ceil(total / num_servers) + largest  # any greedy packing fits in this

    def fits(memory: int) -> bool:
        holds_dense = replicate_dense | (np.arange(num_servers) == 0)
        capacity = memory - np.where(holds_dense, dense_bytes, 0)
        return capacity.min() >= 0 and greedy_balanced(size, np.zeros_like(size), size, capacity, 1) is not None

    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return hi


def raise_memory_error(size: np.ndarray, dense_bytes: int, spec: ServerSpec):
    need = min_server_memory(size, dense_bytes, spec.num_servers, spec.replicate_dense)
    where = "on every server" if spec.replicate_dense else "on the largest server"
    raise MoecompressError(
        f"server memory too small to place the experts: {spec.num_servers} servers with "
        f"{', '.join(map(str, spec.memory_bytes))} bytes; the experts take {int(size.sum())} bytes (largest "
        f"{int(size.max(initial=0))}) plus {dense_bytes} bytes of non-expert weights {where}. The smallest "
        f"memory that fits, the same on every server, is {need} bytes; give the servers more memory, add servers, "
        "or re-run the bit allocation with the per-server budget"
    )


def to_placement(x: np.ndarray, expert_bytes, dense_bytes: int, spec: ServerSpec, method: str,
                 devices: np.ndarray | None = None) -> Placement:
    """A Placement holding node v = layer * E + expert on server x[v] (and device devices[v]); no replicas."""
    b = np.asarray(expert_bytes)
    L, E = b.shape
    return Placement(
        memory_bytes=spec.memory_bytes,
        assignment=as_grid(np.reshape(x, (L, E, 1))),
        expert_bytes=tuple(tuple(int(v) for v in row) for row in b),
        dense_bytes=int(dense_bytes),
        dense_servers=spec.dense_servers,
        devices_per_server=spec.devices_per_server if devices is not None else 1,
        devices=as_grid(np.reshape(devices, (L, E, 1))) if devices is not None else (),
        method=method,
    )


def primaries(placement: Placement) -> np.ndarray:
    """[L * E] primary server of each node of the graph."""
    return np.array(placement.primaries(), dtype=np.int64).ravel()
