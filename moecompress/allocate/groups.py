"""Group size as a second allocation dimension: each item picks (bits, group_size) within one byte budget.

The quantized weights carry their group size each (artifacts/quantized.py), so a matrix at 2 bits with groups of 32
and one at 3 bits with groups of 128 can sit side by side; their bytes differ by the scales and zero-points they
carry (format/sizes.py), which this allocation counts. The input is one CostTable per group size, each with the
damages and bytes of its items at that group size; a table may cover only some items (a group size that does not
divide a projection's in_features has no option for it). Every item of any table gets exactly one option.

This is the allocation of the lever only: the on-disk format (format/spec.py) still holds one group size per
checkpoint, so a plan of mixed group sizes is evaluated with fake-quantized weights (eval/bench_quality_groups.py),
not exported.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from moecompress.allocate.allocation import SOLVERS, choose
from moecompress.allocate.rules import AllocationRules
from moecompress.allocate.solvers import cheapest, relative_gap, total
from moecompress.artifacts.cost_table import CostTable
from moecompress.errors import MoecompressError


@dataclass(frozen=True)
class GroupAllocation:
    keys: tuple[str, ...]  # item keys, in the order of first appearance over the tables (smallest group size first)
    bits: tuple[int, ...]  # chosen bit-width of each item
    group_sizes: tuple[int, ...]  # chosen group size of each item
    damage: float  # predicted total damage of the choice
    bytes: int  # stored bytes of the choice
    budget_bytes: int
    solver: str
    lower_bound: float  # proven: no choice within the budget has less damage

    @property
    def gap(self) -> float:
        return relative_gap(self.damage, self.lower_bound)

    def choice(self) -> dict[str, tuple[int, int]]:
        """Item key -> (bits, group_size)."""
        return {k: (b, g) for k, b, g in zip(self.keys, self.bits, self.group_sizes)}


def allocate_groups(tables: Mapping[int, CostTable], budget_bytes: int,
                    rules: AllocationRules = AllocationRules(), solver: str = "auto") -> GroupAllocation:
    """The least-damage (bits, group_size) of every item with total stored bytes <= `budget_bytes`.

    tables: group size -> the CostTable at that group size (its `group_size` must match the key; all symmetric or
    all not). rules: candidates and bit bounds as in `allocate`; pins are not supported here."""
    if not tables:
        raise MoecompressError("allocate_groups needs at least one cost table")
    if solver not in SOLVERS:
        raise MoecompressError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    if rules.pins:
        raise MoecompressError("allocate_groups does not take pins; pin items with `allocate` at one group size")
    if len({t.symmetric for t in tables.values()}) != 1:
        raise MoecompressError("the cost tables mix symmetric and asymmetric quantization")
    options: dict[str, list[tuple[int, int, int, float]]] = {}  # key -> [(bits, group, bytes, damage)]
    for g in sorted(tables):
        table = tables[g]
        if table.group_size != g:
            raise MoecompressError(f"the cost table given for group size {g} was made for {table.group_size}")
        for it, cols in zip(table.items, rules.allowed(table.items)):
            options.setdefault(it.key, []).extend((it.bits[j], g, it.bytes[j], it.damage[j]) for j in cols)
    keys = tuple(options)
    k = max(len(o) for o in options.values())
    nbytes = np.zeros((len(keys), k), dtype=np.int64)  # [n, K] options of each item, padded
    damage = np.zeros((len(keys), k))
    valid = np.zeros((len(keys), k), dtype=bool)
    for i, key in enumerate(keys):
        opts = options[key]
        nbytes[i, : len(opts)] = [o[2] for o in opts]
        damage[i, : len(opts)] = [o[3] for o in opts]
        valid[i, : len(opts)] = True
    least = int(total(nbytes, cheapest(nbytes, damage, valid)))
    if budget_bytes < least:
        raise MoecompressError(f"budget of {budget_bytes} bytes is too small: every item at its fewest bytes "
                               f"takes {least}")
    sol = choose(nbytes, damage, valid, budget_bytes, solver)
    chosen = [options[key][j] for key, j in zip(keys, sol.choice)]
    predicted = math.fsum(o[3] for o in chosen)
    return GroupAllocation(keys=keys, bits=tuple(o[0] for o in chosen), group_sizes=tuple(o[1] for o in chosen),
                           damage=predicted, bytes=int(sum(o[2] for o in chosen)), budget_bytes=int(budget_bytes),
                           solver=sol.solver, lower_bound=min(sol.lower_bound, predicted))
