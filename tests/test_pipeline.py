"""`moecompress quantize` end to end on a tiny model: budget respected, checkpoint loads, resume is byte-identical."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import moecompress
from moecompress.allocate.rules import MIB
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.errors import MoecompressError
from moecompress.pipeline import STAGES, quantize
from moecompress.recipe import load_recipe, recipe_from_dict
from helpers import make_job_inputs




@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny qwen3_moe with a tokenizer, saved as a model directory, and a two-domain .jsonl.gz corpus."""
    tmp = make_job_inputs(tmp_path_factory.mktemp("pipeline"), 20, 400)
    return tmp


def _recipe(inputs: Path, out: str, **over) -> dict:
    r = {"model": str(inputs / "model"), "output": str(inputs / out), "dtype": "float32",
         "calibration": {"dataset": str(inputs / "data.jsonl.gz"), "samples": 8, "seq_len": 32, "batch_size": 4},
         "allocation": {"budget": {"avg_bits": 3.5}, "candidates": [2, 3, 4, 8]},
         "quantize": {"method": "gptq", "group_size": 32}, "tune": {"steps": 3, "batch_size": 2}}
    for k, v in over.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


def _files(run: Path) -> dict[str, bytes]:
    ck = run / "checkpoint"
    return {p.name: p.read_bytes() for p in sorted(ck.iterdir()) if p.suffix in (".safetensors", ".json")}


@pytest.fixture(scope="module")
def full_run(inputs):
    return quantize(recipe_from_dict(_recipe(inputs, "full")), progress=False)


def test_budget_respected_and_checkpoint_loads(full_run):
    report = json.loads((full_run / "allocation" / "report.json").read_text())
    assert report["bytes"] <= report["budget_bytes"]
    plan = BitPlan.load(full_run / "allocation" / "bit_plan.json")
    used = {b for projs in plan.experts.values() for bits in projs.values() for b in bits}
    assert len(used) >= 2  # a real mix, not one width
    model = moecompress.from_pretrained(full_run / "checkpoint", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()
    assert (full_run / "report.md").exists() and (full_run / "allocation" / "bits_heatmap.png").exists()


@pytest.mark.parametrize("stage", STAGES[:-1])
def test_resume_after_each_stage_is_byte_identical(inputs, full_run, stage):
    recipe = recipe_from_dict(_recipe(inputs, f"resume-{stage}"))
    out = quantize(recipe, stop_after=stage, progress=False)
    assert not (out / "checkpoint").exists()
    quantize(recipe, progress=False)
    assert _files(out) == _files(full_run)


def test_killed_stage_leaves_no_complete_looking_output(inputs, full_run):
    recipe = recipe_from_dict(_recipe(inputs, "killed"))
    out = quantize(recipe, stop_after="quantize", progress=False)
    (out / ".checkpoint.partial").mkdir()  # what a kill during export leaves behind
    assert not (out / "checkpoint").exists()
    quantize(recipe, progress=False)
    assert _files(out) == _files(full_run)


def test_lock_file_reproduces_the_bit_plan(inputs, full_run):
    lock = load_recipe(full_run / "recipe.lock.yaml", [f"output={inputs / 'from-lock'}"])
    assert lock.lock["versions"]["torch"] == torch.__version__
    out = quantize(lock, stop_after="allocate", progress=False)
    assert (out / "allocation" / "bit_plan.json").read_text() == (full_run / "allocation" / "bit_plan.json").read_text()


def test_lock_detects_changed_input(inputs, full_run, tmp_path):
    data = yaml.safe_load((full_run / "recipe.lock.yaml").read_text())
    data["lock"]["inputs"]["dataset"]["sha256"] = "0" * 64
    data["output"] = str(tmp_path / "x")
    with pytest.raises(MoecompressError, match="changed"):
        quantize(recipe_from_dict(data), progress=False)


def test_other_recipe_in_same_directory_refused(inputs, full_run):
    other = recipe_from_dict(_recipe(inputs, "full", allocation={"budget": {"avg_bits": 5.0}}))
    with pytest.raises(MoecompressError, match="different recipe"):
        quantize(other, progress=False)


def test_infeasible_budget_names_the_minimum(inputs):
    recipe = recipe_from_dict(_recipe(inputs, "tiny-budget", allocation={"budget": {"avg_bits": 0.5}}))
    with pytest.raises(MoecompressError, match="avg_bits="):
        quantize(recipe, progress=False)


def test_megabyte_budget(inputs):
    recipe = recipe_from_dict(_recipe(inputs, "mb", allocation={"budget": {"megabytes": 0.12}},
                                      quantize={"method": "rtn"}))
    out = quantize(recipe, stop_after="allocate", progress=False)
    report = json.loads((out / "allocation" / "report.json").read_text())
    assert report["bytes"] <= 0.12 * MIB


@pytest.mark.parametrize("bad, message", [
    ({"quantize": {"method": "awq"}}, "quantize.method: got 'awq'; allowed: rtn, gptq"),
    ({"allocation": {"candidates": [5]}}, "allocation.candidates: bits 5 not allowed"),
    ({"calibration": {"samples": 0}}, "calibration.samples: must be > 0"),
    ({"calibration": {"sampels": 4}}, "unknown key calibration.sampels"),
    ({"quantize": {"group_size": 12}}, "quantize.group_size: must be a multiple of 8"),
    ({"sensitivity": {"method": "magic"}}, "sensitivity.method: got 'magic'; allowed: hessian, measured, loss_aware"),
    ({"allocation": {"budget": {"avg_bits": 3, "megabytes": 2}}}, "exactly one of avg_bits, megabytes or servers"),
    ({"protect": {"attention": 5}}, "protect.attention: got 5"),
    ({"dtype": "int8"}, "dtype: got 'int8'"),
    ({"allocation": {"min_bits": 8, "max_bits": 4}}, "min_bits: must be <= allocation.max_bits"),
    ({"quantize": {"clip": "p99"}}, "quantize.clip: got 'p99'; allowed: minmax, mse"),
    ({"tune": {"steps": -1}}, "tune.steps: must be >= 0"),
    ({"tune": {"holdout": 1.5}}, "tune.holdout: must be in (0, 1)"),
    ({"tune": {"stpes": 3}}, "unknown key tune.stpes"),
])
def test_invalid_recipe_fields_rejected(inputs, bad, message):
    with pytest.raises(MoecompressError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe_from_dict(_recipe(inputs, "bad", **bad))


def test_cli_prints_one_line_error_and_exits_2(tmp_path):
    (tmp_path / "r.yaml").write_text("model: x\noutput: y\nquantize: {method: awq}\n")
    proc = subprocess.run([sys.executable, "-m", "moecompress.cli", "quantize", "--recipe", str(tmp_path / "r.yaml")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: recipe key quantize.method: got 'awq'; allowed: rtn, gptq"]


@pytest.mark.slow  # 13 s: a whole pipeline run, then shard
def test_budget_from_servers_then_shard_fits(inputs, tmp_path):
    from moecompress.pipeline.steps import dense_bytes, load_model
    from moecompress.shard.command import run_shard_command

    recipe = recipe_from_dict(_recipe(inputs, "servers"))
    model, _, layout = load_model(recipe.model, None, torch.float32)
    dense = dense_bytes(model, layout, recipe)
    expert_bf16 = sum(p.numel() * 2 for m in layout.moe_layers for p in model.get_submodule(m.experts_path).parameters())
    spec = f"2x{dense + int(0.22 * expert_bf16)}B"  # about 3.5 bits per expert weight across the two servers
    recipe = recipe_from_dict(_recipe(inputs, "servers", allocation={"budget": {"servers": spec}}))
    out = quantize(recipe, progress=False)
    report = json.loads((out / "allocation" / "report.json").read_text())
    assert report["bytes"] <= 2 * int(0.22 * expert_bf16)
    placement = run_shard_command(str(out / "checkpoint"), str(out / "calibration"), spec, str(tmp_path / "bundles"),
                                  replicate=False)
    assert all(u <= m for u, m in zip(placement.server_bytes, placement.memory_bytes))


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.model and recipe.output


def test_report_lists_every_post_quantization_step_that_ran():
    from moecompress.pipeline.report import _post_lines

    layers = [{"holdout_err_before": 2.0, "holdout_err_after": 1.0, "kept": True},
              {"holdout_err_before": 1.0, "holdout_err_after": 1.5, "kept": False}]
    routing = [{"holdout_kl_before": 0.01, "holdout_kl_after": 0.008, "kept": True}]
    lines = _post_lines({"steps": 0, "skipped": True, "blockwise": {"layers": layers}, "router": {"layers": routing}})
    assert lines == ["- block-wise reconstruction: 1 of 2 MoE layers kept (held-out output error 2->1, 1->1.5)",
                     "- scale tuning: off (tune.steps 0)",
                     "- router refit: 1 of 1 routers refitted (held-out routing KL 0.01->0.008)"]
    assert _post_lines({"steps": 0, "skipped": True}) == ["- scale tuning: off (tune.steps 0)"]
    tuned = _post_lines({"steps": 300, "holdout_kl_before": 0.2, "holdout_kl_after": 0.1, "kept": True})
    assert tuned == ["- scale tuning: 300 steps, held-out KL 0.20000 -> 0.10000 (kept)"]


def test_dense_linears_allocated_in_the_experts_budget(inputs):
    from moecompress.artifacts.quantized import QuantizedTensors
    from moecompress.format.sizes import matrix_bytes
    from moecompress.pipeline.steps import load_model

    over = {"sensitivity": {"method": "loss_aware", "granularity": "projection", "holdout": 0.5},
            "quantize": {"method": "gptq", "group_size": 32}, "tune": {"steps": 0}}
    plain = quantize(recipe_from_dict(_recipe(inputs, "dense-off", **over)), stop_after="allocate", progress=False)
    dense = quantize(recipe_from_dict(_recipe(inputs, "dense-on", allocation={"dense": ["attention"]}, **over)),
                     stop_after="quantize", progress=False)
    model, _, layout = load_model(str(inputs / "model"), None, torch.float32)
    attn = layout.attention_linears
    plan = BitPlan.load(dense / "allocation" / "bit_plan.json")
    assert set(plan.linears) == set(attn) and set(plan.linears.values()) <= {2, 3, 4, 8}
    report, base = (json.loads((d / "allocation" / "report.json").read_text()) for d in (dense, plain))
    bf16 = sum(matrix_bytes(*model.get_submodule(p).weight.shape, 16, 32, False) for p in attn)
    assert report["budget_bytes"] == base["budget_bytes"] + bf16  # avg_bits keeps meaning the experts' share
    assert report["bytes"] <= report["budget_bytes"]
    # attention leaves bf16 (candidates stop at 8 bits): the bytes it frees go to the experts
    expert_bytes = lambda p: sum(matrix_bytes(pr.out_features, pr.in_features, b, 32, False)  # noqa: E731
                                 for m in layout.moe_layers for pr in m.projs
                                 for b in p.experts[m.experts_path][pr.name])
    assert expert_bytes(plan) > expert_bytes(BitPlan.load(plain / "allocation" / "bit_plan.json"))
    assert set(attn) <= set(QuantizedTensors.load(dense / "quantized").weights)
    with pytest.raises(MoecompressError, match="allocation.dense: needs sensitivity.method loss_aware"):
        recipe_from_dict(_recipe(inputs, "bad", allocation={"dense": ["attention"]}))
    with pytest.raises(MoecompressError, match="allocation.dense: got 'mlp'"):
        recipe_from_dict(_recipe(inputs, "bad", allocation={"dense": ["mlp"]}, **over))


def test_lm_head_quantized_by_protect_rule(inputs, tmp_path):
    """protect.lm_head: 8 puts lm_head in the plan at 8 bits, stores it packed (no Hessian: round to nearest,
    reported as a fallback) and the checkpoint computes it from the packed form; a tied lm_head is refused."""
    from moecompress.artifacts.quantized import QuantizedTensors
    from moecompress.runtime.experts.packed_linear import PackedLinear

    over = {"protect": {"lm_head": 8}, "tune": {"steps": 0}}
    run = quantize(recipe_from_dict(_recipe(inputs, "head8", **over)), progress=False)
    plan = BitPlan.load(run / "allocation" / "bit_plan.json")
    assert plan.linears.get("lm_head") == 8
    quantized = QuantizedTensors.load(run / "quantized")
    assert "lm_head" in quantized.weights and "lm_head" in quantized.fallbacks  # GPTQ recipe: RTN for lm_head
    model = moecompress.from_pretrained(run / "checkpoint", dtype=torch.float32)
    head = model.get_output_embeddings()
    assert isinstance(head, PackedLinear) and head.bits == 8
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(inputs / "model", dtype=torch.float32).lm_head.weight.detach()
    w = head.dequantized([0], torch.float32)[0]
    groups = reference.view(reference.shape[0], -1, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 255  # a group's 8-bit step without clipping
    assert (w - reference).abs().view_as(groups).mean(-1).le(step / 2).all()  # RTN (+ MSE clip): under half a step
    assert torch.linalg.norm(w - reference) < 0.01 * torch.linalg.norm(reference)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()
    tied = tmp_path / "tied"
    m = AutoModelForCausalLM.from_pretrained(inputs / "model", dtype=torch.float32)
    m.config.tie_word_embeddings = True
    m.tie_weights()
    m.save_pretrained(tied / "model")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (inputs / "model" / f).exists():
            (tied / "model" / f).write_bytes((inputs / "model" / f).read_bytes())
    (tied / "data.jsonl.gz").write_bytes((inputs / "data.jsonl.gz").read_bytes())
    with pytest.raises(MoecompressError, match="protect.lm_head: 8 bits, but this model ties lm_head"):
        quantize(recipe_from_dict(_recipe(tied, "head8", **over)), progress=False)
    with pytest.raises(MoecompressError, match="protect.lm_head: got 5"):
        recipe_from_dict(_recipe(inputs, "bad", protect={"lm_head": 5}))
