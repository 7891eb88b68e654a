"""Group size as an allocation dimension (allocate/groups.py): budget respected, optimal against brute force, bytes
and partial tables exact."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from moecompress.allocate import AllocationRules, Budget, allocate
from moecompress.allocate.groups import allocate_groups
from moecompress.artifacts.cost_table import CostItem, CostTable
from moecompress.errors import MoecompressError
from moecompress.format.sizes import matrix_bytes

BITS = (2, 3, 4)


def tables(rng, n_items: int, groups=(32, 64, 128), skip_128=()) -> dict[int, CostTable]:
    """Per group size, items whose damage falls ~4x per bit and grows with the group size (noisy per item)."""
    shapes = [(int(rng.choice([64, 128])), int(rng.choice([128, 256]))) for _ in range(n_items)]
    scale = rng.lognormal(0, 1.5, n_items)
    out = {}
    for g in groups:
        items = []
        for i, (o, n) in enumerate(shapes):
            if g == 128 and i in skip_128:
                continue
            dmg = tuple(scale[i] * 4.0 ** -b * (g / 64) ** rng.uniform(0.1, 0.6) for b in BITS)
            items.append(CostItem("linear", f"m.{i}", None, None, 0, o * n, BITS, dmg,
                                  tuple(matrix_bytes(o, n, b, g, False) for b in BITS)))
        out[g] = CostTable(g, False, "synthetic", tuple(items))
    return out


def brute_force(ts: dict[int, CostTable], budget: int) -> float:
    opts = {}
    for g, t in ts.items():
        for it in t.items:
            opts.setdefault(it.key, []).extend(zip(it.bytes, it.damage))
    best = np.inf
    for pick in itertools.product(*opts.values()):
        if sum(b for b, _ in pick) <= budget:
            best = min(best, sum(d for _, d in pick))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_optimal_within_budget(seed):
    rng = np.random.default_rng(seed)
    ts = tables(rng, 5, skip_128=(1,))
    lo = sum(min(it.bytes[0] for t in ts.values() for it in t.items if it.key == k)
             for k in {it.key for it in ts[64].items})
    hi = sum(it.bytes[-1] for it in ts[32].items)
    for frac in (0.2, 0.5, 0.8):
        budget = int(lo + frac * (hi - lo))
        a = allocate_groups(ts, budget, AllocationRules(candidates=BITS), solver="milp")
        assert a.bytes <= budget
        want = brute_force(ts, budget)
        assert a.damage == pytest.approx(want, rel=1e-9)
        # bytes and damage of the reported choice, recomputed from the tables
        by = {(g, it.key): it for g, t in ts.items() for it in t.items}
        chosen = [by[(g, k)] for k, g in zip(a.keys, a.group_sizes)]
        assert a.bytes == sum(it.bytes[it.bits.index(b)] for it, b in zip(chosen, a.bits))
        assert a.damage == pytest.approx(sum(it.damage[it.bits.index(b)] for it, b in zip(chosen, a.bits)))
        assert ("m.1", 128) not in set(zip(a.keys, a.group_sizes))  # no such option


def test_one_group_equals_allocate():
    rng = np.random.default_rng(7)
    ts = tables(rng, 40, groups=(64,))
    for avg in (2.5, 3.0):
        base = allocate(ts[64], Budget(avg_bits=avg), AllocationRules(candidates=BITS))
        a = allocate_groups(ts, base.budget_bytes, AllocationRules(candidates=BITS))
        assert a.bits == base.bits and set(a.group_sizes) == {64}
        assert a.damage == pytest.approx(base.damage, rel=1e-12)


def test_more_group_sizes_never_worse_and_rules():
    rng = np.random.default_rng(3)
    ts = tables(rng, 60)
    budget = allocate(ts[64], Budget(avg_bits=2.5), AllocationRules(candidates=BITS)).budget_bytes
    one = allocate_groups({64: ts[64]}, budget, AllocationRules(candidates=BITS))
    three = allocate_groups(ts, budget, AllocationRules(candidates=BITS))
    assert three.bytes <= budget and three.damage <= one.damage * (1 + 1e-9)
    capped = allocate_groups(ts, budget, AllocationRules(candidates=BITS, max_bits=3))
    assert max(capped.bits) <= 3 and capped.bytes <= budget
    with pytest.raises(MoecompressError, match="too small"):
        allocate_groups(ts, 10, AllocationRules(candidates=BITS))
    with pytest.raises(MoecompressError, match="made for"):
        allocate_groups({32: ts[64]}, budget)
    with pytest.raises(MoecompressError, match="unknown solver"):
        allocate_groups(ts, budget, solver="greedy")
    with pytest.raises(MoecompressError, match="pins"):
        allocate_groups(ts, budget, AllocationRules(candidates=BITS, pins={"m.0": 2}))
