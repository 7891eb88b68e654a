"""Low-bit copies of the experts (issue 12): the recipe option, the quantize stage's copies, expert_copies.safetensors,
the budget that counts them, and checkpoints without them."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import mixed_plan, quantize_tiny
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moecompress
from moecompress.allocate import Budget, allocate, allocation_report, copies_bytes
from moecompress.allocate.rules import metadata_bytes
from moecompress.arch.adapters import proj_weights
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.artifacts.cost_table import build_cost_table, item_key
from moecompress.artifacts.quantized import QuantizedTensors, expert_key
from moecompress.errors import MoecompressError
from moecompress.export.checkpoint import export_checkpoint
from moecompress.format.copies import COPIES_FILE, check_copies, copies_file, read_copy_group
from moecompress.format.files import write_manifest
from moecompress.format.pack import dequantize
from moecompress.format.sizes import matrix_bytes
from moecompress.format.spec import FormatSpec, copy_prefix
from moecompress.quantize.rtn import quantize_rtn
from moecompress.quantize.stage import QuantizeOptions, _quantize, expert_hessian, quantize_copies
from moecompress.recipe import recipe_from_dict
from moecompress.format.spec import read_spec
from moecompress.runtime.loading.verify import verify_checkpoint

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny qwen3_moe exported with a mixed plan (2..16 bits), once without and once with 2-bit copies (RTN)."""
    from conftest import _build

    tmp = tmp_path_factory.mktemp("copies")
    model = _build("qwen3_moe")
    layout, plan, quantized = quantize_tiny(model)
    plan2 = dataclasses.replace(plan, copy_bits=2)
    copies = quantize_copies(model, layout, plan2, None, QuantizeOptions(method="rtn"), progress=False)
    export_checkpoint(model, layout, plan, quantized, tmp / "plain", dtype=torch.float32)
    export_checkpoint(model, layout, plan2, quantized, tmp / "ck", dtype=torch.float32, copies=copies)
    return model, layout, plan2, tmp, quantized


def test_copies_dequantize_exactly_as_the_expert_quantized_at_copy_bits(exported):
    model, layout, plan, tmp, _ = exported
    spec = read_spec(tmp / "ck")
    assert spec.copy_bits == 2 and all(es.copy_bits == 2 for es in spec.experts.values())
    with safe_open(str(copies_file(tmp / "ck")), framework="pt") as handle:
        for m in layout.moe_layers:
            for p in m.projs:
                group = read_copy_group(handle, m.experts_path, p.name, 2)
                assert sorted(group) == ["qweight", "scales", "zeros"]
                assert group["qweight"].shape == (m.num_experts, p.out_features, p.in_features * 2 // 8)
                got = dequantize(group["qweight"], group["scales"], group["zeros"], 2, plan.group_size,
                                 p.in_features, torch.float32)  # [E, out, in]
                w = proj_weights(model.get_submodule(m.experts_path), m, p.name).detach().float()
                for e in range(m.num_experts):  # every expert, whatever its main bits (2..16)
                    want = quantize_rtn(w[e], 2, plan.group_size, plan.symmetric, "mse").dequantize(torch.float32)
                    assert torch.equal(got[e], want)
    m, p = layout.moe_layers[0], layout.moe_layers[0].projs[0]  # the other two ways to name the source
    a = read_copy_group(tmp / "ck", m.experts_path, p.name, 2)
    b = read_copy_group(copies_file(tmp / "ck"), m.experts_path, p.name, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gptq_copies_use_the_same_quantizer_as_the_main_copies(tiny_model):
    from moecompress.calibrate.dataset import CalibrationData
    from moecompress.calibrate.options import CalibrationOptions
    from moecompress.calibrate.run import calibrate

    model = tiny_model("qwen3_moe", num_hidden_layers=1)
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, None, CalibrationData(input_ids=ids, attention_mask=torch.ones_like(ids)),
                      CalibrationOptions(samples=8, seq_len=16, progress=False))
    from moecompress.arch.adapters import describe

    layout = describe(model)
    plan = dataclasses.replace(mixed_plan(layout), copy_bits=3)
    options = QuantizeOptions(method="gptq", min_tokens=4)
    copies = quantize_copies(model, layout, plan, stats, options, progress=False)
    assert len(copies.weights) == sum(m.num_experts * len(m.projs) for m in layout.moe_layers)
    for m in layout.moe_layers:
        for p in m.projs:
            w = proj_weights(model.get_submodule(m.experts_path), m, p.name).detach().float()
            for e in range(m.num_experts):
                h, _ = expert_hessian(stats, m.layer, p.name, e, options.min_tokens)
                direct, _ = _quantize(w[e], 3, plan, h, options)
                got = copies.weights[expert_key(m.experts_path, p.name, e)]
                assert got.bits == 3 and torch.equal(got.dequantize(torch.float32), direct.dequantize(torch.float32))


def test_checkpoint_with_copies_loads_and_computes_like_without(exported):
    tmp = exported[3]
    verify_checkpoint(tmp / "ck")
    with torch.no_grad():
        a = moecompress.from_pretrained(tmp / "ck").eval()(IDS).logits
        b = moecompress.from_pretrained(tmp / "plain").eval()(IDS).logits
    assert torch.equal(a, b)  # the copies are not used by the model as a whole


def test_checkpoint_without_copies_reads_as_none(exported):
    tmp = exported[3]
    spec = read_spec(tmp / "plain")
    assert spec.copy_bits is None and all(es.copy_bits is None for es in spec.experts.values())
    assert not copies_file(tmp / "plain").exists()
    check_copies(tmp / "plain", spec)
    with pytest.raises(MoecompressError, match="no low-bit copies"):
        read_copy_group(tmp / "plain", next(iter(spec.experts)), "down", 2)


def _rewrite(ck, mutate):
    path = ck / COPIES_FILE
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path)
    write_manifest(ck, {"format": "moecompress"})


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.pop(next(k for k in sorted(t) if k.endswith(".zeros"))), "is missing"),
    (lambda t: t.update(extra=torch.zeros(1)), "unexpected tensor extra"),
    (lambda t: t.update({k: v[:, :-1].contiguous() for k, v in t.items() if k.endswith(".scales")}), "expected F16"),
])
def test_malformed_copies_are_refused_by_verify(exported, tmp_path, mutate, message):
    import shutil

    ck = shutil.copytree(exported[3] / "ck", tmp_path / "ck")
    _rewrite(ck, mutate)
    with pytest.raises(MoecompressError, match=message):
        verify_checkpoint(ck)


def test_missing_copies_file_is_named(exported, tmp_path):
    import shutil

    ck = shutil.copytree(exported[3] / "ck", tmp_path / "ck")
    (ck / COPIES_FILE).unlink()
    write_manifest(ck, {"format": "moecompress"})
    with pytest.raises(MoecompressError, match=f"{COPIES_FILE} is missing"):
        verify_checkpoint(ck)


def test_export_needs_copies_exactly_when_the_plan_has_copy_bits(exported, tmp_path):
    model, layout, plan, _, quantized = exported
    with pytest.raises(MoecompressError, match="copy_bits 2"):
        export_checkpoint(model, layout, plan, quantized, tmp_path / "a")
    with pytest.raises(MoecompressError, match="no 2-bit copy"):
        export_checkpoint(model, layout, plan, quantized, tmp_path / "b", copies=QuantizedTensors(weights={}))


def test_spec_round_trip_and_bad_copy_bits():
    d = {"quant_method": "moecompress", "format_version": 1, "group_size": 32, "symmetric": False,
         "experts": {"model.layers.0.mlp.experts": {"num_experts": 2, "copy_bits": 2, "down": {"4": [0, 1]}}}}
    spec = FormatSpec.from_dict(d)
    assert spec.copy_bits == 2 and FormatSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert copy_prefix("model.layers.0.mlp.experts", "down", 2) == "model.layers.0.mlp.experts.down.copy.b2"
    for bad in (5, 16, "2", True):
        d["experts"]["model.layers.0.mlp.experts"]["copy_bits"] = bad
        with pytest.raises(MoecompressError, match="copy_bits must be one of 2, 3, 4, 8"):
            FormatSpec.from_dict(d)
    with pytest.raises(MoecompressError, match="copy_bits"):
        BitPlan(group_size=32, symmetric=False, experts={}, copy_bits=5)
    assert BitPlan.from_json(BitPlan(group_size=32, symmetric=False, experts={}, copy_bits=4).to_json()).copy_bits == 4
    assert BitPlan.from_json({"group_size": 32, "symmetric": False, "experts": {}}).copy_bits is None  # old plans


@pytest.mark.parametrize("bad", [1, 5, 16, 2.5, "two", True])
def test_recipe_copy_bits_must_be_2_3_4_or_8(bad):
    with pytest.raises(MoecompressError, match="store.copy_bits"):
        recipe_from_dict({"model": "m", "output": "o", "store": {"copy_bits": bad}})
    with pytest.raises(MoecompressError, match="unknown key store.bits"):
        recipe_from_dict({"model": "m", "output": "o", "store": {"bits": 2}})
    assert recipe_from_dict({"model": "m", "output": "o", "store": {"copy_bits": 3}}).store.copy_bits == 3
    assert recipe_from_dict({"model": "m", "output": "o"}).store.copy_bits is None


@pytest.mark.parametrize("symmetric", (False, True))
@pytest.mark.parametrize("budget_bits", (5.0, 6.0, 8.0))  # group 32: 2-bit main + 2-bit copies cost avg_bits 4.75
def test_budget_counts_the_copies(tiny_model, symmetric, budget_bits):
    from moecompress.arch.adapters import describe

    layout = describe(tiny_model("qwen3_moe"))
    rng = np.random.default_rng(0)
    damage = {item_key(m.experts_path, e, p.name): dict(zip((2, 3, 4, 8), rng.lognormal(0, 1) * 4.0 ** -np.arange(2, 6)))
              for m in layout.moe_layers for e in range(m.num_experts) for p in m.projs}
    cost = build_cost_table(layout, damage, group_size=32, symmetric=symmetric, method="t")
    extra = copies_bytes(layout, 2, 32, symmetric)
    assert extra == sum(m.num_experts * matrix_bytes(p.out_features, p.in_features, 2, 32, symmetric)
                        for m in layout.moe_layers for p in m.projs)
    budget = Budget(avg_bits=budget_bits)
    plain, with_copies = allocate(cost, budget), allocate(cost, budget, copy_bytes=extra)
    assert with_copies.budget_bytes == plain.budget_bytes
    assert with_copies.bytes + extra <= with_copies.budget_bytes  # main + copies within the budget
    assert with_copies.bytes < plain.bytes and with_copies.damage >= plain.damage
    r = allocation_report(with_copies)
    assert r["copy_bytes"] == extra and r["total_bytes"] == with_copies.bytes + extra
    numel = sum(it.numel for it in cost.items)
    assert r["avg_bits"] == pytest.approx(sum(it.numel * b for it, b in zip(cost.items, with_copies.bits)) / numel)
    assert r["avg_bits"] < budget_bits  # nominal bits of the main copies only
    assert Budget(avg_bits=budget_bits).to_bytes(numel, metadata_bytes(cost.items)) == r["budget_bytes"]


def test_budget_too_small_for_the_copies_names_the_minimum(tiny_model):
    from moecompress.arch.adapters import describe

    layout = describe(tiny_model("qwen3_moe"))
    damage = {item_key(m.experts_path, e, "*"): {b: 4.0**-b for b in (2, 3, 4, 8)}
              for m in layout.moe_layers for e in range(m.num_experts)}
    cost = build_cost_table(layout, damage, group_size=32, symmetric=False, method="t")
    extra = copies_bytes(layout, 2, 32, False)
    allocate(cost, Budget(avg_bits=2), copy_bytes=0)  # exactly uniform 2-bit: feasible without copies
    least = cost.items[0].bytes[0] * len(cost.items) + extra  # every item at 2 bits + the copies
    numel = sum(it.numel for it in cost.items)
    need = Budget(bytes=least).describe(least, numel, metadata_bytes(cost.items))
    assert need.startswith("bytes=") and f"{extra} bytes" not in need
    with pytest.raises(MoecompressError, match=f"low-bit copies' {extra} bytes, is avg_bits="):
        allocate(cost, Budget(avg_bits=3.5), copy_bytes=extra)
    with pytest.raises(MoecompressError, match=f"bytes={least},"):
        allocate(cost, Budget(bytes=least - 1), copy_bytes=extra)
    a = allocate(cost, Budget(bytes=least), copy_bytes=extra)
    assert set(a.bits) == {2} and a.bytes + extra <= a.budget_bytes


@pytest.mark.slow
def test_pipeline_writes_copies_within_the_budget(tmp_path):
    from helpers import make_job_inputs

    from moecompress.format.expert_stats import read_expert_stats
    from moecompress.pipeline.run import quantize

    inputs = make_job_inputs(tmp_path, 6, 200)
    recipe = {"model": str(inputs / "model"), "output": str(inputs / "run"), "dtype": "float32",
              "calibration": {"dataset": str(inputs / "data.jsonl.gz"), "samples": 8, "seq_len": 32, "batch_size": 4},
              "allocation": {"budget": {"avg_bits": 6.0}, "candidates": [2, 3, 4, 8]},  # the 2-bit copies take 2.75 stored bits of it
              "quantize": {"method": "gptq", "group_size": 32}, "tune": {"steps": 2, "batch_size": 2},
              "store": {"copy_bits": 2}}
    run = quantize(recipe_from_dict(recipe), progress=False)
    report = json.loads((run / "allocation" / "report.json").read_text())
    assert report["copy_bytes"] > 0 and report["bytes"] + report["copy_bytes"] <= report["budget_bytes"]
    ck = run / "checkpoint"
    verify_checkpoint(ck)
    copies = QuantizedTensors.load(run / "quantized", stem="copies")
    assert (ck / COPIES_FILE).stat().st_size > 0 and read_expert_stats(ck) is not None
    for key, qw in list(copies.weights.items())[:4]:
        path, proj, e = key.rsplit(".", 2)
        group = read_copy_group(ck, path, proj, 2)
        assert torch.equal(group["qweight"][int(e)], qw.packed()) and torch.equal(group["scales"][int(e)], qw.scales)
    with torch.no_grad():
        assert torch.isfinite(moecompress.from_pretrained(ck)(torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_the_expert_store_computes_misses_with_the_checkpoint_s_copies(exported):
    """End to end: the copies export wrote are what the runtime's expert store substitutes on a miss."""
    import re

    from moecompress.runtime.store import StoreConfig

    tmp = exported[3]
    with pytest.raises(MoecompressError, match="smallest workable budget") as err:
        moecompress.from_pretrained(tmp / "ck", store=StoreConfig(budget=1, copies_in_budget=False))
    smallest = int(re.search(r"at least (\d+) bytes", str(err.value)).group(1))
    with torch.no_grad():
        full = moecompress.from_pretrained(tmp / "ck").eval()(IDS).logits
        exact = moecompress.from_pretrained(tmp / "ck", store=StoreConfig(budget=smallest, copies_in_budget=False))
        base = (exact.eval()(IDS).logits - full).abs().max()  # summation order only (exact: tests/test_store.py)
        assert base < 1e-5
        low = moecompress.from_pretrained(tmp / "ck", store=StoreConfig(budget=smallest, copy_threshold=1.01,
                                                                        copies_in_budget=False))
        got = low.eval()(IDS).logits
    c = low.expert_store.counters()
    assert c["substitutions"] > 0 and c["copy_bytes"] > 0
    assert (got - full).abs().max() > 100 * max(base, 1e-7) and torch.isfinite(got).all()  # the 2-bit copies computed


def test_bundles_carry_their_experts_copies_within_the_budget(exported, monkeypatch):
    """`moecompress shard`: each server's bundle holds the copies of exactly the experts it holds (round trip: its
    rows equal the checkpoint's rows of those experts), an expert's copy is counted in its bytes (placement and
    bundle), verify passes, and deploy(..., expert_budget=) computes misses with them within the budget."""
    from edge_bundles import expert_bundles
    from test_store import _server_stores as _stores

    from moecompress.format.copies import copy_bytes, copy_experts
    from moecompress.format.headers import read_header
    from moecompress.format.sizes import DTYPE_BYTES
    from moecompress.runtime.edge import deploy
    from moecompress.runtime.store.store import DEFAULT_COPY_THRESHOLD
    from moecompress.shard.command import checkpoint_sizes

    tmp = exported[3]
    ck = tmp / "ck"
    spec = read_spec(ck)
    with_copies, _ = checkpoint_sizes(ck)
    without, _ = checkpoint_sizes(tmp / "plain")
    per_expert = copy_bytes(ck, spec)
    file_bytes = lambda d: sum(int(np.prod(h.shape)) * DTYPE_BYTES[h.dtype]  # noqa: E731
                               for h in read_header(copies_file(d)).values())
    assert sum(per_expert.values()) == file_bytes(ck) > 0
    paths = list(spec.experts)
    for (path, e), n in per_expert.items():
        assert with_copies[paths.index(path), e] == without[paths.index(path), e] + n
    out = expert_bundles(ck, tmp / "bundles", 2)
    held_by = {}
    for server in (0, 1):
        bundle = out / f"server-{server}"
        verify_checkpoint(bundle)
        sub = read_spec(bundle)
        assert sub.copy_bits == 2
        for path, es in sub.experts.items():
            for proj in es.groups:
                rows, all_rows = copy_experts(sub, path, proj), copy_experts(spec, path, proj)
                assert rows == es.held(proj) and len(rows) < len(all_rows)
                got, full = read_copy_group(bundle, path, proj, 2), read_copy_group(ck, path, proj, 2)
                assert sorted(got) == sorted(full)
                for part in full:
                    assert torch.equal(got[part], full[part][[all_rows.index(e) for e in rows]])
                held_by.setdefault(server, set()).update((path, e) for e in rows)
        assert file_bytes(bundle) == sum(per_expert[k] for k in held_by[server])
    with deploy(out, simulate=True, expert_budget=1 << 40) as d:
        stores = _stores(d)
        smallest = max(s.cache.min_budget for s in stores.values())
        total = min(sum(s.cache.layout.nbytes.values()) + s.cache.copy_bytes for s in stores.values())
    budget = max(smallest, total // 2)
    with deploy(out, simulate=True, expert_budget=budget) as d:
        logits = d(IDS, torch.ones_like(IDS))
        stores = _stores(d)
        counters = {n: s.counters() for n, s in stores.items()}
    assert torch.isfinite(logits).all() and set(counters) == {0, 1}
    for n, c in counters.items():
        assert c["copy_bytes"] == file_bytes(out / f"server-{n}") and c["copies_in_budget"]
        assert c["peak_bytes"] <= budget and c["misses"] + c["substitutions"] > 0
        config = stores[n].config  # misses under the default copy threshold run on the copies
        assert config.copy_threshold == DEFAULT_COPY_THRESHOLD[2] and config.copy_relative and config.copy_fetch
        assert set(stores[n].copies) == {layer for layer, _ in stores[n].cache.layout.nbytes}  # every layer held
    # every expert on its copy (no pinning, prefetch or fetch: nothing is read): the servers' copies compute what the
    # checkpoint's own copies compute (each bundle's rows at their experts' slots)
    from moecompress.runtime.store import StoreConfig
    from moecompress.runtime.store import store as store_module

    monkeypatch.setattr(store_module, "DEFAULT_PIN_SHARE", 0.0)
    monkeypatch.setitem(store_module.DEFAULT_COPY_THRESHOLD, 2, 1000.0)
    monkeypatch.setitem(store_module.DEFAULT_COPIES, "copy_fetch", False)
    monkeypatch.setitem(store_module.DEFAULTS, "prefetch", None)
    monkeypatch.setitem(store_module.DEFAULTS, "prefetch_refine", False)
    with deploy(out, simulate=True, expert_budget=budget) as d:
        got = d(IDS, torch.ones_like(IDS))
        counters = [s.counters() for s in _stores(d).values()]
    assert all(c["substitutions"] > 0 and c["misses"] == 0 and c["bytes_fetched"] == 0 for c in counters)
    config = StoreConfig(budget=1 << 40, copy_threshold=1000.0)
    with torch.no_grad():
        want = moecompress.from_pretrained(ck, store=config).eval()(IDS).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # float32: summation order only

