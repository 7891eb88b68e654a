"""The group-size screen's pieces (eval/bench_quality_groups.py): quantization at a group size with no option where it
does not divide, cost tables with the bytes of that group size, the data-free popularity curve, budgets respected."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from moecompress.allocate import AllocationRules, Budget, allocate
from moecompress.allocate.groups import allocate_groups
from moecompress.artifacts.quantized import expert_key
from moecompress.format.sizes import matrix_bytes

_spec = importlib.util.spec_from_file_location("bench_quality_groups", Path(__file__).resolve().parents[1] /
                                               "eval/bench_quality_groups.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quantize_cost_tables_and_allocation(calibrated_qwen3):
    model, layout, batches, stats = calibrated_qwen3
    q = {g: bench.quantize_at(model, layout, stats, g, "cpu") for g in (32, 128)}
    keys = {expert_key(m.experts_path, p.name, e) for m in layout.moe_layers for p in m.projs
            for e in range(m.num_experts)}
    for b in bench.BITS:
        assert not q[128][b].weights  # 128 divides no in_features here: no option
        assert set(q[32][b].weights) == keys
        assert {(w.bits, w.group_size) for w in q[32][b].weights.values()} == {(b, 32)}
    damage = {f"{m.experts_path}.{e}.{p.name}": {b: float(4.0 ** -b * (e + 1)) for b in bench.BITS}
              for m in layout.moe_layers for p in m.projs for e in range(m.num_experts)}
    tables = {g: bench.cost_table(layout, damage, g, "synthetic") for g in (32, 64, 128)}
    assert not tables[128].items and len(tables[32].items) == len(keys)
    shape = {f"{m.experts_path}.{e}.{p.name}": (p.out_features, p.in_features) for m in layout.moe_layers
             for p in m.projs for e in range(m.num_experts)}
    for g in (32, 64):
        for it in tables[g].items:
            assert it.bytes == tuple(matrix_bytes(*shape[it.key], b, g, False) for b in it.bits)
    ratio = bench.error_ratios(model, layout, [32, 64, 128])
    assert all(ratio[(b, 64)] == 1.0 for b in bench.BITS)
    assert all(ratio[(b, 32)] < 1.0 for b in bench.BITS)  # finer groups: smaller weight error
    assert not any(g == 128 for _, g in ratio)
    pop = bench.popularity_at(tables[32], stats, ratio)
    it = pop.items[5]
    load = float(stats.tokens[it.layer, it.expert]) / float(stats.tokens[it.layer].sum())
    assert it.damage == pytest.approx(tuple(load * 4.0 ** -b * ratio[(b, 32)] for b in it.bits), rel=1e-12)
    rules = AllocationRules(candidates=bench.BITS)
    budget = allocate(tables[64], Budget(avg_bits=2.5), rules).budget_bytes
    a = allocate_groups({g: t for g, t in tables.items() if t.items}, budget, rules)
    assert a.bytes <= budget and set(a.group_sizes) <= {32, 64} and len(a.keys) == len(keys)


def test_holdout_metrics_zero_kl_against_itself(calibrated_qwen3):
    model, _, batches, _ = calibrated_qwen3
    nll, kl, logits = bench.holdout_metrics(model, batches)
    nll2, kl2, _ = bench.holdout_metrics(model, batches, logits)
    assert kl2 == 0.0 and nll2 == nll and 0 < nll < 10
