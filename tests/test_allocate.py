"""Allocation: budgets respected, optimal where checkable, rules honoured, and the artifacts around it exact."""
from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest

from moecompress.allocate import (
    AllocationRules,
    Budget,
    allocate,
    allocation_report,
    plot_bits_heatmap,
    to_bit_plan,
)
from moecompress.allocate.rules import metadata_bytes
from moecompress.arch.layout import ModelLayout, MoELayer, ProjSpec
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.artifacts.cost_table import CostItem, CostTable, build_cost_table, item_key
from moecompress.errors import MoecompressError
from moecompress.format.sizes import matrix_bytes

SOLVERS = ("milp", "lagrangian")


def random_table(rng, n_items, bits=(2, 3, 4), group_size=64) -> CostTable:
    """Items of varied sizes whose damage falls roughly 4x per bit, with noise; bytes from format/sizes.py."""
    items = []
    for i in range(n_items):
        out_f, in_f = int(rng.choice([64, 128, 256])), int(rng.choice([64, 128, 192]))
        scale = rng.lognormal(0, 1.5)
        damage = tuple(scale * 4.0**-b * rng.uniform(0.5, 1.5) for b in bits)
        nbytes = tuple(matrix_bytes(out_f, in_f, b, group_size, False) for b in bits)
        items.append(CostItem("linear", f"m.{i}", None, None, i % 3, out_f * in_f, bits, damage, nbytes))
    return CostTable(group_size=group_size, symmetric=False, method="synthetic", items=tuple(items))


def brute_force(cost: CostTable, budget_bytes: int) -> float:
    best = np.inf
    for pick in itertools.product(*(range(len(it.bits)) for it in cost.items)):
        if sum(it.bytes[j] for it, j in zip(cost.items, pick)) <= budget_bytes:
            best = min(best, sum(it.damage[j] for it, j in zip(cost.items, pick)))
    return best


def budget_range(cost: CostTable) -> tuple[int, int]:
    return sum(it.bytes[0] for it in cost.items), sum(it.bytes[-1] for it in cost.items)


def tiny_layout(n_layers=3, n_experts=4, hidden=64, inter=32) -> ModelLayout:
    projs = (ProjSpec("gate_up", "gate_up_proj", hidden, 2 * inter), ProjSpec("down", "down_proj", inter, hidden))
    moes = tuple(
        MoELayer(
            layer=i, decoder_layer=i, block_path=f"model.layers.{i}.mlp", experts_path=f"model.layers.{i}.mlp.experts",
            router_path=f"model.layers.{i}.mlp.gate", num_experts=n_experts, top_k=2, projs=projs, transposed=False,
            interleaved=False,
        )
        for i in range(n_layers)
    )
    attn = tuple(f"model.layers.{i}.self_attn.{p}_proj" for i in range(n_layers) for p in "qo")
    return ModelLayout("qwen3_moe", hidden, "model.layers", n_layers, moes, attention_linears=attn)


def layout_table(layout, rng, granularity="expert", linears=False, bits=(2, 3, 4, 8, 16), symmetric=False):
    damage = {}
    for m in layout.moe_layers:
        for e in range(m.num_experts):
            for proj in ["*"] if granularity == "expert" else [p.name for p in m.projs]:
                s = rng.lognormal(0, 1)
                damage[item_key(m.experts_path, e, proj)] = {b: s * 4.0**-b for b in bits}
    shapes = {p: (layout.hidden_size, layout.hidden_size) for p in layout.attention_linears} if linears else {}
    for p in shapes:
        damage[p] = {b: rng.lognormal(0, 1) * 4.0**-b for b in bits}
    return build_cost_table(layout, damage, group_size=32, symmetric=symmetric, method="synthetic",
                            linear_shapes=shapes), shapes


def plan_bytes(plan: BitPlan, layout: ModelLayout, linear_shapes) -> int:
    """Bytes of a BitPlan recomputed from format/sizes.py, independently of the allocation's bookkeeping."""
    total = 0
    for m in layout.moe_layers:
        for p in m.projs:
            for b in plan.experts[m.experts_path][p.name]:
                total += matrix_bytes(p.out_features, p.in_features, b, plan.group_size, plan.symmetric)
    for path, b in plan.linears.items():
        total += matrix_bytes(*linear_shapes[path], b, plan.group_size, plan.symmetric)
    return total


@pytest.mark.parametrize("solver", (*SOLVERS, "auto"))
def test_budget_respected_and_optimal_against_brute_force(solver):
    rng = np.random.default_rng(1)
    for _ in range(8):
        cost = random_table(rng, 6)
        lo, hi = budget_range(cost)
        for budget_bytes in rng.integers(lo, hi, size=4):
            a = allocate(cost, Budget(bytes=int(budget_bytes)), solver=solver)
            chosen = [it.bits.index(b) for it, b in zip(cost.items, a.bits)]
            assert a.bytes == sum(it.bytes[j] for it, j in zip(cost.items, chosen)) <= budget_bytes
            assert a.damage == pytest.approx(sum(it.damage[j] for it, j in zip(cost.items, chosen)), rel=1e-12)
            best = brute_force(cost, int(budget_bytes))
            assert a.lower_bound <= best * (1 + 1e-9)
            assert a.damage >= best * (1 - 1e-12)
            if solver == "milp":
                assert a.damage == pytest.approx(best, rel=1e-6)
            if solver == "auto":  # the MILP runs unless the Lagrangian answer is proven within 1e-4
                assert a.damage <= best * (1 + 1e-4)


def test_more_budget_never_more_damage():
    cost = random_table(np.random.default_rng(2), 40)
    lo, hi = budget_range(cost)
    damages = [allocate(cost, Budget(bytes=int(b)), solver="milp").damage for b in np.linspace(lo, hi, 12)]
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(damages, damages[1:]))
    assert damages[-1] == pytest.approx(sum(it.damage[-1] for it in cost.items))


def test_lagrangian_gap_small_on_200_items():
    cost = random_table(np.random.default_rng(3), 200, bits=(2, 3, 4, 8, 16))
    for avg_bits in (2.8, 3.5, 4.6, 6.0):
        exact = allocate(cost, Budget(avg_bits=avg_bits), solver="milp")
        fast = allocate(cost, Budget(avg_bits=avg_bits), solver="lagrangian")
        assert fast.bytes <= fast.budget_bytes == exact.budget_bytes
        assert exact.damage <= fast.damage * (1 + 1e-9)
        assert (fast.damage - exact.damage) / exact.damage < 0.02
        assert fast.lower_bound <= exact.damage * (1 + 1e-9) and fast.gap < 0.02


@pytest.mark.parametrize("solver", SOLVERS)
def test_pins_and_layer_minimums_honoured(solver):
    layout = tiny_layout()
    cost, _ = layout_table(layout, np.random.default_rng(4))
    rules = AllocationRules(
        candidates=(2, 3, 4, 8),
        layer_min_bits={1: 4},
        pins={"model.layers.0.mlp.experts.*": 8, "model.layers.2.mlp.experts.3": 2},
    )
    a = allocate(cost, Budget(avg_bits=6.0), rules, solver=solver)
    for it, b in zip(a.items, a.bits):
        if it.layer == 0:
            assert b == 8
        elif it.layer == 1:
            assert b in (4, 8)
        elif it.expert == 3:
            assert b == 2
        else:
            assert b in (2, 3, 4, 8)
    assert a.bytes <= a.budget_bytes


def test_rule_errors_name_the_problem():
    layout = tiny_layout()
    cost, _ = layout_table(layout, np.random.default_rng(5), bits=(2, 4))
    with pytest.raises(MoecompressError, match="matches no item"):
        allocate(cost, Budget(avg_bits=4), AllocationRules(pins={"model.layers.9.*": 4}))
    with pytest.raises(MoecompressError, match="has costs only for"):
        allocate(cost, Budget(avg_bits=4), AllocationRules(pins={"model.layers.0.mlp.experts.0": 3}))
    with pytest.raises(MoecompressError, match="can take no bit-width"):
        allocate(cost, Budget(avg_bits=4), AllocationRules(min_bits=8))
    with pytest.raises(MoecompressError, match="names layer 7"):
        allocate(cost, Budget(avg_bits=4), AllocationRules(layer_min_bits={7: 4}))
    with pytest.raises(MoecompressError, match="exactly one"):
        Budget(avg_bits=3, megabytes=1)
    with pytest.raises(MoecompressError, match="unknown solver"):
        allocate(cost, Budget(avg_bits=4), solver="greedy")


def test_infeasible_budget_states_the_minimum_in_the_users_unit():
    layout = tiny_layout()
    cost, _ = layout_table(layout, np.random.default_rng(6))
    rules = AllocationRules(layer_min_bits={0: 4})
    for budget, unit in ((Budget(avg_bits=2.0), "avg_bits"), (Budget(megabytes=0.01), "megabytes")):
        with pytest.raises(MoecompressError, match="smallest feasible budget") as err:
            allocate(cost, budget, rules)
        msg = str(err.value)
        minimum = float(re.search(rf"smallest feasible budget.*? is {unit}=([0-9.]+)", msg).group(1))
        assert "megabytes=" in msg and "avg_bits=" in msg
        a = allocate(cost, Budget(**{unit: minimum}), rules)  # the stated minimum is feasible ...
        assert all(b == 2 or it.layer == 0 for it, b in zip(a.items, a.bits))
        below = round(minimum - 1e-4, 4) if unit == "avg_bits" else round(minimum - 1e-7, 7)
        with pytest.raises(MoecompressError):  # ... and the next value down is not
            allocate(cost, Budget(**{unit: below}), rules)


@pytest.mark.parametrize("symmetric", (False, True))
@pytest.mark.parametrize("group_size", (32, 64, 128))
def test_nominal_avg_bits_buy_exactly_uniform_bytes(group_size, symmetric):
    """avg_bits b (nominal) is the byte count of every expert at b bits, metadata included; 2.5 lies halfway."""
    layout = tiny_layout(hidden=128, inter=64)
    cost = build_cost_table(layout, {item_key(m.experts_path, e, "*"): {b: 4.0**-b for b in (2, 3, 4, 8)}
                                     for m in layout.moe_layers for e in range(m.num_experts)},
                            group_size=group_size, symmetric=symmetric, method="t")
    numel = sum(it.numel for it in cost.items)
    for b in (2, 3, 4, 8):
        uniform = sum(it.bytes[it.bits.index(b)] for it in cost.items)
        assert Budget(avg_bits=b).to_bytes(numel, metadata_bytes(cost.items)) == uniform
        a = allocate(cost, Budget(avg_bits=b))
        assert a.bits == (b,) * len(cost.items)  # equal damage per item: the uniform plan is the optimum
        r = allocation_report(a)
        assert r["avg_bits"] == b and r["stored_bits"] == pytest.approx(uniform * 8 / numel)
        if group_size <= 64:  # divides every in_features (64 and 128): (2 or 3 bytes) x 8 bits per group
            assert r["stored_bits"] == pytest.approx(b + (16 if symmetric else 24) / group_size)
    half = Budget(avg_bits=2.5).to_bytes(numel, metadata_bytes(cost.items))
    assert half == (sum(it.bytes[0] for it in cost.items) + sum(it.bytes[1] for it in cost.items)) // 2
    assert allocation_report(allocate(cost, Budget(avg_bits=2.5)))["avg_bits"] == pytest.approx(2.5)


def test_cost_table_json_round_trip_exact(tmp_path):
    cost = random_table(np.random.default_rng(7), 30)
    odd = CostItem("expert", "x.experts", "*", 0, None, 64, (2, 16), (0.1 + 0.2, 5e-324), (40, 128))
    cost = CostTable(cost.group_size, True, "hessian-trace rtn", cost.items + (odd,))
    cost.save(tmp_path / "cost.json")
    back = CostTable.load(tmp_path / "cost.json")
    assert back == cost
    assert json.dumps(back.to_json()) == json.dumps(cost.to_json())
    broken = cost.to_json()
    broken["items"][0]["weights"] = broken["items"][0].pop("numel")
    with pytest.raises(MoecompressError, match="malformed cost table item"):
        CostTable.from_json(broken)


def test_build_cost_table_checks_coverage():
    layout = tiny_layout(n_layers=1, n_experts=2)
    full = {item_key("model.layers.0.mlp.experts", e, "*"): {4: 1.0} for e in range(2)}
    with pytest.raises(MoecompressError, match="no damage given"):
        build_cost_table(layout, dict(list(full.items())[:1]), group_size=32, symmetric=False, method="t")
    with pytest.raises(MoecompressError, match="both cover"):
        build_cost_table(layout, {**full, "model.layers.0.mlp.experts.1.down": {4: 1.0}}, group_size=32,
                         symmetric=False, method="t")
    with pytest.raises(MoecompressError, match="neither a routed expert"):
        build_cost_table(layout, {**full, "lm_head": {4: 1.0}}, group_size=32, symmetric=False, method="t")


@pytest.mark.parametrize("granularity,linears,symmetric", [("expert", False, False), ("proj", True, True)])
@pytest.mark.parametrize("solver", SOLVERS)
def test_bit_plan_bytes_equal_allocation_bytes(granularity, linears, symmetric, solver):
    layout = tiny_layout()
    cost, shapes = layout_table(layout, np.random.default_rng(8), granularity, linears, symmetric=symmetric)
    a = allocate(cost, Budget(avg_bits=3.7), solver=solver)
    plan = to_bit_plan(a, layout, group_size=32, symmetric=symmetric)
    assert plan_bytes(plan, layout, shapes) == a.bytes <= a.budget_bytes
    expert_numel = sum(it.numel for it in a.items if it.kind == "expert")  # linears spend the budget, not widen it
    meta = (2 if symmetric else 3) / 32  # bytes of scales (+ zero-points) per weight at group 32
    assert a.budget_bytes == int(3.7 * expert_numel / 8 + meta * expert_numel)
    assert BitPlan.from_json(plan.to_json()) == plan
    if granularity == "expert":  # one bit-width per expert, on all of its projections
        for projs in plan.experts.values():
            assert projs["gate_up"] == projs["down"]
    assert set(plan.linears) == set(shapes)
    with pytest.raises(MoecompressError, match="differs from the cost table"):
        to_bit_plan(a, layout, group_size=64)


def test_report_and_heatmap(tmp_path):
    layout = tiny_layout()
    cost, _ = layout_table(layout, np.random.default_rng(9), "proj")
    a = allocate(cost, Budget(avg_bits=4.0))
    r = allocation_report(a)
    assert r["bytes"] == a.bytes and r["damage"] == a.damage
    numel = sum(it.numel for it in a.items)
    assert r["stored_bits"] == pytest.approx(a.bytes * 8 / numel) and r["stored_bits"] <= 4.0 + 0.75
    assert r["avg_bits"] == pytest.approx(r["stored_bits"] - 0.75)  # no 16-bit item here: every weight has 0.75
    assert r["avg_bits"] <= 4.0 and "avg_bits_nominal" not in r and "avg_bits_effective" not in r
    assert sum(h["items"] for h in r["histogram"].values()) == len(a.items)
    assert sum(h["weight_share"] for h in r["histogram"].values()) == pytest.approx(1.0)
    assert set(r["per_layer_avg_bits"]) == {0, 1, 2}
    assert r["fraction_of_bf16"] == pytest.approx(a.bytes / (2 * numel))
    assert r["uniform"][4]["bytes"] == a.budget_bytes  # avg_bits is nominal: 4.0 buys exactly uniform 4-bit
    assert r["damage"] <= r["uniform"][3]["damage"]  # uniform 3-bit fits, so the optimum is at least as good
    json.dumps(r)
    for what in (a, to_bit_plan(a, layout)):
        plot_bits_heatmap(what, layout, tmp_path / "bits.png")
        assert (tmp_path / "bits.png").stat().st_size > 1000


def popularity_like_table(rng, layers=4, experts=12) -> CostTable:
    """Tied costs as the popularity-only baseline makes them: gate_up and down of an expert share one damage curve
    (token share x 4^-bits) and differ only in bytes, and experts of equal load tie exactly."""
    items = []
    for layer in range(layers):
        load = rng.integers(1, 5, size=experts) / 10  # few distinct values: many exact ties
        for e in range(experts):
            for proj, (o, i) in (("gate_up", (128, 64)), ("down", (64, 64))):
                bits = (2, 3, 4, 8)
                items.append(CostItem("expert", f"m.{layer}.experts", proj, e, layer, o * i, bits,
                                      tuple(load[e] * 4.0**-b for b in bits),
                                      tuple(matrix_bytes(o, i, b, 64, False) for b in bits)))
    return CostTable(group_size=64, symmetric=False, method="popularity-like", items=tuple(items))


@pytest.mark.parametrize("solver", ("milp", "auto", "lagrangian"))
def test_allocation_is_reproducible_on_tied_costs(solver):
    cost = popularity_like_table(np.random.default_rng(3))
    plans = {allocate(cost, Budget(avg_bits=avg), solver=solver).bits for avg in (2.5,) for _ in range(3)}
    assert len(plans) == 1
    # the wall-clock safety net does not change the answer as long as it is not reached
    a = allocate(cost, Budget(avg_bits=2.5), solver=solver, time_limit=1000.0)
    b = allocate(cost, Budget(avg_bits=2.5), solver=solver, time_limit=300.0)
    assert a.bits == b.bits and a.solver == b.solver


def test_milp_reaching_the_time_limit_keeps_the_lagrangian_answer():
    cost = random_table(np.random.default_rng(5), 300, bits=(2, 3, 4, 8))
    lo, hi = budget_range(cost)
    budget = Budget(bytes=(lo + hi) // 3)
    lag = allocate(cost, budget, solver="lagrangian")
    timed_out = allocate(cost, budget, solver="milp", time_limit=1e-6)
    assert timed_out.solver == "lagrangian (milp timed out)"
    assert timed_out.bits == lag.bits and timed_out.bytes <= timed_out.budget_bytes
    # a node limit, unlike a time limit, bounds the work the same way on every machine: same answer every time
    runs = {allocate(cost, budget, solver="milp", node_limit=50).bits for _ in range(2)}
    assert len(runs) == 1
