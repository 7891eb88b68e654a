"""The checkpoint format end to end: export, from_pretrained, logits vs a fake-quant reference, round trips, errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SUPPORTED_TYPES
from helpers import fake_quant_reference, quantize_tiny
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moecompress
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.errors import MoecompressError
from moecompress.export.checkpoint import export_checkpoint
from moecompress.runtime.loading.inspect import checkpoint_report, resident_bytes
from moecompress.runtime.experts.packed_group import PackedGroup

IDS = torch.tensor([[5, 17, 99, 3, 64, 23, 11, 7, 42, 101, 8, 77, 30, 12, 90, 55],
                    [9, 4, 61, 33, 120, 2, 18, 47, 66, 71, 13, 29, 84, 6, 111, 40]])
TOL = 2e-5  # float32 checkpoint: only summation order differs from the fake-quant reference


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _first_attention_linears(layout):
    return {layout.attention_linears[0]: 8, layout.attention_linears[-1]: 4}


@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_mixed_plan_loads_and_matches_fake_quant(tiny_model, tmp_path, model_type):
    model = tiny_model(model_type)
    from moecompress.arch.adapters import describe

    layout, plan, quantized = quantize_tiny(model, linears=_first_attention_linears(describe(model)))
    export_checkpoint(model, layout, plan, quantized, tmp_path / "ck", dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    bits_seen = {g.bits for g in loaded.modules() if isinstance(g, PackedGroup)}
    assert bits_seen == {2, 3, 4, 8, 16}
    ref = _logits(fake_quant_reference(model, layout, plan, quantized))
    out = _logits(loaded)
    assert (out - ref).abs().max() < TOL
    assert (_logits(model) - ref).abs().max() > 100 * TOL  # quantization really changed the model

    # save_pretrained of the loaded model writes the same tensors; reloading gives identical logits
    loaded.save_pretrained(tmp_path / "again")
    a, b = load_file(tmp_path / "ck" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(MoecompressError, match="no moecompress.json"):  # save_pretrained writes no manifest
        moecompress.from_pretrained(tmp_path / "again", dtype=torch.float32)
    assert torch.equal(_logits(moecompress.from_pretrained(tmp_path / "again", verify=False, dtype=torch.float32)), out)


def test_bf16_checkpoint_close_to_reference(tiny_model, tmp_path):
    model = tiny_model("qwen3_moe")
    layout, plan, quantized = quantize_tiny(model)
    export_checkpoint(model, layout, plan, quantized, tmp_path / "ck")  # bf16 floats (the default)
    loaded = moecompress.from_pretrained(tmp_path / "ck")
    assert loaded.dtype == torch.bfloat16
    ref = _logits(fake_quant_reference(model, layout, plan, quantized))
    err = (_logits(loaded).float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05  # bf16 activations and dense weights


def test_resident_memory_is_packed_size(tiny_model, tmp_path):
    model = tiny_model("qwen3_moe")
    layout, plan, quantized = quantize_tiny(model)
    export_checkpoint(model, layout, plan, quantized, tmp_path / "ck", dtype=torch.float32)
    loaded = moecompress.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    report = checkpoint_report(tmp_path / "ck")
    # no dequantized copy is held: resident bytes stay within 10% of the stored bytes
    assert resident_bytes(loaded) <= 1.10 * report["total_bytes"]
    assert report["total_bytes"] < report["total_bf16_bytes"]


def test_partial_checkpoint_holds_only_some_experts(tiny_model, tmp_path):
    model = tiny_model("mixtral")
    layout, plan, quantized = quantize_tiny(model)
    held = {m.experts_path: {0, 1, 2} for m in layout.moe_layers}
    export_checkpoint(model, layout, plan, quantized, tmp_path / "part", dtype=torch.float32, held=held)
    loaded = moecompress.from_pretrained(tmp_path / "part", dtype=torch.float32)
    experts = loaded.get_submodule(layout.moe_layers[0].experts_path)
    assert experts.held_experts() == (0, 1, 2)
    h = torch.randn(6, 64)
    idx = torch.tensor([[0, 5], [1, 2], [6, 7], [2, 0], [3, 4], [1, 6]])
    w = torch.rand(6, 2)
    out = experts(h, idx, w)
    assert torch.all(out[2] == 0) and torch.all(out[4] == 0)  # tokens routed only to experts held elsewhere
    assert out[1].abs().sum() > 0


def test_unsupported_bits_rejected(tiny_model):
    from moecompress.arch.adapters import describe

    layout = describe(tiny_model("qwen3_moe"))
    with pytest.raises(MoecompressError, match="unsupported bits 5.*allowed: 2, 3, 4, 8, 16"):
        BitPlan.uniform(layout, 5)
    with pytest.raises(MoecompressError, match="group_size"):
        BitPlan.uniform(layout, 4, group_size=12)


@pytest.fixture
def checkpoint(tiny_model, tmp_path):
    model = tiny_model("qwen3_moe")
    layout, plan, quantized = quantize_tiny(model)
    export_checkpoint(model, layout, plan, quantized, tmp_path / "ck", dtype=torch.float32, max_shard_size=200_000)
    return tmp_path / "ck"


def test_truncated_file_is_a_clear_error(checkpoint):
    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(MoecompressError, match="truncated"):
        moecompress.from_pretrained(checkpoint)


def test_altered_file_is_a_clear_error(checkpoint):
    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(MoecompressError, match="sha256"):
        moecompress.from_pretrained(checkpoint)


def test_missing_shard_is_a_clear_error(checkpoint):
    shards = sorted(checkpoint.glob("*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(MoecompressError, match="missing"):
        moecompress.from_pretrained(checkpoint)


def test_truncated_file_without_manifest_is_a_clear_error(checkpoint):
    (checkpoint / "moecompress.json").unlink()
    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(MoecompressError, match="no moecompress.json"):
        moecompress.from_pretrained(checkpoint)
    with pytest.raises(MoecompressError, match="truncated|impossible"):  # the headers are still checked
        moecompress.from_pretrained(checkpoint, verify=False)


def test_failed_export_writes_nothing(tiny_model, tmp_path):
    model = tiny_model("qwen3_moe")
    layout, plan, quantized = quantize_tiny(model)
    quantized.weights.pop(next(iter(quantized.weights)))
    with pytest.raises(MoecompressError, match="no quantized weights"):
        export_checkpoint(model, layout, plan, quantized, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_not_a_moecompress_checkpoint(tiny_model, tmp_path):
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "plain")
    with pytest.raises(MoecompressError, match="not a moecompress checkpoint"):
        moecompress.from_pretrained(tmp_path / "plain")
    with pytest.raises(MoecompressError, match="quantization_config"):
        moecompress.from_pretrained(tmp_path / "plain", quantization_config={})


def test_newer_format_version_rejected(checkpoint):
    import json

    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoecompressError, match="format_version 99"):
        moecompress.from_pretrained(checkpoint)


def test_loading_without_import_fails_loudly(checkpoint):
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "AutoModelForCausalLM.from_pretrained(sys.argv[1])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(checkpoint)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode != 0
    assert "mismatch" in (proc.stderr + proc.stdout).lower()
