"""Hot-expert replication into spare memory (the expert-parallel load balancer's rule).

Repeatedly take the expert with the highest load per copy and add a copy of it on a server that has room
for it and holds none yet, until no expert fits anywhere. The copy goes to the server where it would draw
the most tokens under the expert model's routing (execution/routing.route_pairs): a copy on the home draws every
token of the expert; a copy elsewhere draws the tokens that visit that server anyway (a co-activated expert held
only there). It must keep that server within the balance cap. Memory is never exceeded. Pipeline placements
hold every expert once, on its layer's server: they get no replicas.
"""
from __future__ import annotations

import heapq
from dataclasses import replace

import numpy as np

from moecompress.artifacts.placement import Placement, as_grid
from moecompress.errors import MoecompressError
from moecompress.shard.routing import RoutingStats
from moecompress.shard.spec import ServerSpec


def replicate_hot(
    placement: Placement, stats: RoutingStats, spec: ServerSpec, max_replicas: int | None = None
) -> Placement:
    """`placement` with replicas added (primaries unchanged); at most `max_replicas` copies added in all.

    A copy is only put where the tokens it would draw keep that server's load within `spec`'s balance cap
    (or the placement's own balance, if worse). The draw is estimated from the counts, generously; a replay
    can still find the balance somewhat worse than estimated.
    """
    L, E, N = placement.num_layers, placement.num_experts, placement.num_servers
    if placement.mode != "expert":
        return placement
    if (stats.num_layers, stats.num_experts) != (L, E):
        raise MoecompressError(f"routing stats are {stats.num_layers} x {stats.num_experts}, placement {L} x {E}")
    servers = [[list(s) for s in layer] for layer in placement.assignment]
    devices = [[list(d) for d in layer] for layer in placement.devices] if placement.devices else None
    free = np.array(placement.memory_bytes) - np.array(placement.server_bytes)  # [N]
    D = placement.devices_per_server
    device_free = np.array([[(m - placement.dense_bytes_on(s)) // D] * D for s, m in enumerate(placement.memory_bytes)])
    for (s, d), used in placement.device_bytes().items():
        device_free[s, d] -= used  # [N, D] expert bytes each device may still take
    group = np.arange(L) if spec.balance == "layer" else np.zeros(L, dtype=np.int64)
    served = np.zeros((group.max() + 1, N))  # estimated routed load per (balance group, server)
    for layer in range(L):
        for e in range(E):
            served[group[layer], servers[layer][e][0]] += stats.tokens[layer, e]
    cap = (1 + spec.balance_epsilon) * served.sum(1) / N  # [G]
    cap = np.maximum(cap, served.max(1))  # never below what the placement already has
    on_primary = stats.tokens.copy()  # [L, E] load still computed by each primary
    heap = [(-stats.tokens[layer, e], layer, e) for layer in range(L) for e in range(E) if stats.tokens[layer, e] > 0]
    heapq.heapify(heap)
    added = 0
    while heap and (max_replicas is None or added < max_replicas):
        _, layer, e = heapq.heappop(heap)
        size, grp = placement.expert_bytes[layer][e], group[layer]
        if placement.home in servers[layer][e]:
            continue  # every token already uses the copy on its home
        drawn = np.minimum(_tokens_on(stats, servers, layer, e, N), on_primary[layer, e])  # [N]
        drawn[placement.home] = on_primary[layer, e]
        room = [s for s in range(N) if s not in servers[layer][e] and free[s] >= size and device_free[s].max() >= size
                and drawn[s] > 0 and served[grp, s] + drawn[s] <= cap[grp]]
        if not room:
            continue  # no copy of this expert helps anywhere more; the next hottest may
        s = max(room, key=lambda t: (drawn[t], -served[grp, t], -t))
        d = int(np.argmax(device_free[s]))
        servers[layer][e].append(s)
        if devices is not None:
            devices[layer][e].append(d)
        free[s] -= size
        device_free[s, d] -= size
        served[grp, s] += drawn[s]
        served[grp, servers[layer][e][0]] -= drawn[s]
        on_primary[layer, e] -= drawn[s]
        added += 1
        heapq.heappush(heap, (-stats.tokens[layer, e] / len(servers[layer][e]), layer, e))
    return replace(placement, assignment=as_grid(servers), devices=as_grid(devices) if devices is not None else (),
                   method=f"{placement.method}+replicas")


def _tokens_on(stats: RoutingStats, servers, layer: int, expert: int, num_servers: int) -> np.ndarray:
    """[N] upper estimate of the tokens wanting (layer, expert) that a copy on each server would draw: those
    visiting it anyway (a co-activated expert held there). Over-estimating keeps the balance cap safe."""
    want = np.zeros(num_servers)
    for j, held in enumerate(servers[layer]):
        if j != expert:
            want[held[0]] += stats.coact[layer, expert, j]
    return want
