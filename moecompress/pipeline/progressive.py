"""Progressive allocation: allocate, fix the most damaging items, re-estimate the rest where the model is quantized.

A one-shot allocation measures every item's damage in the unquantized model. Once most experts are quantized,
each block sees other inputs (the upstream error) and the loss reacts to it through other gradients (the
downstream error), so the damages change. Progressive allocation, in `rounds` rounds:

1. allocate with the current costs;
2. fix (pin at their allocated bits) the items that carry the largest predicted damage, the fewest whose damage
   sums to `fix_share` of the not-yet-fixed items' total;
3. re-estimate the costs of all items in the context of the model quantized as planned (`reestimate(plan)`, e.g.
   sensitivity.estimate_costs with `context_model`), and go to 1 with the fixed items pinned.

The pinned items keep their bytes inside the same budget, so the last allocation spends exactly the budget; since a
pinned item's options are one, its (re-estimated) damage does not change the choice of the others. Pure
orchestration: the caller gives the allocator's inputs and the re-estimation; nothing is read or written here.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from moecompress.allocate import Allocation, AllocationRules, Budget, allocate, to_bit_plan
from moecompress.arch.layout import ModelLayout
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.artifacts.cost_table import CostTable
from moecompress.errors import MoecompressError


@dataclass(frozen=True)
class ProgressiveOptions:
    rounds: int = 1  # re-estimations after the first allocation (0: one-shot allocation)
    fix_share: float = 0.5  # share of the free items' predicted damage whose items are pinned each round

    def __post_init__(self):
        if self.rounds < 0 or not 0 < self.fix_share <= 1:
            raise MoecompressError(f"progressive allocation: rounds >= 0 and 0 < fix_share <= 1; got {self}")


def most_damaging(allocation: Allocation, free: set[str], share: float) -> list[str]:
    """Keys of the fewest free items whose chosen damage sums to at least `share` of the free items' total
    (largest damage first; ties by the cost table's order)."""
    chosen = [(it.damage[it.bits.index(b)], i, it.key) for i, (it, b) in enumerate(zip(allocation.items,
                                                                                        allocation.bits))
              if it.key in free]
    total = sum(d for d, _, _ in chosen)
    out, acc = [], 0.0
    for d, _, key in sorted(chosen, key=lambda x: (-x[0], x[1])):
        if total <= 0 or acc >= share * total:
            break
        out.append(key)
        acc += d
    return out


def progressive_allocation(cost: CostTable, budget: Budget, rules: AllocationRules, layout: ModelLayout,
                           reestimate: Callable[[BitPlan], CostTable],
                           options: ProgressiveOptions = ProgressiveOptions(), solver: str = "auto",
                           ) -> tuple[Allocation, list[dict]]:
    """The final allocation and one record per round: pinned items, predicted damage, solver and gap."""
    pins = dict(rules.pins)
    allocation = allocate(cost, budget, rules, solver)
    history = [{"round": 0, "pinned": 0, "damage": allocation.damage, "solver": allocation.solver,
                "gap": allocation.gap}]
    for r in range(1, options.rounds + 1):
        free = {it.key for it in allocation.items if it.key not in pins}
        fix = most_damaging(allocation, free, options.fix_share)
        bits = dict(zip((it.key for it in allocation.items), allocation.bits))
        pins.update({key: bits[key] for key in fix})
        cost = reestimate(to_bit_plan(allocation, layout))
        allocation = allocate(cost, budget, dataclasses.replace(rules, pins=dict(pins)), solver)
        history.append({"round": r, "pinned": len(pins) - len(rules.pins), "damage": allocation.damage,
                        "solver": allocation.solver, "gap": allocation.gap})
    return allocation, history
