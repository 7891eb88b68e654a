"""Exact placement for small instances, to measure the heuristic's gap: a mixed-integer program (scipy milp).

It minimises exactly the objective `place_affinity` minimises (problem.py): the weighted cut of the affinity
graph minus the home-server bonus, i.e. the linearised expected message count per token of the expert model,
under the same memory and load caps. Variables: x[v, s] = 1 when node v sits on server s; z[u, v] >= x[u, s] -
x[v, s] for every server s, so z = 1 exactly when the edge (u, v) is cut. The replayed traffic is not what it solves.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.shard.partition import Graph
from moecompress.shard.problem import affinity_graph, to_placement
from moecompress.shard.routing import RoutingStats
from moecompress.shard.spec import ServerSpec


def place_ilp(
    stats: RoutingStats,
    expert_bytes,
    dense_bytes: int,
    spec: ServerSpec,
    *,
    time_limit: float = 60.0,
) -> Placement:
    """The optimal placement (method "ilp"; "ilp-timeout" if the time limit stopped the solver first)."""
    if spec.devices_per_server > 1:
        raise MoecompressError("the exact placement places servers only; use devices_per_server=1")
    g = affinity_graph(stats, expert_bytes, dense_bytes, spec)
    x, optimal = solve_partition(g, time_limit)
    return to_placement(x, expert_bytes, dense_bytes, spec, "ilp" if optimal else "ilp-timeout")


def solve_partition(g: Graph, time_limit: float = 60.0) -> tuple[np.ndarray, bool]:
    """(assignment, proven optimal) of the partition problem `g` as a MILP."""
    n, N, G = len(g.load), g.num_parts, len(g.caps)
    upper = sp.triu(g.weights, k=1).tocoo()
    m = upper.nnz  # edges (u < v)
    nx = n * N  # x[v, s] at v * N + s, then z[edge] at nx + edge
    cost = np.concatenate([-g.bias.ravel(), upper.data])
    rows = sp.kron(sp.eye(n), np.ones((1, N)))  # one server per node
    memory = sp.kron(g.size[None, :], sp.eye(N))  # [N, n*N]
    in_group = np.eye(G)[g.group].T * g.load[None, :]  # [G, n]
    balance = sp.kron(in_group, sp.eye(N))  # [(group, server), n*N]
    edge = np.arange(m)
    cut = []  # z_e - x[u, s] + x[v, s] >= 0, for each server s
    for s in range(N):
        cut.append(sp.csr_matrix(
            (np.concatenate([np.ones(m), -np.ones(m), np.ones(m)]),
             (np.tile(edge, 3), np.concatenate([nx + edge, upper.row * N + s, upper.col * N + s]))),
            shape=(m, nx + m),
        ))
    def on_x(a):  # a constraint on x alone, padded with zeros for z
        return sp.hstack([a, sp.csr_matrix((a.shape[0], m))])

    constraints = [
        LinearConstraint(on_x(rows), 1, 1),
        LinearConstraint(on_x(memory), -np.inf, g.capacity),
        LinearConstraint(on_x(balance), -np.inf, np.repeat(g.caps, N) + 1e-9),
    ]
    if m:
        constraints.append(LinearConstraint(sp.vstack(cut), 0, np.inf))
    lower, upper_b = np.zeros(nx + m), np.ones(nx + m)
    if len(set(g.capacity.tolist())) == 1 and not g.bias.any():
        lower[0] = 1  # identical servers: node 0 on server 0 breaks the symmetry
    integrality = np.concatenate([np.ones(nx), np.zeros(m)])
    res = milp(cost, constraints=constraints, integrality=integrality, bounds=Bounds(lower, upper_b),
               options={"time_limit": time_limit})
    if res.x is None:
        raise MoecompressError(f"the exact placement found no solution ({res.message}); use place_affinity")
    return np.argmax(res.x[:nx].reshape(n, N), axis=1), res.status == 0
