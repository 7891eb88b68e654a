"""Shard bundles: each loads alone; run together they reproduce the full checkpoint's logits exactly."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import quantize_tiny

import moecompress
from moecompress.calibrate.dataset import CalibrationData
from moecompress.calibrate.options import CalibrationOptions
from moecompress.calibrate.run import calibrate
from moecompress.errors import MoecompressError
from moecompress.export.checkpoint import export_checkpoint
from moecompress.format.files import PLACEMENT_FILE
from moecompress.runtime.bundles import load_bundles
from moecompress.shard.command import checkpoint_sizes, run_shard_command

IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from conftest import _build

    tmp = tmp_path_factory.mktemp("shard")
    model = _build("qwen3_moe")
    layout, plan, quantized = quantize_tiny(model)
    export_checkpoint(model, layout, plan, quantized, tmp / "ck", dtype=torch.float32)
    ids = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    data = CalibrationData(input_ids=ids, attention_mask=torch.ones_like(ids))
    stats = calibrate(model, None, data, CalibrationOptions(samples=16, seq_len=32, hessians=False, trace=True,
                                                            progress=False))
    stats.save(tmp / "stats")
    expert_bytes, dense_bytes = checkpoint_sizes(tmp / "ck")
    memory = int(dense_bytes + expert_bytes.sum() * 0.7)  # each of 2 servers: dense + 70% of the experts
    run_shard_command(str(tmp / "ck"), str(tmp / "stats"), f"2x{memory}B", str(tmp / "out"),
                      eval_stats=str(tmp / "stats"))
    return tmp


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_every_expert_placed_within_memory(sharded):
    doc = json.loads((sharded / "out" / PLACEMENT_FILE).read_text())
    assert all(len(copies) >= 1 for layer in doc["assignment"] for copies in layer)
    assert all(u <= m for u, m in zip(doc["server_bytes"], doc["memory_bytes"]))
    replicas = sum(len(c) - 1 for layer in doc["assignment"] for c in layer)
    assert replicas > 0  # 2 x 70% of the expert bytes leaves room for hot-expert replicas
    assert "replay" in doc["traffic"]


def test_bundle_sizes_match_placement(sharded):
    doc = json.loads((sharded / "out" / PLACEMENT_FILE).read_text())
    for s in range(doc["num_servers"]):
        experts, dense = checkpoint_sizes(sharded / "out" / f"server-{s}")
        assert int(experts.sum()) + dense == doc["server_bytes"][s]


def test_each_bundle_loads_alone_with_only_its_experts(sharded):
    doc = json.loads((sharded / "out" / PLACEMENT_FILE).read_text())
    for s in range(doc["num_servers"]):
        model = moecompress.from_pretrained(sharded / "out" / f"server-{s}", dtype=torch.float32)
        for layer, path in enumerate(doc["experts_paths"]):
            held = tuple(e for e, copies in enumerate(doc["assignment"][layer]) if s in copies)
            assert model.get_submodule(path).held_experts() == held
        assert torch.isfinite(_logits(model)).all()


def test_bundles_together_equal_full_model(sharded):
    full = _logits(moecompress.from_pretrained(sharded / "ck", dtype=torch.float32))
    together = _logits(load_bundles(sharded / "out", dtype=torch.float32))
    assert torch.allclose(together, full, atol=1e-5, rtol=0)


def test_altered_and_missing_bundles_are_clear_errors(sharded, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(sharded / "out", out)
    f = out / "server-1" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(MoecompressError, match="sha256"):
        load_bundles(out, dtype=torch.float32)
    shutil.rmtree(out / "server-1")
    with pytest.raises(MoecompressError, match="missing"):
        load_bundles(out, dtype=torch.float32)


def test_too_little_memory_names_the_minimum(sharded, tmp_path):
    with pytest.raises(MoecompressError, match="smallest|at least|minimum"):
        run_shard_command(str(sharded / "ck"), str(sharded / "stats"), "2x1000B", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
