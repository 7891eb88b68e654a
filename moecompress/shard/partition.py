"""Balanced k-way partitioning of a weighted graph under memory and load caps: pure numpy.

A node v has a load, a balance group (its layer, or one group for all), and a size in bytes. A part s has a
byte capacity; every (part, group) has the load cap of that group. The objective, minimised, is the weight
of the cut edges minus a per-(node, part) bonus:  sum_{u<v} W[u,v] [x_u != x_v] - sum_v bias[v, x_v].
Memory is never exceeded; load caps are respected by every move, so refinement never worsens balance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

_TOL = 1e-12


@dataclass(frozen=True, eq=False)
class Graph:
    weights: sp.csr_matrix  # [n, n] symmetric, zero diagonal
    bias: np.ndarray  # [n, N] bonus of node v on part s
    load: np.ndarray  # [n]
    group: np.ndarray  # [n] balance group of each node
    size: np.ndarray  # [n] bytes
    capacity: np.ndarray  # [N] bytes each part may hold
    caps: np.ndarray  # [G] load cap per (part, group)

    @property
    def num_parts(self) -> int:
        return len(self.capacity)

    def objective(self, x: np.ndarray) -> float:
        onehot = np.eye(self.num_parts)[x]  # [n, N]
        internal = 0.5 * float(((self.weights @ onehot) * onehot).sum())
        return 0.5 * float(self.weights.sum()) - internal - float(self.bias[np.arange(len(x)), x].sum())

    def group_loads(self, x: np.ndarray) -> np.ndarray:  # [N, G]
        loads = np.zeros((self.num_parts, len(self.caps)))
        np.add.at(loads, (x, self.group), self.load)
        return loads

    def used_bytes(self, x: np.ndarray) -> np.ndarray:  # [N]
        return np.bincount(x, weights=self.size, minlength=self.num_parts)


def greedy_balanced(load, group, size, capacity, num_groups) -> np.ndarray | None:
    """Heaviest node first to the least-loaded part (in its group) with room; None if memory cannot be met.

    When that runs out of memory, bytes decide: largest node first to the part with the most free bytes.
    """
    by_load = _pack(np.lexsort((-size, -load)), load, group, size, capacity, num_groups, by_bytes=False)
    return by_load if by_load is not None else _pack(np.argsort(-size, kind="stable"), load, group, size,
                                                        capacity, num_groups, by_bytes=True)


def _pack(order, load, group, size, capacity, num_groups, by_bytes: bool) -> np.ndarray | None:
    x = np.full(len(load), -1)
    loads, used = np.zeros((len(capacity), num_groups)), np.zeros(len(capacity))
    for v in order:
        room = np.flatnonzero(used + size[v] <= capacity)
        if not len(room):
            return None
        free = capacity[room] - used[room]
        s = room[np.argmax(free)] if by_bytes else room[np.lexsort((-free, loads[room, group[v]]))[0]]
        x[v], used[s] = s, used[s] + size[v]
        loads[s, group[v]] += load[v]
    return x


def greedy_affinity(g: Graph, rng: np.random.Generator | None = None) -> np.ndarray | None:
    """Heaviest node first to the part it is most connected to, among parts with room under the caps; None
    when some node finds no such part. `rng` perturbs the order (a randomised start)."""
    n, N = len(g.load), g.num_parts
    noise = rng.random(n) * g.load.max() * 0.5 if rng is not None else 0.0
    x = np.full(n, -1)
    conn = g.bias.copy()
    loads, used = np.zeros((N, len(g.caps))), np.zeros(N)
    for v in np.argsort(-(g.load + noise), kind="stable"):
        ok = (used + g.size[v] <= g.capacity) & (loads[:, g.group[v]] + g.load[v] <= g.caps[g.group[v]] + _TOL)
        if not ok.any():
            return None  # cornered: this start is dropped (the balanced start always exists)
        room = np.flatnonzero(ok)
        s = room[np.lexsort((loads[room, g.group[v]], -conn[v, room]))[0]]
        x[v], used[s] = s, used[s] + g.size[v]
        loads[s, g.group[v]] += g.load[v]
        _shift(conn, g.weights, v, None, s)
    return x


def refine(g: Graph, x: np.ndarray, max_rounds: int = 50) -> np.ndarray:
    """Fiduccia-Mattheyses move passes alternated with greedy swaps, until neither improves the objective."""
    x = x.copy()
    for _ in range(max_rounds):
        gained = _move_pass(g, x) + _swap_pass(g, x)
        if gained <= 1e-9 * max(1.0, abs(g.objective(x))):
            break
    return x


def _shift(conn, weights, v, a, b) -> None:
    """Node v moved from part a (None: unplaced) to part b: update its neighbours' connectivity."""
    lo, hi = weights.indptr[v], weights.indptr[v + 1]
    idx, w = weights.indices[lo:hi], weights.data[lo:hi]
    if a is not None:
        conn[idx, a] -= w
    conn[idx, b] += w


def _connectivity(g: Graph, x: np.ndarray) -> np.ndarray:  # [n, N]
    return np.asarray(g.weights @ np.eye(g.num_parts)[x]) + g.bias


def _move_pass(g: Graph, x: np.ndarray, patience: int = 64) -> float:
    """One FM pass: best feasible move of an unlocked node, even if negative; keep the best prefix."""
    n, N = len(x), g.num_parts
    conn, loads, used = _connectivity(g, x), g.group_loads(x), g.used_bytes(x)
    locked = np.zeros(n, bool)
    rows = np.arange(n)
    room_load = g.caps[g.group][:, None] + _TOL - g.load[:, None]  # [n, 1]: a part may hold this much else
    moves, total, best, best_len = [], 0.0, 0.0, 0
    while len(moves) - best_len < patience and not locked.all():
        gain = conn - conn[rows, x][:, None]
        ok = (loads[:, g.group].T <= room_load) & (used[None, :] + g.size[:, None] <= g.capacity[None, :])
        ok[rows, x] = False
        ok[locked] = False
        if not ok.any():
            break
        flat = int(np.argmax(np.where(ok, gain, -np.inf)))
        v, b = divmod(flat, N)
        a = x[v]
        total += gain[v, b]
        _apply_move(g, x, conn, loads, used, v, a, b)
        locked[v] = True
        moves.append((v, a))
        if total > best + 1e-12:
            best, best_len = total, len(moves)
    for v, a in reversed(moves[best_len:]):
        _apply_move(g, x, conn, loads, used, v, x[v], a)
    return best


def _apply_move(g, x, conn, loads, used, v, a, b) -> None:
    x[v] = b
    loads[a, g.group[v]] -= g.load[v]
    loads[b, g.group[v]] += g.load[v]
    used[a] -= g.size[v]
    used[b] += g.size[v]
    _shift(conn, g.weights, v, a, b)


def _swap_pass(g: Graph, x: np.ndarray, candidates: int = 256) -> float:
    """Greedy exchanges of two nodes of different parts (keeps balance where single moves cannot)."""
    conn, loads, used = _connectivity(g, x), g.group_loads(x), g.used_bytes(x)
    rows, gained = np.arange(len(x)), 0.0
    for _ in range(len(x)):
        best_move = (conn - conn[rows, x][:, None]).max(1)
        c = np.argsort(-best_move, kind="stable")[:candidates]  # nodes most eager to leave
        xc, gc, lc, sc = x[c], g.group[c], g.load[c], g.size[c]
        here = conn[c][:, xc]  # [u, v]: conn of u to v's part
        own = conn[c, xc]
        gain = (here - own[:, None]) + (here.T - own[None, :]) - 2 * g.weights[c][:, c].toarray()
        same = gc[:, None] == gc[None, :]
        # u goes to v's part, v to u's part; each part's load in the arriving node's group must stay under its cap
        into_v = loads[xc[None, :], gc[:, None]] + lc[:, None] - np.where(same, lc[None, :], 0)
        into_u = loads[xc[:, None], gc[None, :]] + lc[None, :] - np.where(same, lc[:, None], 0)
        ok = (into_v <= g.caps[gc][:, None] + _TOL) & (into_u <= g.caps[gc][None, :] + _TOL)
        ok &= used[xc][None, :] - sc[None, :] + sc[:, None] <= g.capacity[xc][None, :]
        ok &= used[xc][:, None] - sc[:, None] + sc[None, :] <= g.capacity[xc][:, None]
        ok &= xc[:, None] != xc[None, :]
        gain = np.where(ok, gain, -np.inf)
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if not gain[i, j] > 1e-12:
            break
        u, v = c[i], c[j]
        a, b = x[u], x[v]
        _apply_move(g, x, conn, loads, used, u, a, b)
        _apply_move(g, x, conn, loads, used, v, b, a)
        gained += gain[i, j]
    return gained
