"""Integrity of a whole checkpoint: required manifest over every model file, strict quantization_config, tensors
exactly as implied, contained paths -- the same whichever way the checkpoint is loaded (issue 15)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import _build
from helpers import quantize_tiny
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moecompress
from moecompress.cli import main
from moecompress.errors import MoecompressError
from moecompress.export.checkpoint import export_checkpoint
from moecompress.format.files import MANIFEST, write_manifest
from moecompress.runtime.loading.verify import verify_path

IDS = torch.tensor([[5, 17, 99, 3, 64, 23, 11, 7]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    model = _build("qwen3_moe")
    layout, plan, quantized = quantize_tiny(model)
    ck = tmp_path_factory.mktemp("trust") / "ck"
    export_checkpoint(model, layout, plan, quantized, ck, dtype=torch.float32, max_shard_size=200_000)
    return ck, _logits(moecompress.from_pretrained(ck, dtype=torch.float32))


@pytest.fixture
def ck(original, tmp_path):
    shutil.copytree(original[0], tmp_path / "ck")
    return tmp_path / "ck"


def _config(ck: Path) -> dict:
    return json.loads((ck / "config.json").read_text())


def _write_config(ck: Path, cfg: dict, reseal: bool = True) -> None:
    (ck / "config.json").write_text(json.dumps(cfg))
    if reseal:  # what someone who also rewrites the manifest would do: the structural checks must still catch it
        write_manifest(ck, {"format": "moecompress"})


def _both_loaders_refuse(ck: Path, match: str, **kw):
    with pytest.raises(MoecompressError, match=match):
        moecompress.from_pretrained(ck, dtype=torch.float32, **kw)
    with pytest.raises(MoecompressError, match=match):
        AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)


# -- the manifest is required and covers every file ---------------------------------------------------------------
def test_manifest_lists_config_tokenizer_and_weights(ck):
    files = json.loads((ck / MANIFEST).read_text())["files"]
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(files)
    assert sum(n.endswith(".safetensors") for n in files) == len(list(ck.glob("*.safetensors")))


def test_missing_manifest_refused_unless_opted_out(ck, original, monkeypatch):
    (ck / MANIFEST).unlink()
    _both_loaders_refuse(ck, "no moecompress.json.*verify=False")
    assert torch.equal(_logits(moecompress.from_pretrained(ck, verify=False, dtype=torch.float32)), original[1])
    monkeypatch.setenv("MOECOMPRESS_NO_VERIFY", "1")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)), original[1])


@pytest.mark.parametrize("content", [b"\x00garbage", b"{}", b"[]", b'{"files": {}}',
                                     b'{"files": {"config.json": {"bytes": "1", "sha256": "x"}}}'])
def test_garbage_manifest_is_a_clear_error(ck, content):
    (ck / MANIFEST).write_bytes(content)
    _both_loaders_refuse(ck, "moecompress.json")


def test_config_edit_detected_by_both_loaders(ck):
    cfg = _config(ck)
    groups = next(iter(cfg["quantization_config"]["experts"].values()))["gate_up"]
    a, b = sorted(groups)[:2]
    groups[a][0], groups[b][0] = groups[b][0], groups[a][0]  # swap two experts between bit-widths
    _write_config(ck, cfg, reseal=False)
    _both_loaders_refuse(ck, "config.json.*(sha256 does not match|altered)")


def test_bit_flip_detected_through_transformers_too(ck):
    shard = sorted(ck.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    _both_loaders_refuse(ck, "sha256")


def test_unlisted_model_file_refused(ck):
    (ck / "tokenizer.json").write_text("{}")
    _both_loaders_refuse(ck, "tokenizer.json is not listed")


def test_hidden_partial_directory_refused(ck):
    hidden = ck.parent / "..checkpoint.partial.partial-123-abc"
    shutil.copytree(ck, hidden)
    _both_loaders_refuse(hidden, "unfinished")
    assert main(["verify", str(hidden)]) == 2


# -- strict quantization_config and tensors (the manifest rewritten too) -------------------------------------------
def _edit_qc(ck: Path, edit) -> None:
    cfg = _config(ck)
    edit(cfg["quantization_config"], next(iter(cfg["quantization_config"]["experts"].values())))
    _write_config(ck, cfg)


@pytest.mark.parametrize("edit, match", [
    (lambda qc, e: e.update(num_experts=10**8), "num_experts"),
    (lambda qc, e: e.update(num_experts=9), "num_experts 9, the model config has 8"),
    (lambda qc, e: e["down"].update({"5": e["down"].pop(sorted(e["down"])[0])}), "unsupported bits"),
    (lambda qc, e: qc.update(symmetric="true"), "symmetric must be bool"),
    (lambda qc, e: qc.update(symmetric=not qc["symmetric"]), "unexpected tensor|missing"),
    (lambda qc, e: qc.update(group_size=48), "group_size 48 does not divide"),
    (lambda qc, e: qc.update(group_size=12.0), "group_size"),
    (lambda qc, e: qc.update(shiny=1), "unknown key 'shiny'"),
    (lambda qc, e: qc["linears"].update({"model.layers.0.self_attn.q_proj": 4}), "missing"),
    (lambda qc, e: qc["linears"].update({"model.nothing": 4}), "does not have"),
    (lambda qc, e: e["gate_up"][sorted(e["gate_up"])[0]].append(e["gate_up"][sorted(e["gate_up"])[1]][0]),
     "listed twice"),
    (lambda qc, e: e["gate_up"][sorted(e["gate_up"])[0]].append(99), "must be an integer in 0..7, got 99"),
    (lambda qc, e: e["gate_up"].pop(sorted(e["gate_up"])[0]), "projections hold different experts"),
    (lambda qc, e: e.pop("down"), "projections"),
    (lambda qc, e: qc["experts"].update({"model.layers.0.mlp.experts; rm": {}}), "not a module path"),
])
def test_structural_edits_refused_before_allocation(ck, edit, match):
    _edit_qc(ck, edit)
    _both_loaders_refuse(ck, match)
    assert main(["verify", str(ck)]) == 2


def _edit_tensors(ck: Path, edit) -> None:
    shard = sorted(ck.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    write_manifest(ck, {"format": "moecompress"})


def _first(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop(_first(t, ".qweight")), "is missing from the weight files"),
    (lambda t: t.update({"model.extra.weight": torch.zeros(2)}), "unexpected tensor model.extra.weight"),
    (lambda t: t.update({(k := _first(t, ".scales")): t[k][:-1].clone()}), "has shape"),
    (lambda t: t.update({(k := _first(t, ".scales")): t[k].float()}), "is F32, expected F16"),
    (lambda t: t.update({(k := _first(t, ".qweight")): t[k].to(torch.int32)}), "is I32, expected U8"),
])
def test_missing_or_unexpected_tensors_refused(ck, edit, match):
    _edit_tensors(ck, edit)
    _both_loaders_refuse(ck, match)


# -- paths read from our files stay inside the directory -----------------------------------------------------------
@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", "/dev/zero", "sub/../../x.safetensors"])
def test_manifest_and_index_paths_contained(ck, entry):
    manifest = json.loads((ck / MANIFEST).read_text())
    manifest["files"][entry] = {"bytes": 0, "sha256": "0" * 64}
    (ck / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MoecompressError, match="leaves its directory|not a plain"):
        moecompress.from_pretrained(ck)


def test_index_path_outside_refused(ck):
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../../etc/passwd"
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    write_manifest(ck, {"format": "moecompress"})
    with pytest.raises(MoecompressError, match="model.safetensors.index.json"):
        moecompress.from_pretrained(ck)


def test_symlink_leading_out_refused(ck, tmp_path):
    shard = sorted(ck.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    os.symlink(outside, shard)
    with pytest.raises(MoecompressError, match="symlink leading outside"):
        moecompress.from_pretrained(ck)
    shard.unlink()
    os.symlink("/dev/zero", shard)
    with pytest.raises(MoecompressError, match="symlink leading outside|not a regular file"):
        moecompress.from_pretrained(ck)


# -- verify and inspect --------------------------------------------------------------------------------------------
def test_verify_and_inspect(ck, capsys):
    assert main(["verify", str(ck)]) == 0
    assert "ok:" in capsys.readouterr().out
    shard = sorted(ck.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["verify", str(ck)]) == 2
    assert shard.name in capsys.readouterr().err
    assert main(["inspect", str(ck)]) == 0
    assert "DO NOT verify" in capsys.readouterr().out
    shard.write_bytes(b"\xff" * 64)  # a destroyed file: inspect still answers in one line
    assert main(["inspect", str(ck)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_verify_names_not_a_checkpoint(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    with pytest.raises(MoecompressError, match="not a directory"):
        verify_path(tmp_path / "nope")


# -- bundle sets: placement.json is checked whole -------------------------------------------------------------------
@pytest.fixture
def bundles(original, tmp_path):
    from moecompress.artifacts.placement import Placement
    from moecompress.shard.bundles import write_bundles

    spec = _config(original[0])["quantization_config"]["experts"]
    layers, experts = len(spec), next(iter(spec.values()))["num_experts"]
    placement = Placement(memory_bytes=(10**9, 10**9), assignment=tuple(tuple((e % 2,) for e in range(experts))
                                                                         for _ in range(layers)),
                          expert_bytes=tuple((0,) * experts for _ in range(layers)), dense_bytes=0, dense_servers=(0, 1))
    write_bundles(original[0], placement, tmp_path / "bundles")
    return tmp_path / "bundles"


def _edit_placement(out: Path, edit) -> None:
    doc = json.loads((out / "placement.json").read_text())
    edit(doc)
    (out / "placement.json").write_text(json.dumps(doc))


def test_bundles_load_and_verify(bundles, original, capsys):
    from moecompress.runtime.loading.bundles import load_bundles

    out = _logits(load_bundles(bundles, dtype=torch.float32))
    assert torch.allclose(out, original[1], atol=1e-5)
    assert main(["verify", str(bundles)]) == 0
    assert "bundle set" in capsys.readouterr().out


def _rename_entry(doc, new):
    files = doc["files"]["0"]
    files[new] = files.pop(next(iter(files)))


@pytest.mark.parametrize("edit, match", [
    (lambda d: _rename_entry(d, "../../etc/passwd"), "not in server-0/|leaves its directory"),
    (lambda d: _rename_entry(d, "server-0/../../../etc/passwd"), "leaves its directory"),
    (lambda d: _rename_entry(d, "/etc/passwd"), "not in server-0/|leaves its directory"),
    (lambda d: _rename_entry(d, "/dev/zero"), "not in server-0/|leaves its directory"),
    (lambda d: d["assignment"][0][0].__setitem__(0, 5), r"servers \(5,\) must be distinct ids in 0..1"),
    (lambda d: d["assignment"][0].__setitem__(0, [1]), "holds experts|sha256"),
    (lambda d: d["memory_bytes"].append(10**9), "every server|disagrees"),
    (lambda d: d.update(assignment="x"), "placement"),
    (lambda d: d.update(dense_servers=[7]), "dense_servers"),
    (lambda d: d.update(memory_bytes=None), "malformed placement"),
    (lambda d: d.update(files=[]), "files must map every server"),
    (lambda d: d.pop("experts_paths"), "experts_paths"),
    (lambda d: d.update(experts_paths=[1, 2, 3]), "experts_paths"),
])
def test_bad_placement_refused(bundles, edit, match):
    from moecompress.runtime.loading.bundles import load_bundles

    _edit_placement(bundles, edit)
    with pytest.raises(MoecompressError, match=match):
        load_bundles(bundles, dtype=torch.float32)


def test_garbage_placement_and_missing_bundle(bundles):
    from moecompress.format.bundle_set import verify_bundles

    shutil.rmtree(bundles / "server-1")
    with pytest.raises(MoecompressError, match="server-1 is missing"):
        verify_bundles(bundles)
    (bundles / "placement.json").write_bytes(b"\x89PNG garbage")
    with pytest.raises(MoecompressError, match="placement.json: placement is not valid JSON"):
        verify_bundles(bundles)
