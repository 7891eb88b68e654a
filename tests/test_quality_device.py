"""The device option of the main job: `--device cuda` / recipe `device:`; refused clearly where CUDA is missing, and
on a GPU the same results as on the CPU up to floating-point order."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from moecompress.artifacts.bit_plan import BitPlan
from moecompress.artifacts.cost_table import CostTable
from moecompress.artifacts.quantized import QuantizedTensors
from moecompress.cli import main
from moecompress.errors import MoecompressError
from moecompress.pipeline import quantize
from moecompress.recipe import recipe_from_dict

WORDS = "def class return import self value list dict for while if else print open file data model expert".split()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from conftest import _build

    from moecompress.builtin.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("device")
    rng = random.Random(0)
    docs = [{"domain": d, "text": " ".join(rng.choice(WORDS) for _ in range(300))} for d in ("a", "b") * 12]
    with gzip.open(tmp / "data.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    tokenizer = train_tokenizer((d["text"] for d in docs), vocab_size=300)
    model = _build("qwen3_moe", vocab_size=320)
    assert len(tokenizer) <= 320
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    return tmp


def _recipe(inputs: Path, out: str, device: str) -> dict:
    return {"model": str(inputs / "model"), "output": str(inputs / out), "dtype": "float32", "device": device,
            "calibration": {"dataset": str(inputs / "data.jsonl.gz"), "samples": 8, "seq_len": 32, "batch_size": 4},
            "sensitivity": {"method": "loss_aware"},
            "allocation": {"budget": {"avg_bits": 3.0}, "candidates": [2, 3, 4, 8]},
            "quantize": {"method": "gptq", "group_size": 32}, "tune": {"steps": 3, "batch_size": 2}}


def test_recipe_device_values():
    base = {"model": "m", "output": "o"}
    assert recipe_from_dict(base).device == "cpu"
    assert recipe_from_dict({**base, "device": "cuda:1"}).device == "cuda:1"
    for bad in ("gpu", "cuda:x", "CUDA"):
        with pytest.raises(MoecompressError, match="recipe key device: .*allowed: cpu, cuda, cuda:N"):
            recipe_from_dict({**base, "device": bad})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(inputs, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(inputs, "never", "cpu")))
    out = tmp_path / "run"
    assert main(["quantize", "--recipe", str(recipe), "--out", str(out), "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda': CUDA is not available here") and "--device cpu" in err
    assert not out.exists()  # refused before anything was written
    with pytest.raises(MoecompressError, match="CUDA is not available"):
        quantize(recipe_from_dict(_recipe(inputs, "never2", "cuda")), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_equals_cpu_run_up_to_float_order(inputs):
    cpu = quantize(recipe_from_dict(_recipe(inputs, "on-cpu", "cpu")), progress=False)
    gpu = quantize(recipe_from_dict(_recipe(inputs, "on-gpu", "cuda")), progress=False)
    c, g = (CostTable.load(run / "sensitivity" / "cost_table.json") for run in (cpu, gpu))
    for a, b in zip(c.items, g.items):
        assert a.key == b.key and a.bytes == b.bytes
        assert b.damage == pytest.approx(a.damage, rel=1e-3, abs=1e-9)
    plan_c, plan_g = (BitPlan.load(run / "allocation" / "bit_plan.json") for run in (cpu, gpu))
    assert plan_c == plan_g
    qc, qg = (QuantizedTensors.load(run / "quantized") for run in (cpu, gpu))
    assert set(qc.weights) == set(qg.weights)
    same = total = 0
    for key, a in qc.weights.items():
        b = qg.weights[key]
        same += int((a.q == b.q).sum())
        total += a.q.numel()
        wa, wb = a.dequantize(torch.float32), b.dequantize(torch.float32)
        assert (wa - wb).abs().mean() <= 0.02 * wa.abs().mean()
    assert same / total >= 0.99  # integer codes differ only where float order moves a rounding
    tc, tg = (json.loads((run / "tuned" / "tune.json").read_text()) for run in (cpu, gpu))
    assert tg["holdout_kl_after"] == pytest.approx(tc["holdout_kl_after"], rel=0.05, abs=1e-6)
