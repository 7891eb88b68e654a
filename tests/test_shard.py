"""`moecompress shard`: bundles within memory, self-describing (bundle.json), pipeline bundles hold only their layers,
and run together they reproduce the full checkpoint's logits."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import quantize_tiny
from safetensors import safe_open

import moecompress
from moecompress.calibrate.dataset import CalibrationData
from moecompress.calibrate.options import CalibrationOptions
from moecompress.calibrate.run import calibrate
from moecompress.errors import MoecompressError
from moecompress.export.checkpoint import export_checkpoint
from moecompress.format.bundle_set import verify_bundles
from moecompress.format.files import MANIFEST, PLACEMENT_FILE, sha256_file
from moecompress.shard.bundles import BUNDLE_FILE
from moecompress.shard.command import checkpoint_layer_sizes, checkpoint_sizes, run_shard_command

IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(7))
MODES = ("expert", "pipeline")


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
    run_shard_command(str(tmp / "ck"), str(tmp / "stats"), f"2x{memory}B", str(tmp / "expert"), mode="expert",
                      balance_epsilon=0.5,  # room on the home for replicas under the balance cap
                      eval_stats=str(tmp / "stats"))
    run_shard_command(str(tmp / "ck"), str(tmp / "stats"), f"3x{memory}B", str(tmp / "pipeline"),
                      method="all_servers", eval_stats=str(tmp / "stats"))  # the default mode: pipeline
    return tmp


def _doc(sharded, mode):
    return json.loads((sharded / mode / PLACEMENT_FILE).read_text())


def test_expert_mode_places_every_expert_within_memory_with_replicas(sharded):
    doc = _doc(sharded, "expert")
    assert doc["mode"] == "expert" and doc["home"] == 0 and doc["layer_servers"] == []
    assert all(len(copies) >= 1 for layer in doc["assignment"] for copies in layer)
    assert all(u <= m for u, m in zip(doc["server_bytes"], doc["memory_bytes"]))
    assert sum(len(c) - 1 for layer in doc["assignment"] for c in layer) > 0  # room for hot-expert replicas
    for name in ("prefill", "decode"):  # the report: bytes next to per-layer balance, from the replay
        r = doc["traffic"]["replay"][name]
        assert r["tokens"] == 16 * 32 and r["bytes"] > 0 and r["layer_balance"] >= r["balance"] >= 1.0
    assert doc["traffic"]["replay"]["decode"]["calls"] == 16 * 32


def test_pipeline_mode_is_contiguous_layers_within_memory(sharded):
    doc = _doc(sharded, "pipeline")
    assert doc["mode"] == "pipeline" and doc["method"] == "all_servers"
    ls = doc["layer_servers"]
    assert ls == sorted(ls) and set(ls) == {0, 1, 2} and doc["home"] == ls[0] == 0
    assert all(copies == [ls[layer]] for layer, experts in enumerate(doc["assignment"]) for copies in experts)
    assert all(u <= m for u, m in zip(doc["server_bytes"], doc["memory_bytes"]))
    assert doc["traffic"]["replay"]["decode"]["hops_per_call"] == 3  # 0 -> 1 -> 2 -> home


@pytest.mark.parametrize("mode", MODES)
def test_bundle_sizes_match_placement(sharded, mode):
    doc = _doc(sharded, mode)
    total = checkpoint_layer_sizes(sharded / "ck")
    for s in range(doc["num_servers"]):
        experts, dense = checkpoint_sizes(sharded / mode / f"server-{s}")
        assert int(experts.sum()) + dense == doc["server_bytes"][s]
    if mode == "pipeline":  # every byte held exactly once
        assert sum(doc["server_bytes"]) == int(total.expert_bytes.sum()) + total.dense_bytes


@pytest.mark.parametrize("mode", MODES)
def test_bundles_describe_themselves(sharded, mode):
    out, doc = sharded / mode, _doc(sharded, mode)
    verify_bundles(out)
    digest = sha256_file(out / PLACEMENT_FILE)
    for s in range(doc["num_servers"]):
        desc = json.loads((out / f"server-{s}" / BUNDLE_FILE).read_text())
        assert desc == {
            "server": s, "num_servers": doc["num_servers"], "mode": mode, "home": doc["home"],
            "assignment": doc["assignment"], "dense_servers": doc["dense_servers"],
            "layer_servers": doc["layer_servers"],
            "holds": "layers" if mode == "pipeline" else ("full" if s in doc["dense_servers"] else "experts"),
            "placement_sha256": digest,
        }
        assert BUNDLE_FILE in json.loads((out / f"server-{s}" / MANIFEST).read_text())["files"]


def test_pipeline_bundles_hold_only_their_layers(sharded):
    out, doc = sharded / "pipeline", _doc(sharded, "pipeline")
    for s in range(doc["num_servers"]):
        with safe_open(out / f"server-{s}" / "model.safetensors", "pt") as f:
            keys = list(f.keys())
        layers = {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")}
        assert layers == {i for i, server in enumerate(doc["layer_servers"]) if server == s}
        head = {k for k in keys if not k.startswith("model.layers.")}
        assert bool(head) == (s == doc["home"])  # embeddings, final norm, lm_head on the home only
    with pytest.raises(MoecompressError, match="bundle"):
        moecompress.from_pretrained(out / "server-1", dtype=torch.float32)  # not a full model


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_bundles_together_equal_full_model(sharded, mode):
    pytest.importorskip("moecompress.runtime.edge")
    if mode == "pipeline":
        pytest.importorskip("moecompress.runtime.edge.pipeline")
    from moecompress.runtime.edge import deploy

    with torch.no_grad():
        full = moecompress.from_pretrained(sharded / "ck", dtype=torch.float32)(IDS).logits
    with deploy(sharded / mode, simulate=True) as d:
        together = d(IDS)
    assert torch.allclose(together, full, atol=1e-5, rtol=0)


def test_altered_and_missing_bundles_are_clear_errors(sharded, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(sharded / "expert", out)
    f = out / "server-1" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(MoecompressError, match="sha256"):
        verify_bundles(out)
    shutil.rmtree(out / "server-1")
    with pytest.raises(MoecompressError, match="missing"):
        verify_bundles(out)


def test_too_little_memory_names_the_minimum(sharded, tmp_path):
    for mode in MODES:
        with pytest.raises(MoecompressError, match="smallest memory that fits"):
            run_shard_command(str(sharded / "ck"), str(sharded / "stats"), "2x1000B", str(tmp_path / "o"), mode=mode)
    assert not (tmp_path / "o").exists()


def test_fewest_servers_leaves_idle_servers_empty(sharded, tmp_path):
    from moecompress.shard import ServerSpec, place
    from moecompress.shard.bundles import write_bundles

    sizes = checkpoint_layer_sizes(sharded / "ck")
    total = int(sizes.expert_bytes.sum()) + sizes.dense_bytes
    p = place(None, sizes, ServerSpec(memory_bytes=(total,) * 3, mode="pipeline"), "fewest_servers")
    assert p.layer_servers == (0,) * len(p.layer_servers) and p.server_bytes[1:] == (0, 0)  # all on one server
    write_bundles(sharded / "ck", p, tmp_path / "few")
    verify_bundles(tmp_path / "few")
    for s in (1, 2):
        experts, dense = checkpoint_sizes(tmp_path / "few" / f"server-{s}")
        assert int(experts.sum()) + dense == 0


def test_home_replicas_are_recorded_in_placement_json(sharded, tmp_path):
    """`moecompress shard --home-replicas 2`: every MoE layer's 2 most used experts (calibration) have a copy on
    the home in placement.json, within the same server memory; lossless replay round trips come with it."""
    import numpy as np

    from moecompress.artifacts.calibration_stats import CalibrationStats

    memory = _doc(sharded, "expert")["memory_bytes"][0]
    run_shard_command(str(sharded / "ck"), str(sharded / "stats"), f"2x{memory}B", str(tmp_path / "home"),
                      mode="expert", balance_epsilon=0.5, home_replicas=2)
    doc = json.loads((tmp_path / "home" / PLACEMENT_FILE).read_text())
    tokens = CalibrationStats.load(sharded / "stats").tokens.numpy()
    for layer, copies in enumerate(doc["assignment"]):
        for e in np.argsort(-tokens[layer], kind="stable")[:2]:
            assert doc["home"] in copies[e]
    assert doc["memory_bytes"] == [memory, memory] and all(u <= m for u, m in zip(doc["server_bytes"], [memory] * 2))
    assert "+home2" in doc["method"]


def test_home_bits_copies_the_low_bit_experts_to_the_home(sharded, tmp_path, capsys):
    """`moecompress shard --home-bits 4`: a checkpoint whose 2 hottest experts per layer are stored at 4 bits (the rest
    at 8; shard.home.home_bit_plan) gets a home copy of exactly those, within the same memory; bad input is refused
    with one line before any placement."""
    import numpy as np
    from conftest import _build

    from moecompress.artifacts.bit_plan import BitPlan
    from moecompress.artifacts.calibration_stats import CalibrationStats
    from moecompress.cli import main
    from moecompress.arch.adapters import describe
    from moecompress.shard.home import home_bit_plan

    model = _build("qwen3_moe")
    layout = describe(model)
    tokens = CalibrationStats.load(sharded / "stats").tokens.numpy()
    hot = [np.argsort(-tokens[i], kind="stable")[:2].tolist() for i in range(len(layout.moe_layers))]
    paths = [m.experts_path for m in layout.moe_layers]
    plan = home_bit_plan(BitPlan.uniform(layout, 8, group_size=32), paths, hot, 4)
    layout, plan, quantized = quantize_tiny(model, plan=plan)
    export_checkpoint(model, layout, plan, quantized, tmp_path / "ck", dtype=torch.float32)
    memory = _doc(sharded, "expert")["memory_bytes"][0]
    base = ["shard", "--model", str(tmp_path / "ck"), "--stats", str(sharded / "stats"), "--servers",
            f"2x{memory}B", "--balance-epsilon", "0.5"]
    assert main(base + ["--out", str(tmp_path / "home"), "--home-bits", "4"]) == 0
    doc = json.loads((tmp_path / "home" / PLACEMENT_FILE).read_text())
    assert doc["mode"] == "expert" and "+home2" in doc["method"]
    for layer, copies in enumerate(doc["assignment"]):
        assert all(doc["home"] in copies[e] for e in hot[layer])
    assert all(u <= m for u, m in zip(doc["server_bytes"], doc["memory_bytes"]))
    capsys.readouterr()
    for extra, message in (
            (["--home-bits", "5"], "error: unsupported bits 5 at --home-bits; allowed: "),
            (["--home-bits", "2"], "error: --home-bits 2: MoE layer 0 (" + paths[0] + ") stores no expert at 2 bits "
                                   "(its bits: 4, 8)"),
            (["--home-bits", "4", "--home-replicas", "3"], "error: --home-bits 4: MoE layer 0 stores 2 experts at 4 "
                                                            "bits, --home-replicas asks for 3"),
            (["--home-bits", "4", "--mode", "pipeline"], "error: --home-bits is for the expert model's home copies")):
        assert main(base + ["--out", str(tmp_path / "bad")] + extra) == 2
        assert capsys.readouterr().err.startswith(message)
        assert not (tmp_path / "bad" / PLACEMENT_FILE).exists()
