"""The placement problem as a graph: nodes are (layer, expert), edges the routing affinities.

Cost model (also in traffic.py): a token sits on a *current server* c. At a MoE layer its top-k experts sit on
a set S of servers; it is sent to every server of S other than c (|S - {c}| messages), each server sums its
local experts, and the partial sums are gathered on g, the server of S holding the largest routing weight
(|S - {g}| messages). The token then sits on g for the next layer (dense weights replicated: its attention
runs wherever it is). Holding the experts of a token's layer on fewer servers saves 2 messages per server;
finding its next-layer experts on g saves 1. That is 2 messages per remote server when c holds one of the
token's experts, one fewer when it holds none (the sum is gathered remotely). KV-cache movement of a token that
changes server is not counted. When the dense weights are held by one server h, every token lives on h
(c = g = h): 2 |S - {h}| messages per layer.

Optimiser surrogate: linear in which pairs of experts share a server, so minimising it is a weighted graph
cut. A co-activated pair (i, j) of a layer on one server saves 2 beta / T messages per token with beta = 2/k
(a token's k experts all on one server are k(k-1)/2 pairs and save k-1 servers, 2 messages each). A path pair
(i at l, j at l+1) on one server saves path_weight / (k T): the token gathered on the server of one of its k
layer-l experts, and finding a layer-(l+1) expert there saves its dispatch. With the dense weights on one
server h, an expert on h saves 2 tokens / T. `place_affinity` minimises this; `place_ilp` solves it exactly;
`estimate_traffic` (traffic.py) is the non-linear estimate for reports; the replay measures.
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


def affinity_graph(
    stats: RoutingStats, expert_bytes, dense_bytes: int, spec: ServerSpec, path_weight: float = 1.0
) -> Graph:
    """The graph of `stats` for `spec`; raises MoecompressError with the smallest fitting memory if none fits."""
    L, E, N, k, T = stats.num_layers, stats.num_experts, spec.num_servers, stats.top_k, stats.num_tokens
    size = check_expert_bytes(expert_bytes, L, E).ravel()
    capacity = np.array(spec.expert_capacity(dense_bytes))
    group = np.repeat(np.arange(L), E) if spec.balance == "layer" else np.zeros(L * E, dtype=np.int64)
    load = stats.tokens.ravel().astype(np.float64)
    packed = greedy_balanced(load, group, size, capacity, group.max() + 1) if (capacity >= 0).all() else None
    if packed is None:
        raise_memory_error(size, dense_bytes, spec)
    blocks: list[list] = [[None] * L for _ in range(L)]
    for layer in range(L):
        blocks[layer][layer] = sp.csr_matrix(stats.coact[layer] * (2 * (2 / k) / T) if k > 1 else (E, E))
        if layer + 1 < L:
            blocks[layer][layer + 1] = sp.csr_matrix(stats.paths[layer] * (path_weight / (k * T)))
            blocks[layer + 1][layer] = blocks[layer][layer + 1].T
    weights = sp.csr_matrix(sp.bmat(blocks)) if L > 1 else sp.csr_matrix(blocks[0][0])
    weights.eliminate_zeros()
    bias = np.zeros((L * E, N))
    if not spec.replicate_dense:
        bias[:, spec.dense_servers[0]] = 2 * load / T
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
