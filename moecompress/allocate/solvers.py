"""The multiple-choice knapsack under the allocation: pick one option per item, total bytes <= budget, least damage.

Both solvers take padded arrays — `nbytes` [n, K] int64, `damage` [n, K] float64, `valid` [n, K] bool (K options per
item at most, at least one valid in each row) — and return a `Solution`: the chosen column per item and a proven lower
bound on the optimal damage. Callers check feasibility (the cheapest options fit) before calling.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from moecompress.errors import MoecompressError


@dataclass(frozen=True)
class Solution:
    choice: np.ndarray  # [n] int: column chosen for each item
    lower_bound: float  # no feasible choice has less total damage
    solver: str


def total(values: np.ndarray, choice: np.ndarray):
    return values[np.arange(len(choice)), choice].sum()


def relative_gap(value: float, bound: float) -> float:
    """How far `value` may be above the optimum, given a lower `bound` on it, relative to `value`."""
    return 0.0 if value <= bound else (value - bound) / abs(value)


def cheapest(nbytes: np.ndarray, damage: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[n] the fewest-bytes valid option of each item, the least damage among equal bytes."""
    order = np.lexsort((np.where(valid, damage, np.inf), np.where(valid, nbytes, np.iinfo(np.int64).max)), axis=1)
    return order[:, 0]


def _hull_steps(b: list[int], d: list[float], ok: list[bool]) -> list[tuple[int, int]]:
    """Upgrade steps (from, to) along the lower convex hull of one item's (bytes, damage) points."""
    cols = sorted((j for j in range(len(ok)) if ok[j]), key=lambda j: (b[j], d[j]))
    pareto = [cols[0]]
    for j in cols[1:]:
        if d[j] < d[pareto[-1]] and b[j] > b[pareto[-1]]:
            pareto.append(j)

    def slope(i, j):  # computed as solve_lagrangian sorts by it, so hull slopes strictly increase in that order
        return (d[j] - d[i]) / (b[j] - b[i])

    hull: list[int] = []
    for j in pareto:  # monotone chain: keep only turns that make the damage-per-byte slope flatter
        while len(hull) >= 2 and slope(hull[-1], j) <= slope(hull[-2], hull[-1]):
            hull.pop()
        hull.append(j)
    return list(zip(hull[:-1], hull[1:]))


def solve_lagrangian(nbytes: np.ndarray, damage: np.ndarray, valid: np.ndarray, budget: int) -> Solution:
    """Lagrangian relaxation of the budget, solved exactly at its breakpoints, then a greedy fill.

    Every item's lower-hull upgrades are taken in order of damage reduction per byte (the order in which a
    decreasing multiplier lambda makes them worth it) until the first one that does not fit; the LP value at that
    point is the lower bound. The leftover bytes then buy, one at a time, the upgrade of best damage reduction per
    byte that still fits.
    """
    n = len(nbytes)
    rows = np.arange(n)
    choice = cheapest(nbytes, damage, valid)
    rows_b, rows_d, rows_ok = nbytes.tolist(), damage.tolist(), valid.tolist()  # python scalars: ~10x faster here
    steps = [(i, a, c) for i in range(n) for a, c in _hull_steps(rows_b[i], rows_d[i], rows_ok[i])]
    left = budget - int(total(nbytes, choice))
    lower = float(total(damage, choice))
    if steps:
        item, frm, to = (np.array(x, dtype=np.int64) for x in zip(*steps))
        db = nbytes[item, to] - nbytes[item, frm]
        dd = damage[item, to] - damage[item, frm]  # < 0
        order = np.argsort(dd / db, kind="stable")  # best reduction per byte first; stable keeps hull order
        fits = np.cumsum(db[order]) <= left
        k = len(order) if fits.all() else int(np.argmin(fits))
        taken = order[:k]
        for s in taken:  # within an item the steps come in hull order: its last one taken wins
            choice[item[s]] = to[s]
        left -= int(db[taken].sum())
        lower = float(total(damage, choice))
        if k < len(order):
            s = order[k]
            lower += left / db[s] * dd[s]
    while True:  # greedy fill of the leftover bytes
        extra = nbytes - nbytes[rows, choice][:, None]
        gain = damage[rows, choice][:, None] - damage
        ok = valid & (extra > 0) & (extra <= left) & (gain > 0)
        if not ok.any():
            break
        i, j = np.unravel_index(np.argmax(np.where(ok, gain / np.maximum(extra, 1), -np.inf)), ok.shape)
        left -= int(extra[i, j])
        choice[i] = j
    return Solution(choice=choice, lower_bound=min(lower, float(total(damage, choice))), solver="lagrangian")


def solve_milp(
    nbytes: np.ndarray, damage: np.ndarray, valid: np.ndarray, budget: int, *, node_limit: int,
    mip_rel_gap: float, time_limit: float = 600.0,
) -> Solution | None:
    """Exact one-hot MILP (HiGHS via scipy): a binary per valid option, one equality per item, one budget row.

    Each item's cheapest bytes and least damage are subtracted and both scaled to about 1, so HiGHS's tolerances
    act on sensible numbers; the answer is then checked in exact integers, and if rounding let it exceed the
    budget the capacity is tightened by the excess and the MILP solved again. None when HiGHS finds no solution.

    Reproducible: the search stops after `node_limit` branch-and-bound nodes, a limit of work that does not depend
    on how loaded the machine is (HiGHS's MIP search is deterministic for a given input and options). The wall-clock
    `time_limit` is only a safety net: a solve that reaches it gives None (its answer would depend on machine
    load), and the caller keeps its deterministic answer.
    """
    n, k = nbytes.shape
    item, col = np.nonzero(valid)  # one variable per valid option, grouped by item
    b_min = np.where(valid, nbytes, np.iinfo(np.int64).max).min(axis=1)
    d_min = np.where(valid, damage, np.inf).min(axis=1)
    b = (nbytes[item, col] - b_min[item]).astype(np.float64)
    d = damage[item, col] - d_min[item]
    capacity = budget - int(b_min.sum())
    b_scale = max(capacity, 1)
    d_scale = d.max() if d.max() > 0 else 1.0
    one_hot = csr_array((np.ones(len(item)), (item, np.arange(len(item)))), shape=(n, len(item)))
    for _ in range(4):
        res = milp(
            d / d_scale,
            integrality=np.ones(len(item)),
            bounds=Bounds(0, 1),
            constraints=[
                LinearConstraint(one_hot, 1, 1),  # one option per item
                LinearConstraint(b[None, :] / b_scale, -np.inf, capacity / b_scale),  # the budget
            ],
            options={"node_limit": int(node_limit), "time_limit": time_limit, "mip_rel_gap": mip_rel_gap},
        )
        if res.x is None or "time limit" in str(res.message).lower():
            return None
        x = np.full((n, k), -1.0)
        x[item, col] = res.x
        choice = np.argmax(x, axis=1)
        excess = int(total(nbytes, choice)) - budget
        if excess <= 0:
            bound = getattr(res, "mip_dual_bound", None)
            bound = d_min.sum() + bound * d_scale if bound is not None and np.isfinite(bound) else -np.inf
            return Solution(choice=choice, lower_bound=float(bound), solver="milp")
        capacity -= excess
    raise MoecompressError("the MILP solver kept exceeding the budget by rounding; use solver='lagrangian'")
