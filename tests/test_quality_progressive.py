"""Progressive allocation (pipeline/progressive.py) and in-context sensitivity (estimate_costs(context_model=...))."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from moecompress.allocate import AllocationRules, Budget, allocate
from moecompress.arch import describe, proj_weights
from moecompress.arch.adapters import set_proj_weights
from moecompress.artifacts.cost_table import CostItem, CostTable
from moecompress.calibrate import CalibrationData, CalibrationOptions, calibrate
from moecompress.errors import MoecompressError
from moecompress.format.sizes import matrix_bytes
from moecompress.pipeline.progressive import ProgressiveOptions, most_damaging, progressive_allocation
from moecompress.quantize.rtn import fake_quantize
from moecompress.sensitivity import SensitivityOptions, estimate_costs
from test_allocate import tiny_layout

BITS = (2, 3, 4, 8)


def table(layout, scale: dict[str, float] | None = None, seed: int = 0) -> CostTable:
    """Per-projection items of `layout`, damage s x 4^-bits with s random (or from `scale` by key)."""
    rng = np.random.default_rng(seed)
    items = []
    for m in layout.moe_layers:
        for e in range(m.num_experts):
            for p in m.projs:
                key = f"{m.experts_path}.{e}.{p.name}"
                s = (scale or {}).get(key, float(rng.lognormal(0, 1)))
                items.append(CostItem("expert", m.experts_path, p.name, e, m.layer, p.in_features * p.out_features,
                                      BITS, tuple(s * 4.0**-b for b in BITS),
                                      tuple(matrix_bytes(p.out_features, p.in_features, b, 32, False) for b in BITS)))
    return CostTable(32, False, "synthetic", tuple(items))


def test_most_damaging_takes_the_fewest_items_covering_the_share():
    layout = tiny_layout()
    a = allocate(table(layout), Budget(avg_bits=2.5))
    free = {it.key for it in a.items}
    chosen = {it.key: it.damage[it.bits.index(b)] for it, b in zip(a.items, a.bits)}
    fixed = most_damaging(a, free, 0.5)
    total = sum(chosen.values())
    assert sum(chosen[k] for k in fixed) >= 0.5 * total
    assert sum(chosen[k] for k in fixed[:-1]) < 0.5 * total  # one fewer would not do
    assert min(chosen[k] for k in fixed) >= max(v for k, v in chosen.items() if k not in fixed)


def test_progressive_with_unchanged_costs_equals_one_shot_and_respects_the_budget():
    layout = tiny_layout()
    cost = table(layout)
    one = allocate(cost, Budget(avg_bits=2.5), solver="milp")
    seen = []

    def reestimate(plan):
        seen.append(plan)
        return cost

    prog, history = progressive_allocation(cost, Budget(avg_bits=2.5), AllocationRules(candidates=BITS), layout,
                                           reestimate, ProgressiveOptions(rounds=2, fix_share=0.5), solver="milp")
    assert len(seen) == 2 and [h["round"] for h in history] == [0, 1, 2]
    assert prog.bits == one.bits  # pins at an optimum leave that optimum feasible and optimal
    assert prog.bytes <= prog.budget_bytes == one.budget_bytes
    assert 0 < history[1]["pinned"] < history[2]["pinned"] < len(cost.items)


def test_progressive_moves_bits_to_items_that_became_damaging_and_keeps_the_pinned_ones():
    layout = tiny_layout()
    cost = table(layout, seed=1)
    rules = AllocationRules(candidates=BITS)
    first = allocate(cost, Budget(avg_bits=2.5), rules)
    fixed = set(most_damaging(first, {it.key for it in first.items}, 0.5))
    by_key = dict(zip((it.key for it in first.items), first.bits))
    victim = next(it.key for it in first.items if it.key not in fixed and by_key[it.key] == 2)
    worse = table(layout, seed=1, scale={victim: 1e6})  # in context, this item now hurts a lot

    final, _ = progressive_allocation(cost, Budget(avg_bits=2.5), rules, layout, lambda plan: worse,
                                      ProgressiveOptions(rounds=1, fix_share=0.5))
    got = dict(zip((it.key for it in final.items), final.bits))
    assert got[victim] > 2
    assert all(got[k] == by_key[k] for k in fixed)
    assert final.bytes <= final.budget_bytes


def test_progressive_options_are_checked():
    with pytest.raises(MoecompressError):
        ProgressiveOptions(rounds=-1)
    with pytest.raises(MoecompressError):
        ProgressiveOptions(fix_share=0)


@pytest.fixture(scope="module")
def tiny():
    from moecompress.arch.tiny import tiny_model

    torch.manual_seed(0)
    model = tiny_model("qwen3_moe")
    ids = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    data = CalibrationData(ids, torch.ones_like(ids))
    stats = calibrate(model, None, data, CalibrationOptions(samples=16, seq_len=32, batch_size=8, progress=False))
    return model, describe(model), [(i, m) for i, m, _ in data.batches(8)], stats


def _damages(table):
    return {it.key: it.damage for it in table.items}


def test_in_context_costs_use_the_context_inputs_and_the_original_weights(tiny):
    model, layout, batches, stats = tiny
    opts = SensitivityOptions("loss_aware", "projection", holdout=0.5)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = estimate_costs(model, layout, stats, opts, (2, 3, 16), 32, calibration_batches=batches,
                               progress=False)
        same = estimate_costs(model, layout, stats, opts, (2, 3, 16), 32, calibration_batches=batches,
                              progress=False, context_model=model)
        assert _damages(same) == _damages(plain)  # the model as its own context: exactly the one-shot costs
        context = copy.deepcopy(model)  # every expert at 2 bits
        for m in layout.moe_layers:
            experts = context.get_submodule(m.experts_path)
            for p in m.projs:
                w = proj_weights(experts, m, p).detach()
                set_proj_weights(experts, m, p, fake_quantize(w.float(), 2, 32, False).to(w.dtype))
        ctx = estimate_costs(model, layout, stats, opts, (2, 3, 16), 32, calibration_batches=batches,
                             progress=False, context_model=context)
    finally:
        torch.set_num_threads(n)
    first = layout.moe_layers[0].experts_path
    # the first MoE layer sees unquantized inputs in both, but other gradients; later layers other inputs too
    assert _damages(ctx) != _damages(plain)
    assert all(d[-1] == 0.0 and d[0] >= d[1] >= 0 for d in _damages(ctx).values())
    assert "in-context" in ctx.method and "in-context" not in plain.method
    assert any(k.startswith(first) for k in _damages(ctx))
    with pytest.raises(MoecompressError, match="context_model"):
        estimate_costs(model, layout, stats, dataclasses.replace(opts, method="hessian"), (2, 16), 32,
                       context_model=context, progress=False)
