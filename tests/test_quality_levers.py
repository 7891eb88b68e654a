"""Post-quantization levers of issue 13: router re-adaptation (quantize/router.py) and block-wise output
reconstruction of the scales (quantize/blockwise.py), checked with numbers on tiny random models."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import fake_quant_reference, quantize_tiny

from moecompress.arch.adapters import describe
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.artifacts.quantized import QuantizedTensors
from moecompress.errors import MoecompressError
from moecompress.quantize.blockwise import BlockwiseOptions, reconstruct_blocks
from moecompress.quantize.capture import module_inputs, split_holdout
from moecompress.quantize.router import RouterFitOptions, fit_router, refit_routers, routing_kl, topk_agreement
from moecompress.quantize.tune import quantized_weights


def _batches(model, n: int = 4, rows: int = 4, seq: int = 24):
    gen = torch.Generator().manual_seed(1)
    v = model.config.vocab_size
    return [(torch.randint(0, v, (rows, seq), generator=gen), torch.ones(rows, seq, dtype=torch.long))
            for _ in range(n)]


def test_fit_router_recovers_a_realizable_routing_on_held_back_tokens():
    gen = torch.Generator().manual_seed(0)
    e, h = 8, 16
    w_true = torch.randn(e, h, generator=gen)
    w0 = w_true + 0.5 * torch.randn(e, h, generator=gen)  # the router before refit: off by noise
    x_fit, x_hold = torch.randn(2000, h, generator=gen), torch.randn(500, h, generator=gen)
    t_fit, t_hold = (torch.log_softmax(x @ w_true.T, -1) for x in (x_fit, x_hold))
    w = fit_router(w0, x_fit, t_fit, steps=100)
    before, after = float(routing_kl(w0, x_hold, t_hold)), float(routing_kl(w, x_hold, t_hold))
    assert before > 0.1 and after < 1e-3 * before
    assert topk_agreement(w, x_hold, t_hold, 2) > 0.99 > topk_agreement(w0, x_hold, t_hold, 2)
    assert torch.equal(fit_router(w0, x_fit, t_fit, steps=0), w0)  # no steps: W0 itself


@pytest.mark.slow  # tens of seconds on 2 cores
@pytest.mark.parametrize("model_type", ["qwen3_moe", "olmoe"])
def test_refit_routers_lowers_routing_kl_of_the_quantized_model(tiny_model, model_type):
    model = tiny_model(model_type)
    layout = describe(model)
    with torch.no_grad():  # peaked routing, as in trained models (the random tiny routers are near uniform)
        for m in layout.moe_layers:
            model.get_submodule(m.router_path).weight.mul_(10)
    _, plan, quantized = quantize_tiny(model, plan=BitPlan.uniform(layout, 2, 32))
    batches = _batches(model, n=8, rows=8, seq=32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = quantized_weights(model, layout, quantized)
    new, report = refit_routers(model, layout, weights, batches, RouterFitOptions(steps=30, holdout=0.25))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the model is read only
    first, *later = report["layers"]
    assert first["holdout_kl_before"] < 1e-10 and not first["kept"]  # nothing quantized before layer 0's router
    assert new and all(r["kept"] == (r["router"] in new) for r in report["layers"])
    for r in later:  # the refit always lowers the KL it is fitted on; kept only where the held-out KL falls
        assert r["fit_kl_after"] < 0.8 * r["fit_kl_before"]
        assert (r["holdout_kl_after"] < r["holdout_kl_before"]) == r["kept"]
    assert min(r["holdout_kl_after"] / r["holdout_kl_before"] for r in later) < 0.95
    # independently: the last router's routing KL on the held-out sequences, in the fake-quantized model
    m = layout.moe_layers[-1]
    _, hold = split_holdout(batches, 0.25)
    ref = fake_quant_reference(model, layout, plan, quantized)
    x_f, = module_inputs(model, None, m.router_path, hold)
    target = torch.log_softmax(x_f @ model.get_submodule(m.router_path).weight.detach().T, -1)
    with torch.no_grad():
        for path, w in new.items():
            assert w.shape == before[path + ".weight"].shape and w.dtype == before[path + ".weight"].dtype
            ref.get_submodule(path).weight.copy_(w)
    x_q, = module_inputs(ref, None, m.router_path, hold)
    got = float(routing_kl(ref.get_submodule(m.router_path).weight.detach(), x_q, target))
    assert got == pytest.approx(report["layers"][-1]["holdout_kl_after" if m.router_path in new
                                                     else "holdout_kl_before"], rel=1e-3)


@pytest.mark.slow  # tens of seconds on 2 cores
@pytest.mark.parametrize("model_type", ["qwen3_moe", "olmoe"])
def test_blockwise_reconstruction_lowers_each_layers_output_error(tiny_model, model_type):
    model = tiny_model(model_type)
    layout = describe(model)
    _, plan, quantized = quantize_tiny(model, plan=BitPlan.uniform(layout, 4, 32))
    # scales off by 30 %: an output error that fitting the scales can undo
    bad = QuantizedTensors({k: dataclasses.replace(w, scales=(w.scales.float() * 1.3).half())
                            for k, w in quantized.weights.items()}, quantized.fallbacks, quantized.method)
    out, report = reconstruct_blocks(model, layout, bad, _batches(model, n=8, rows=8, seq=32),
                                     BlockwiseOptions(steps=60, lr=2e-2, tokens=256, holdout=0.25))
    assert len(report["layers"]) == layout.num_layers and all(r["kept"] for r in report["layers"])
    for r in report["layers"]:
        assert r["holdout_err_after"] < 0.3 * r["holdout_err_before"]
    for key, w in out.weights.items():  # only scales change
        old = bad.weights[key]
        assert torch.equal(w.q, old.q) and torch.equal(w.zeros, old.zeros) and w.scales.dtype == torch.float16
        assert not torch.equal(w.scales, old.scales)
    # off: unchanged
    same, rep0 = reconstruct_blocks(model, layout, bad, _batches(model), BlockwiseOptions(steps=0))
    assert same is bad and rep0["layers"] == []


def test_bad_options_are_errors():
    with pytest.raises(MoecompressError, match="holdout"):
        RouterFitOptions(holdout=1.0)
    with pytest.raises(MoecompressError, match="steps"):
        BlockwiseOptions(steps=-1)


@pytest.mark.slow  # tens of seconds on 2 cores
def test_post_quantize_runs_the_steps_in_order_and_the_routers_round_trip(tiny_model, tmp_path):
    from moecompress.quantize.post import PostOptions, load_routers, post_quantize, save_routers
    from moecompress.quantize.tune import TuneOptions

    model = tiny_model("olmoe")
    layout = describe(model)
    with torch.no_grad():
        for m in layout.moe_layers:
            model.get_submodule(m.router_path).weight.mul_(10)
    _, _, quantized = quantize_tiny(model, plan=BitPlan.uniform(layout, 2, 32))
    options = PostOptions(blockwise=BlockwiseOptions(steps=20, lr=2e-2, tokens=64, holdout=0.25),
                          tune=TuneOptions(steps=5, batch_size=4, holdout=0.25),
                          router=RouterFitOptions(steps=20, holdout=0.25))
    out, routers, report = post_quantize(model, layout, quantized, _batches(model, n=8, rows=8, seq=32), options,
                                         progress=False)
    assert set(report) >= {"blockwise", "router", "holdout_kl_before", "kept"} and not report.get("skipped")
    assert set(routers) == {r["router"] for r in report["router"]["layers"] if r["kept"]}
    save_routers(routers, tmp_path)
    back = load_routers(tmp_path)
    assert set(back) == set(routers) and all(torch.equal(back[p], routers[p]) for p in routers)
    assert load_routers(tmp_path / "none") == {}
    off, none, rep = post_quantize(model, layout, quantized, _batches(model), PostOptions(), progress=False)
    assert off is quantized and none == {} and rep == {"steps": 0, "skipped": True}


def test_recipe_options_of_the_levers(tmp_path):
    from moecompress.recipe import load_recipe

    base = "model: m\noutput: o\ntune:\n  blockwise_steps: 100\n  router_steps: 30\n"
    (tmp_path / "r.yaml").write_text(base)
    r = load_recipe(tmp_path / "r.yaml")
    assert (r.tune.blockwise_steps, r.tune.router_steps, r.tune.steps) == (100, 30, 0)
    (tmp_path / "bad.yaml").write_text(base.replace("30", "-1"))
    with pytest.raises(MoecompressError, match="tune.router_steps"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text(base.replace("router_steps", "router_step"))
    with pytest.raises(MoecompressError, match="unknown key tune.router_step"):
        load_recipe(tmp_path / "typo.yaml")


@pytest.mark.slow  # a whole tiny job
def test_the_job_exports_the_refitted_routers(tmp_path):
    from helpers import make_job_inputs
    from safetensors import safe_open

    from moecompress.pipeline import quantize
    from moecompress.quantize.post import load_routers
    from moecompress.recipe import recipe_from_dict

    inputs = make_job_inputs(tmp_path, docs_per_domain=8, words=200)
    recipe = {"model": str(inputs / "model"), "output": str(tmp_path / "run"), "dtype": "float32",
              "calibration": {"dataset": str(inputs / "data.jsonl.gz"), "samples": 16, "seq_len": 32, "batch_size": 4},
              "allocation": {"budget": {"avg_bits": 2.5}, "candidates": [2, 3, 4]},
              "quantize": {"method": "rtn", "group_size": 32},
              "tune": {"blockwise_steps": 3, "router_steps": 20, "holdout": 0.25}}
    run = quantize(recipe_from_dict(recipe), progress=False)
    report = json.loads((run / "tuned" / "tune.json").read_text())
    assert report["skipped"] and len(report["blockwise"]["layers"]) == 3 and len(report["router"]["layers"]) == 3
    routers = load_routers(run / "tuned")
    assert set(routers) == {r["router"] for r in report["router"]["layers"] if r["kept"]}
    stored = {}
    for f in (run / "checkpoint").glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            stored.update({k: st.get_tensor(k) for k in st.keys() if k.endswith("mlp.gate.weight")})
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(inputs / "model", dtype=torch.float32)
    assert len(stored) == 3
    for key, w in stored.items():
        path = key[: -len(".weight")]
        want = routers.get(path, original.get_submodule(path).weight.detach())
        assert torch.equal(w.float(), want.float()), key
