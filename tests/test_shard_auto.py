"""`moecompress shard --mode auto`: every placement of both execution models timed by the time model (replayed
counters + a measured compute profile + a link profile); the fastest is written and the report says by how much."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import quantize_tiny

from moecompress.calibrate.dataset import CalibrationData
from moecompress.calibrate.options import CalibrationOptions
from moecompress.calibrate.run import calibrate
from moecompress.errors import MoecompressError
from moecompress.execution.timing import PROFILES, ComputeProfile, modeled_time, parse_profile, profile_compute
from moecompress.export.checkpoint import export_checkpoint
from moecompress.format.files import PLACEMENT_FILE
from moecompress.shard.command import checkpoint_layer_sizes, run_shard_command
from moecompress.shard.profile import load_profile, measure_profile, save_profiles


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    from conftest import _build

    tmp = tmp_path_factory.mktemp("auto")
    model = _build("qwen3_moe")
    layout, plan, quantized = quantize_tiny(model)
    export_checkpoint(model, layout, plan, quantized, tmp / "ck", dtype=torch.float32)
    ids = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, None, CalibrationData(input_ids=ids, attention_mask=torch.ones_like(ids)),
                      CalibrationOptions(samples=8, seq_len=32, hessians=False, trace=True, progress=False))
    stats.save(tmp / "stats")
    sizes = checkpoint_layer_sizes(tmp / "ck")
    tmp.joinpath("memory").write_text(str(int(sizes.dense_bytes + sizes.expert_bytes.sum() * 0.7)))
    return tmp


def _profile(sizes, layer_ms: float, moe_ms: float, batch: int = 1) -> ComputeProfile:
    D = len(sizes.layer_dense_bytes)
    moe = [d for d in range(D) if d in sizes.moe_decoder_layers]
    return ComputeProfile(batch=batch, context=32, layer_seconds=tuple(
        (layer_ms + (moe_ms if d in moe else 0.0)) / 1e3 for d in range(D)),
        moe_seconds=(moe_ms / 1e3,) * len(sizes.moe_decoder_layers), moe_decoder_layers=sizes.moe_decoder_layers,
        head_seconds=0.0, source="test")


def _shard(ck, tmp_path, name, profile, link, servers=2):
    path = tmp_path / f"{name}.json"
    save_profiles([profile], path)
    memory = int(ck.joinpath("memory").read_text())
    out = tmp_path / name
    run_shard_command(str(ck / "ck"), str(ck / "stats"), f"{servers}x{memory}B", str(out), link=link,
                      compute_profile=str(path))
    return json.loads((out / PLACEMENT_FILE).read_text())


def test_auto_picks_the_fastest_candidate_by_the_time_model(ck, tmp_path):
    sizes = checkpoint_layer_sizes(ck / "ck")
    # experts dominate compute and the link is fast: spreading them (expert model) must win
    heavy = _shard(ck, tmp_path, "heavy", _profile(sizes, 0.1, 50.0), "fast=100Gbit/s,1us")
    # no compute to spread and a slow link: the fewest hops (pipeline) must win
    light = _shard(ck, tmp_path, "light", _profile(sizes, 0.0, 0.0), "wan")
    assert heavy["mode"] == "expert" and light["mode"] == "pipeline"
    for doc in (heavy, light):
        choice = doc["traffic"]["choice"]
        timed = [r for r in choice["candidates"] if "error" not in r]
        names = {r["name"] for r in timed}
        assert {"pipeline: all_servers", "expert: greedy_balanced", "expert: affinity"} <= names
        assert len(timed) >= 6  # 6 without replicas, + those with replicas that differ
        best = next(r for r in timed if r["name"] == choice["chosen"])
        fastest = min(timed, key=lambda r: r["ms_per_step"])
        assert choice["fastest"] == fastest["name"]
        assert doc["method"] == best["method"] and choice["chosen"].startswith(doc["mode"])
        # the chosen is never slower than the fastest by more than the margin
        assert best["ms_per_step"] <= fastest["ms_per_step"] / (1 - choice["margin"]) + 1e-9
        for r in timed:  # the report's margins are the modeled times' ratio, and the parts add up
            assert r["chosen_faster_by"] == pytest.approx(1 - best["ms_per_step"] / r["ms_per_step"])
            assert r["ms_per_step"] == pytest.approx(r["compute_ms"] + r["latency_ms"] + r["transfer_ms"])
            assert r["chosen_faster_by"] >= -choice["margin"] / (1 - choice["margin"])

    # with the light profile every time is latency + transfer: hops x 5 ms + bytes / 12.5 MB/s
    for r in light["traffic"]["choice"]["candidates"]:
        assert r["compute_ms"] == 0.0
        assert r["latency_ms"] == pytest.approx(r["round_trips_per_step"] * 2 * 5.0)
        assert r["transfer_ms"] == pytest.approx(r["bytes_per_step"] / 12.5e6 * 1e3)


def test_pick_keeps_a_baseline_unless_another_wins_by_the_margin():
    from moecompress.shard.choose import pick

    def row(name, ms, baseline=True):
        return {"name": name, "ms_per_step": ms, "baseline": baseline}

    base = [row("expert: round_robin", 100.0), row("expert: greedy_balanced", 100.3), row("pipeline: all_servers", 120)]
    # baselines within `tie` of each other: the preferred one (greedy_balanced before round_robin)
    assert pick(base, 0.02, 0.005)["name"] == "expert: greedy_balanced"
    assert pick(base, 0.02, 0.001)["name"] == "expert: round_robin"  # a tighter tie: the faster
    ours = row("expert: affinity", 98.5, False)
    assert pick(base + [ours], 0.02, 0.005)["name"] == "expert: greedy_balanced"  # 1.8 % < the margin
    assert pick(base + [ours], 0.01, 0.005)["name"] == "expert: affinity"
    rep = row("expert: greedy_balanced + replicas", 95.0, False)
    assert pick(base + [ours, rep], 0.02, 0.005)["name"] == "expert: greedy_balanced + replicas"
    assert pick([ours, rep], 0.1, 0.005)["name"] == "expert: affinity"  # replicas come last in the walk


def test_profile_compute_on_the_critical_path():
    from moecompress.artifacts.placement import Placement
    from moecompress.execution.counters import Counters

    prof = ComputeProfile(batch=1, context=4, layer_seconds=(3.0, 5.0), moe_seconds=(2.0, 4.0),
                          moe_decoder_layers=(0, 1), head_seconds=1.0)
    pipe = Placement(assignment=(((0,),) * 2, ((1,),) * 2), expert_bytes=((1,) * 2,) * 2, dense_bytes=1,
                     dense_servers=(0, 1), mode="pipeline", layer_servers=(0, 1), memory_bytes=(100, 100),
                     server_dense_bytes=(1, 1))
    assert profile_compute(pipe, Counters(2, 2), prof) == 1.0 + 3.0 + 5.0  # stages one after the other
    expert = Placement(assignment=(((0,), (1,)), ((0,), (1,))), expert_bytes=((1,) * 2,) * 2, dense_bytes=1,
                       dense_servers=(0,), memory_bytes=(100, 100))
    c = Counters(2, 2)
    c.pairs[:] = [[1, 3], [2, 2]]  # layer 0: server 1 computes 3/4 of the pairs; layer 1: half each
    # home: head + dense parts (1 + (3-2) + (5-4)) = 3; layer 0 busiest 2 x 3/4, layer 1 4 x 1/2
    assert profile_compute(expert, c, prof) == pytest.approx(3.0 + 1.5 + 2.0)
    assert modeled_time(c, PROFILES["lan"], 1.0).seconds == pytest.approx(1.0)  # no hops, no bytes counted
    # the dispatch: the home routes each layer (0.1, 0.2) and handles each request (0.3 per request); the server
    # decodes/encodes each (0.5): 2 calls, layer 0 sent 2 requests (1 per call), layer 1 one
    from dataclasses import replace

    disp = replace(prof, dispatch_seconds=(0.1, 0.2), message_seconds=(0.3, 0.3), serve_seconds=(0.5, 0.5))
    c.calls = 2
    c.messages[0, 0, 1], c.messages[1, 0, 1] = 2, 1
    # home: 3 + 0.1 + 0.2 + 0.3 x 1.5; layer 0: max(2 x 1/4, 2 x 3/4 + 0.5 x 1); layer 1: max(2, 2 + 0.5 x 0.5)
    assert profile_compute(expert, c, disp) == pytest.approx(3.0 + 0.3 + 0.45 + 2.0 + 2.25)
    assert ComputeProfile.from_json(disp.to_json()) == disp
    old = {k: v for k, v in prof.to_json().items() if not k.endswith(("dispatch_seconds", "message_seconds",
                                                                      "serve_seconds"))}
    assert ComputeProfile.from_json(old) == prof  # a profile file written before the dispatch was measured
    with pytest.raises(MoecompressError, match="dispatch_seconds needs one entry per MoE layer"):
        replace(prof, dispatch_seconds=(0.1,))
    # the transport round trip (0.05 per request: 1.5 requests per call) and a generation step's own work (0.25)
    # go on the home's path; the pipeline pays the round trip per two hops (3 hops per call here)
    full = replace(disp, transport_seconds=0.05, generate_seconds=0.25)
    assert profile_compute(expert, c, full) == pytest.approx(3.0 + 0.3 + 0.45 + 2.0 + 2.25 + 1.5 * 0.05 + 0.25)
    c.hops[:] = [4, 2]
    assert profile_compute(pipe, c, full) == pytest.approx(1.0 + 3.0 + 5.0 + 0.25 + 1.5 * 0.05)
    assert ComputeProfile.from_json(full.to_json()) == full
    with pytest.raises(MoecompressError, match="seconds must be >= 0"):
        replace(prof, transport_seconds=-1.0)


def test_measured_profile_and_errors(ck, tmp_path):
    sizes = checkpoint_layer_sizes(ck / "ck")
    prof = measure_profile(ck / "ck", batch=2, context=8, reps=1, dtype=torch.float32)
    assert len(prof.layer_seconds) == len(sizes.layer_dense_bytes) and prof.batch == 2
    assert len(prof.moe_seconds) == len(sizes.moe_decoder_layers)
    assert all(m <= prof.layer_seconds[d] for m, d in zip(prof.moe_seconds, prof.moe_decoder_layers))
    assert sum(prof.moe_seconds) > 0
    L = len(sizes.moe_decoder_layers)  # the dispatch, measured on the runtime's own dispatcher
    assert len(prof.dispatch_seconds) == len(prof.message_seconds) == len(prof.serve_seconds) == L
    assert sum(prof.dispatch_seconds) > 0 and sum(prof.message_seconds) > 0 and sum(prof.serve_seconds) > 0
    assert prof.transport_seconds > 0 and prof.generate_seconds >= 0  # a real gloo round trip on loopback
    save_profiles([prof], tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json", 2) == prof
    with pytest.raises(MoecompressError, match=r"batch sizes \[2\], not 8"):
        load_profile(tmp_path / "p.json", 8)
    with pytest.raises(MoecompressError, match="NAME=RATE,LATENCY"):
        parse_profile("lan2")
    assert parse_profile("edge=200Mbit/s,2ms").latency_seconds == pytest.approx(2e-3)


def test_method_implies_its_mode(ck, tmp_path):
    memory = int(ck.joinpath("memory").read_text())
    p = run_shard_command(str(ck / "ck"), str(ck / "stats"), f"2x{memory}B", str(tmp_path / "o"),
                          method="greedy_balanced", replicate=False)
    assert p.mode == "expert" and p.method == "greedy_balanced"
    with pytest.raises(MoecompressError, match="does not exist; allowed: contiguous"):
        run_shard_command(str(ck / "ck"), str(ck / "stats"), f"2x{memory}B", str(tmp_path / "p"), method="greedy")


@pytest.mark.slow  # ~30 s: each profile run times the transport between two local processes
def test_profile_command_writes_a_loadable_profile(ck, tmp_path, capsys):
    from moecompress.cli import main

    out = tmp_path / "prof.json"
    assert main(["profile", "--model", str(ck / "ck"), "--out", str(out), "--batch", "1,2", "--context", "8",
                 "--reps", "1"]) == 0
    assert [load_profile(out, b).batch for b in (1, 2)] == [1, 2]
    assert load_profile(out, 1).dtype == "float32"  # the deployment's default
    assert main(["profile", "--model", str(ck / "ck"), "--out", str(out), "--batch", "1", "--context", "8",
                 "--reps", "1", "--dtype", "bfloat16"]) == 0
    assert load_profile(out, 1).dtype == "bfloat16" and "bfloat16" in load_profile(out, 1).source
    assert "wrote" in capsys.readouterr().out


def _two_links(name, lan, wan, baseline=True):
    return {"name": name, "baseline": baseline, "links": {"lan": {"ms_per_step": lan}, "wan": {"ms_per_step": wan}}}


def test_robust_pick_over_two_links_when_the_lan_best_loses_on_the_wan():
    from moecompress.shard.choose import pick, score

    rows = [_two_links("pipeline: all_servers", 80.0, 99.0), _two_links("expert: greedy_balanced", 71.0, 114.0),
            _two_links("expert: affinity", 75.0, 100.0, baseline=False)]
    best = score(rows, ["lan", "wan"])
    assert best == {"lan": {"name": "expert: greedy_balanced", "ms_per_step": 71.0},
                    "wan": {"name": "pipeline: all_servers", "ms_per_step": 99.0}}
    assert [r["score"] for r in rows] == pytest.approx([80 / 71, 114 / 99, 75 / 71])
    # planned for the LAN alone, greedy_balanced wins; it is 15 % slower than the pipeline on the WAN
    lan_only = [{"name": r["name"], "baseline": r["baseline"], "ms_per_step": r["links"]["lan"]["ms_per_step"]}
                for r in rows]
    assert pick(lan_only)["name"] == "expert: greedy_balanced"
    # no candidate is within the tie of both best baselines: minimax regret -> affinity (worst 1.056 on the LAN,
    # against 1.127 for the pipeline and 1.152 for greedy_balanced)
    assert pick(rows)["name"] == "expert: affinity"
    # a candidate as fast as the best baseline on both links is taken whatever its place in the walk
    rows.append(_two_links("pipeline: fewest_servers", 71.2, 98.0))
    score(rows, ["lan", "wan"])
    chosen = pick(rows)
    assert chosen["name"] == "pipeline: fewest_servers" and chosen["score"] == pytest.approx(71.2 / 71)
    # among rows within the tie on both links the preference walk decides: a baseline (all_servers) within 1 %
    rows[0]["links"] = {"lan": {"ms_per_step": 71.3}, "wan": {"ms_per_step": 98.5}}
    score(rows, ["lan", "wan"])
    assert pick(rows)["name"] == "pipeline: all_servers"


def test_parse_profiles():
    from moecompress.execution.timing import parse_profiles

    assert [p.name for p in parse_profiles(None)] == ["lan", "wan"]
    assert parse_profiles("wan") == (PROFILES["wan"],)
    two = parse_profiles("lan+edge=200Mbit/s,2ms")
    assert [p.name for p in two] == ["lan", "edge"] and two[1].bytes_per_second == pytest.approx(25e6)
    with pytest.raises(MoecompressError, match="distinct names"):
        parse_profiles("lan+lan")


def test_default_plans_for_lan_and_wan_together(ck, tmp_path):
    sizes = checkpoint_layer_sizes(ck / "ck")
    doc = _shard(ck, tmp_path, "both", _profile(sizes, 0.5, 2.0), None)
    choice = doc["traffic"]["choice"]
    assert choice["links"] == ["lan", "wan"]
    timed = [r for r in choice["candidates"] if "error" not in r]
    chosen = next(r for r in timed if r["name"] == choice["chosen"])
    for lname in ("lan", "wan"):  # the ratios are to the fastest baseline of each link
        base = min(r["links"][lname]["ms_per_step"] for r in timed if r["baseline"])
        assert choice["best_baseline"][lname]["ms_per_step"] == pytest.approx(base)
        for r in timed:
            assert r["ratios"][lname] == pytest.approx(r["links"][lname]["ms_per_step"] / base)
    best_score = min(r["score"] for r in timed)
    assert choice["robust"] == (best_score <= 1 + choice["tie"])
    assert chosen["score"] == pytest.approx(choice["worst_ratio"])
    assert chosen["score"] <= best_score / (1 - choice["margin"]) + 1e-9
    if choice["robust"]:  # never slower than the best baseline by more than the tie, on either link
        assert all(v <= 1 + choice["tie"] + 1e-12 for v in chosen["ratios"].values())
    # the same candidates' times as planning for each link alone
    lan = _shard(ck, tmp_path, "lan", _profile(sizes, 0.5, 2.0), "lan")["traffic"]["choice"]
    for r in (r for r in lan["candidates"] if "error" not in r):
        both = next(x for x in timed if x["name"] == r["name"])
        assert both["links"]["lan"]["ms_per_step"] == pytest.approx(r["ms_per_step"])
