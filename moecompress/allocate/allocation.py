"""Choose every item's bit-width, globally across all MoE layers, for the least total damage within a byte budget."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moecompress.allocate.rules import AllocationRules, Budget, metadata_bytes
from moecompress.allocate.solvers import Solution, cheapest, relative_gap, solve_lagrangian, solve_milp, total
from moecompress.arch.layout import ModelLayout
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.artifacts.cost_table import ALL_PROJS, CostItem, CostTable, expert_bytes
from moecompress.errors import MoecompressError

SOLVERS = ("auto", "milp", "lagrangian")
MILP_NODE_LIMIT = 20_000  # branch-and-bound nodes per MILP solve: a work limit, the same on any machine
AUTO_MILP_ABOVE_GAP = 1e-4  # "auto" runs the MILP only when the Lagrangian answer may be further than this from optimal


@dataclass(frozen=True)
class Allocation:
    items: tuple[CostItem, ...]  # the cost table's items, in its order
    bits: tuple[int, ...]  # chosen bit-width of each item
    damage: float  # predicted total damage: sum of the chosen damages
    bytes: int  # total stored bytes of the items at the chosen bits (the low-bit copies not included)
    budget_bytes: int  # the whole budget: items' bytes + copy_bytes <= budget_bytes
    group_size: int
    symmetric: bool
    solver: str  # "milp" | "lagrangian" | "lagrangian (milp timed out)"
    lower_bound: float  # proven: no allocation within the budget and rules has less damage
    copy_bytes: int = 0  # bytes of the low-bit copies of the experts, taken out of the budget before the items

    @property
    def gap(self) -> float:
        """Relative distance to the proven lower bound: 0 means optimal (up to the MILP's tolerance)."""
        return relative_gap(self.damage, self.lower_bound)


def allocate(
    cost: CostTable,
    budget: Budget,
    rules: AllocationRules = AllocationRules(),
    solver: str = "auto",
    *,
    node_limit: int = MILP_NODE_LIMIT,
    mip_rel_gap: float = 1e-6,
    time_limit: float = 600.0,
    copy_bytes: int = 0,
) -> Allocation:
    """The least-damage choice of bits for every item of `cost` with total bytes <= the budget, under `rules`.

    solver: "lagrangian" (fast, near optimal, with a proven lower bound), "milp" (exact up to `mip_rel_gap`, HiGHS,
    at most `node_limit` branch-and-bound nodes per solve) or "auto" (lagrangian, then milp only if the proven gap
    exceeds AUTO_MILP_ABOVE_GAP: small problems, where one item is a large share of the damage). The Lagrangian
    answer is always computed (milliseconds) and kept when the MILP finds no better one.

    The answer depends only on the inputs, never on machine load: the MILP's work is bounded by `node_limit`
    (deterministic), and a MILP that hits the wall-clock safety net `time_limit` is discarded (the Lagrangian
    answer stays, and `solver` says "lagrangian (milp timed out)"). Equal-damage ties resolve by item order.

    copy_bytes: bytes of the experts' low-bit copies (`copies_bytes`); they come out of the budget first, the items
    share the rest. `avg_bits` budgets keep their nominal meaning: avg_bits 3 is the bytes of uniform 3-bit experts,
    copies included; the items then average fewer bits.
    """
    if solver not in SOLVERS:
        raise MoecompressError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    items = cost.items
    if not items:
        raise MoecompressError("the cost table has no items to allocate")
    allowed = rules.allowed(items)
    k = max(len(a) for a in allowed)
    nbytes = np.zeros((len(items), k), dtype=np.int64)  # [n, K] options of each item, padded
    damage = np.zeros((len(items), k))
    valid = np.zeros((len(items), k), dtype=bool)
    for i, (it, cols) in enumerate(zip(items, allowed)):
        nbytes[i, : len(cols)] = [it.bytes[j] for j in cols]
        damage[i, : len(cols)] = [it.damage[j] for j in cols]
        valid[i, : len(cols)] = True

    experts = [it for it in items if it.kind == "expert"] or items
    numel, meta = sum(it.numel for it in experts), metadata_bytes(experts)
    budget_bytes = budget.to_bytes(numel, meta)
    if not (isinstance(copy_bytes, int) and copy_bytes >= 0):
        raise MoecompressError(f"copy_bytes must be a non-negative integer, got {copy_bytes!r}")
    items_budget = budget_bytes - copy_bytes
    least = int(total(nbytes, cheapest(nbytes, damage, valid)))
    if items_budget < least:
        copies = f" plus the low-bit copies' {copy_bytes} bytes" if copy_bytes else ""
        raise MoecompressError(
            f"budget {budget.describe(budget_bytes, numel, meta)} is too small: the smallest feasible budget, every "
            f"item at its lowest allowed bits{copies}, is {budget.describe(least + copy_bytes, numel, meta)}"
        )

    sol = choose(nbytes, damage, valid, items_budget, solver, node_limit, mip_rel_gap, time_limit)
    chosen = tuple(it.bits[cols[j]] for it, cols, j in zip(items, allowed, sol.choice))
    predicted = math.fsum(damage[np.arange(len(items)), sol.choice])
    return Allocation(
        items=items,
        bits=chosen,
        damage=predicted,
        bytes=int(total(nbytes, sol.choice)),
        budget_bytes=budget_bytes,
        group_size=cost.group_size,
        symmetric=cost.symmetric,
        solver=sol.solver,
        lower_bound=min(sol.lower_bound, predicted),  # a bound above the value is float rounding
        copy_bytes=copy_bytes,
    )


def choose(nbytes: np.ndarray, damage: np.ndarray, valid: np.ndarray, budget_bytes: int, solver: str = "auto",
           node_limit: int = MILP_NODE_LIMIT, mip_rel_gap: float = 1e-6, time_limit: float = 600.0) -> Solution:
    """The solver step of `allocate` on padded option arrays (see solvers.py); the caller checks feasibility."""
    sol = solve_lagrangian(nbytes, damage, valid, budget_bytes)
    lag_damage = total(damage, sol.choice)
    if solver == "milp" or (solver == "auto" and relative_gap(lag_damage, sol.lower_bound) > AUTO_MILP_ABOVE_GAP):
        exact = solve_milp(nbytes, damage, valid, budget_bytes, node_limit=node_limit, mip_rel_gap=mip_rel_gap,
                           time_limit=time_limit)
        if exact is None:
            sol = Solution(sol.choice, sol.lower_bound, "lagrangian (milp timed out)")
        elif total(damage, exact.choice) <= lag_damage:
            sol = Solution(exact.choice, max(exact.lower_bound, sol.lower_bound), exact.solver)
    return sol


def copies_bytes(layout: ModelLayout, bits: int | None, group_size: int, symmetric: bool) -> int:
    """Stored bytes of a `bits` copy of every routed expert (all its projections); 0 when bits is None."""
    if bits is None:
        return 0
    return sum(m.num_experts * expert_bytes(m, ALL_PROJS, bits, group_size, symmetric) for m in layout.moe_layers)


def to_bit_plan(
    allocation: Allocation, layout: ModelLayout, group_size: int | None = None, symmetric: bool | None = None
) -> BitPlan:
    """The BitPlan of an allocation: each item's bits on every projection it covers; linears by path.

    `group_size` and `symmetric` default to the cost table's; other values are refused, since the byte counts the
    allocation respected hold only for those.
    """
    for name, given, measured in (("group_size", group_size, allocation.group_size),
                                  ("symmetric", symmetric, allocation.symmetric)):
        if given is not None and given != measured:
            raise MoecompressError(
                f"{name}={given!r} differs from the cost table's {measured!r}, for which the bytes were budgeted"
            )
    experts = {m.experts_path: {p.name: [None] * m.num_experts for p in m.projs} for m in layout.moe_layers}
    linears = {}
    for it, b in zip(allocation.items, allocation.bits):
        if it.kind == "linear":
            linears[it.path] = b
            continue
        projs = experts.get(it.path, {})
        names = tuple(projs) if it.proj == ALL_PROJS else (it.proj,)
        if not projs or not set(names) <= set(projs) or not 0 <= it.expert < len(projs[names[0]]):
            raise MoecompressError(f"item {it.key} names no expert projection of this model")
        for proj in names:
            projs[proj][it.expert] = b
    for path, projs in experts.items():
        for proj, bits in projs.items():
            if None in bits:
                raise MoecompressError(f"the allocation gives no bits to {path}.{bits.index(None)}.{proj}")
    return BitPlan(
        group_size=allocation.group_size,
        symmetric=allocation.symmetric,
        experts={path: {proj: tuple(bits) for proj, bits in projs.items()} for path, projs in experts.items()},
        linears=linears,
    )
