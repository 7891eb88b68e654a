"""Calibration: counts against the routers' own outputs, Hessians against the experts' routed inputs, padding,
rare experts, save/load, unchanged outputs, layer-by-layer == whole-model, datasets."""
from __future__ import annotations

import gzip
import json
import math
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moecompress.arch import describe, proj_bias, proj_weights
from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.calibrate import CalibrationData, CalibrationOptions, DatasetSpec, build_calibration_data, calibrate
from moecompress.calibrate import hooks as hooks_mod
from moecompress.calibrate.hooks import INTERFACE_NAME, RoutingHooks
from moecompress.calibrate.plots import save_plots
from moecompress.calibrate.recorder import RecordSpec, RoutingRecorder
from moecompress.calibrate.report import format_summary
from moecompress.errors import MoecompressError

from conftest import SUPPORTED_TYPES

REPO = Path(__file__).resolve().parents[1]
REF_MODEL = REPO.parent / "shared" / "models" / "refmoe-qwen3"
REF_CALIB = REPO.parent / "shared" / "data" / "corpus" / "calib.jsonl.gz"
OPTS = CalibrationOptions(batch_size=2, progress=False)


def _data(n: int = 4, seq_len: int = 16, seed: int = 0, pad: tuple[int, ...] = (10,), vocab: int = 128):
    """n random sequences; sequence i < len(pad) keeps only pad[i] tokens (right padding); domains a/b alternate."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    for i, keep in enumerate(pad):
        mask[i, keep:] = 0
        ids[i, keep:] = 0
    return CalibrationData(ids, mask, torch.arange(n) % 2, ("a", "b"))


def _multi_hot(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(idx.shape[0], num_experts, dtype=torch.int64).scatter_(1, idx.long(), 1)


def _router_decision(out, num_tokens: int):
    """(top-k indices, top-k weights) among a router's outputs: the integer and the floating [T, K] tensors
    (transformers 5.x routers return (logits, weights, indices); the order has changed between releases)."""
    two_d = [t for t in out if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == num_tokens]
    idx = [t for t in two_d if not t.is_floating_point()]
    w = [t for t in two_d if t.is_floating_point() and idx and t.shape == idx[0].shape]
    assert len(idx) == 1 and len(w) == 1, f"cannot tell the router's top-k indices and weights: {len(out)} outputs"
    return idx[0], w[0]


def _capture(model, paths, store):
    """Forward pre-hooks recording the positional inputs of the modules at `paths`."""
    handles = []
    for p in paths:
        def hook(mod, args, p=p):
            store.setdefault(p, []).append(tuple(a.detach().clone() for a in args))
        handles.append(model.get_submodule(p).register_forward_pre_hook(hook))
    return handles


def _assert_stats_equal(a: CalibrationStats, b: CalibrationStats, exact: bool = True):
    for name in ("tokens", "coactivation", "paths", "domain_tokens", "hessian_tokens"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name
    torch.testing.assert_close(a.mass, b.mass)
    assert sorted(a.hessians) == sorted(b.hessians) and sorted(a.dense_hessians) == sorted(b.dense_hessians)
    for k in a.hessians:
        if exact:
            assert torch.equal(a.hessians[k], b.hessians[k]), k
        else:
            torch.testing.assert_close(a.hessians[k], b.hessians[k], rtol=1e-4, atol=1e-4, msg=k)
    for k in a.dense_hessians:
        torch.testing.assert_close(a.dense_hessians[k], b.dense_hessians[k], rtol=1e-4, atol=1e-4)
    assert a.num_tokens == b.num_tokens


@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_counts_equal_router_outputs(tiny_model, model_type):
    model = tiny_model(model_type)
    lay = describe(model)
    data = _data()
    store: dict = {}
    handles = _capture(model, [m.block_path for m in lay.moe_layers], store)
    try:
        stats = calibrate(model, None, data, CalibrationOptions(batch_size=2, hessians=False, progress=False))
    finally:
        for h in handles:
            h.remove()
    keep = data.attention_mask.reshape(-1).bool()
    dom = data.domain_ids.repeat_interleave(data.seq_len)[keep]
    E = stats.num_experts
    hots = []
    with torch.no_grad():
        for m in lay.moe_layers:
            x = torch.cat([a[0].reshape(-1, lay.hidden_size) for a in store[m.block_path]])
            idx, w = _router_decision(model.get_submodule(m.router_path)(x), x.shape[0])  # the router's own
            idx, w = idx[keep], w[keep].double()
            hot = _multi_hot(idx, E)
            hots.append(hot)
            assert torch.equal(stats.tokens[m.layer], torch.bincount(idx.flatten(), minlength=E))
            torch.testing.assert_close(stats.mass[m.layer], torch.bincount(idx.flatten(), w.flatten(), minlength=E))
            assert torch.equal(stats.coactivation[m.layer], hot.T @ hot)
            for d in range(2):
                sel = idx[dom == d].flatten()
                assert torch.equal(stats.domain_tokens[d, m.layer], torch.bincount(sel, minlength=E))
    for l in range(len(hots) - 1):
        assert torch.equal(stats.paths[l], hots[l].T @ hots[l + 1])
    assert stats.num_tokens == int(keep.sum())
    assert torch.equal(stats.tokens.sum(1), torch.full((lay.num_layers,), stats.num_tokens * stats.top_k))
    assert torch.equal(stats.domain_tokens.sum(0), stats.tokens)
    torch.testing.assert_close(stats.domain_mass.sum(0), stats.mass)
    assert stats.coactivation.diagonal(dim1=1, dim2=2).equal(stats.tokens)


@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_hessians_equal_routed_inputs(tiny_model, model_type):
    model = tiny_model(model_type)
    lay = describe(model)
    data = _data()
    store: dict = {}
    handles = _capture(model, [m.experts_path for m in lay.moe_layers], store)
    try:
        stats = calibrate(model, None, data, OPTS)
    finally:
        for h in handles:
            h.remove()
    keep = data.attention_mask.reshape(-1).bool()
    with torch.no_grad():
        for m in lay.moe_layers:
            experts = model.get_submodule(m.experts_path)
            x = torch.cat([a[0] for a in store[m.experts_path]])[keep]
            idx = torch.cat([a[1] for a in store[m.experts_path]])[keep]
            w = torch.cat([a[2] for a in store[m.experts_path]])[keep].float()
            first = m.projs[0].name
            w_down, b_down = proj_weights(experts, m, "down"), proj_bias(experts, m, "down")
            for e in range(m.num_experts):
                t, j = (idx == e).nonzero(as_tuple=True)
                xe, we = x[t], w[t, j].unsqueeze(1)
                torch.testing.assert_close(stats.hessian(m.layer, first)[e], xe.T @ xe, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(stats.hessian(m.layer, first, weighted=True)[e], (we * xe).T @ (we * xe),
                                           rtol=1e-4, atol=1e-5)
                assert int(stats.hessian_tokens[m.layer, e]) == len(t)
                # down: the experts' own forward gives y = W_down a (+ b); so W H_down W^T must equal Y^T Y.
                y = experts(xe, torch.full((len(t), 1), e), torch.ones(len(t), 1))
                if b_down is not None:
                    y = y - b_down[e]
                for weighted, yy in ((False, y), (True, we * y)):
                    hd = stats.hessian(m.layer, "down", weighted)[e]
                    torch.testing.assert_close(w_down[e] @ hd @ w_down[e].T, yy.T @ yy, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_padding_excluded(tiny_model, model_type):
    model = tiny_model(model_type)
    padded = _data(n=2, seq_len=16, pad=(10,))
    opts = CalibrationOptions(batch_size=2, progress=False, dense_hessians=True)
    both = calibrate(model, None, padded, opts)
    parts = [calibrate(model, None, CalibrationData(padded.input_ids[i:i + 1, :n], padded.attention_mask[i:i + 1, :n],
                                                    padded.domain_ids[i:i + 1], padded.domains), opts)
             for i, n in ((0, 10), (1, 16))]
    assert both.num_tokens == 26 == parts[0].num_tokens + parts[1].num_tokens
    for name in ("tokens", "coactivation", "paths", "domain_tokens", "hessian_tokens"):
        assert torch.equal(getattr(both, name), getattr(parts[0], name) + getattr(parts[1], name)), name
    torch.testing.assert_close(both.mass, parts[0].mass + parts[1].mass)
    for k in both.hessians:
        torch.testing.assert_close(both.hessians[k], parts[0].hessians[k] + parts[1].hessians[k],
                                   rtol=1e-4, atol=1e-4)
    for k in both.dense_hessians:
        torch.testing.assert_close(both.dense_hessians[k], parts[0].dense_hessians[k] + parts[1].dense_hessians[k],
                                   rtol=1e-4, atol=1e-4)
    assert both.dense_tokens == 26


@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_outputs_unchanged_and_config_restored(tiny_model, model_type):
    model = tiny_model(model_type)
    lay = describe(model)
    ids = _data().input_ids
    for impl in ("grouped_mm", "eager"):
        model.set_experts_implementation(impl)
        with torch.no_grad():
            ref = model(ids).logits
            rec = RoutingRecorder(lay, 0, RecordSpec(hessians=True))
            with RoutingHooks(model, lay, rec, dense_paths=lay.attention_linears):
                assert model.config._experts_implementation == INTERFACE_NAME
                rec.begin_batch(0, torch.ones_like(ids))
                out = model(ids).logits
        assert torch.equal(out, ref)
        assert rec.tokens.sum() > 0 and rec.dense
        assert model.config._experts_implementation == impl
        assert not any(hooks_mod._TAP_ATTR in model.get_submodule(m.experts_path).__dict__ for m in lay.moe_layers)
        assert not any(model.get_submodule(p)._forward_pre_hooks for p in lay.attention_linears)


def test_pre_hook_fallback_records_the_same(tiny_model, monkeypatch):
    model = tiny_model("qwen3_moe")
    via_interface = calibrate(model, None, _data(), OPTS)
    monkeypatch.setattr(hooks_mod, "uses_experts_interface", lambda experts: False)
    via_pre_hook = calibrate(model, None, _data(), OPTS)
    _assert_stats_equal(via_interface, via_pre_hook)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_rare_experts_reported_and_nan_free(tiny_model, model_type):
    model = tiny_model(model_type)
    data = _data(n=1, seq_len=2, pad=())  # 2 tokens x top-2: at most 4 of 8 experts per layer see a token
    stats = calibrate(model, None, data, CalibrationOptions(batch_size=1, progress=False, dense_hessians=True))
    zero = stats.tokens == 0
    assert zero.sum(1).min() >= stats.num_experts - 4
    assert torch.equal(stats.mean_weight[zero], torch.zeros(int(zero.sum()), dtype=torch.float64))
    for k, h in stats.hessians.items():
        assert torch.isfinite(h).all(), k
        assert h[zero[int(k.split(".")[0])]].abs().sum() == 0, k
    assert all(torch.isfinite(v).all() for v in (stats.mass, stats.mean_weight, stats.load_share))
    under = stats.under_covered()
    assert set(under) == {(l, e) for l, e in (stats.tokens < 16).nonzero().tolist()}
    summary = stats.layer_summary()
    assert summary[0]["dead_experts"] == [int(e) for e in zero[0].nonzero().flatten()]
    assert "dead experts" in format_summary(stats)


def test_all_experts_mode(tiny_model):
    model = tiny_model("qwen3_moe")
    lay = describe(model)
    data = _data()
    routed = calibrate(model, None, data, OPTS)
    store: dict = {}
    handles = _capture(model, [m.experts_path for m in lay.moe_layers], store)
    try:
        every = calibrate(model, None, data, CalibrationOptions(batch_size=2, progress=False, all_experts=True))
    finally:
        for h in handles:
            h.remove()
    keep = data.attention_mask.reshape(-1).bool()
    assert torch.equal(every.tokens, routed.tokens) and torch.equal(every.paths, routed.paths)
    assert (every.hessian_tokens == every.num_tokens).all() and every.under_covered() == []
    with torch.no_grad():
        for m in lay.moe_layers:
            experts = model.get_submodule(m.experts_path)
            x = torch.cat([a[0] for a in store[m.experts_path]])[keep]
            y = experts(x, torch.zeros(len(x), 1, dtype=torch.int64), torch.ones(len(x), 1))  # expert 0, all tokens
            wd = proj_weights(experts, m, "down")[0]
            for e in range(m.num_experts):
                torch.testing.assert_close(every.hessian(m.layer, "gate_up")[e], x.T @ x, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(wd @ every.hessian(m.layer, "down")[0] @ wd.T, y.T @ y, rtol=1e-3, atol=1e-4)
            for proj in ("gate_up", "down"):  # weighted Hessians stay routed (unrouted tokens weigh 0)
                torch.testing.assert_close(every.hessian(m.layer, proj, True), routed.hessian(m.layer, proj, True),
                                           rtol=1e-4, atol=1e-5)


def test_trace_matches_counts(tiny_model):
    model = tiny_model("mixtral")
    stats = calibrate(model, None, _data(), CalibrationOptions(batch_size=2, progress=False, trace=True,
                                                               hessians=False))
    T, L, K = stats.trace_indices.shape
    assert (T, L, K) == (stats.num_tokens, stats.num_layers, stats.top_k)
    for l in range(L):
        flat = stats.trace_indices[:, l].flatten().long()
        assert torch.equal(torch.bincount(flat, minlength=stats.num_experts), stats.tokens[l])
        torch.testing.assert_close(torch.bincount(flat, stats.trace_weights[:, l].flatten().double(),
                                                  minlength=stats.num_experts), stats.mass[l])
    hot = [_multi_hot(stats.trace_indices[:, l], stats.num_experts) for l in range(L)]
    assert torch.equal(stats.paths[0], hot[0].T @ hot[1])


def test_dense_hessians_equal_linear_inputs(tiny_model):
    model = tiny_model("qwen2_moe")
    lay = describe(model)
    paths = (lay.attention_linears[0], lay.shared_expert_linears[-1])
    data = _data()
    store: dict = {}
    handles = _capture(model, paths, store)
    try:
        stats = calibrate(model, None, data, CalibrationOptions(batch_size=2, progress=False, dense_hessians=paths))
    finally:
        for h in handles:
            h.remove()
    keep = data.attention_mask.reshape(-1).bool()
    assert sorted(stats.dense_hessians) == sorted(paths)
    for p in paths:
        x = torch.cat([a[0].reshape(-1, a[0].shape[-1]) for a in store[p]])[keep]
        torch.testing.assert_close(stats.dense_hessians[p], x.T @ x, rtol=1e-4, atol=1e-5)
    assert stats.dense_tokens == int(keep.sum())
    everything = calibrate(model, None, data, CalibrationOptions(batch_size=2, progress=False, dense_hessians=True))
    assert sorted(everything.dense_hessians) == sorted(lay.attention_linears + lay.shared_expert_linears)
    with pytest.raises(MoecompressError, match="not nn.Linear"):
        calibrate(model, None, data, CalibrationOptions(progress=False, dense_hessians=(lay.moe_layers[0].block_path,)))


def test_save_load_roundtrip(tiny_model, tmp_path):
    model = tiny_model("deepseek_v3")
    stats = calibrate(model, None, _data(), CalibrationOptions(batch_size=2, progress=False, trace=True,
                                                               dense_hessians=True, hessian_dtype="float64"))
    stats.save(tmp_path)
    back = CalibrationStats.load(tmp_path)
    for f in ("model_type", "experts_paths", "num_experts", "top_k", "num_tokens", "seq_len", "samples", "seed",
              "dataset", "domains", "hessian_dtype", "all_experts", "dense_tokens", "min_tokens"):
        assert getattr(back, f) == getattr(stats, f), f
    for f in ("tokens", "mass", "coactivation", "paths", "domain_tokens", "domain_mass", "hessian_tokens",
              "trace_indices", "trace_weights"):
        a, b = getattr(stats, f), getattr(back, f)
        assert a.dtype == b.dtype and torch.equal(a, b), f
    for d_a, d_b in ((stats.hessians, back.hessians), (stats.dense_hessians, back.dense_hessians)):
        assert sorted(d_a) == sorted(d_b)
        assert all(torch.equal(d_a[k], d_b[k]) and d_b[k].dtype == torch.float64 for k in d_a)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["layers"]) == stats.num_layers
    paths = save_plots(back, tmp_path)
    assert {p.name for p in paths} == {"popularity.png", "domain_popularity.png", "coactivation.png"}
    assert all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(MoecompressError, match="not a calibration stats directory"):
        CalibrationStats.load(tmp_path / "nope")


@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_layerwise_equals_whole_model(tiny_model, model_type, tmp_path):
    tiny_model(model_type).save_pretrained(tmp_path)
    opts = CalibrationOptions(batch_size=2, progress=False, dense_hessians=True, trace=True)
    whole = calibrate(str(tmp_path), None, _data(), opts)
    layerwise = calibrate(str(tmp_path), None, _data(), CalibrationOptions(
        **{**opts.__dict__, "layerwise": True, "hessian_dir": str(tmp_path / "h")}))
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == [
        f"hessians.{l}.safetensors" for l in range(whole.num_layers)]  # written layer by layer
    _assert_stats_equal(whole, layerwise, exact=False)
    assert torch.equal(whole.trace_indices, layerwise.trace_indices)


def test_layerwise_needs_a_directory(tiny_model):
    with pytest.raises(MoecompressError, match="checkpoint directory"):
        calibrate(tiny_model("olmoe"), None, _data(), CalibrationOptions(layerwise=True, progress=False))


# ---- datasets ------------------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character (ids 3..), EOS 2, pad 0: enough for the packing rules."""

    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [3 + ord(c) for c in text]}


def _jsonl(path: Path, rows) -> Path:
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def test_dataset_jsonl_domains_deterministic(tmp_path):
    rows = [{"text": f"{d} document {i} " * 3, "domain": d} for d in ("x", "y", "z") for i in range(20)]
    rows += [{"text": "short tail", "domain": "w"}]
    path = _jsonl(tmp_path / "c.jsonl.gz", rows)
    tok = CharTokenizer()
    a = build_calibration_data(path, tok, samples=13, seq_len=32, seed=1)
    b = build_calibration_data(str(path), tok, samples=13, seq_len=32, seed=1)
    c = build_calibration_data(path, tok, samples=13, seq_len=32, seed=2)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert a.domains == ("w", "x", "y", "z") and a.input_ids.shape == (13, 32)
    counts = torch.bincount(a.domain_ids, minlength=4).tolist()
    assert counts == [1, 4, 4, 4]  # round-robin; "w" has one short (padded) window only
    w_row = int((a.domain_ids == 0).nonzero()[0])
    assert int(a.attention_mask[w_row].sum()) == len("short tail") and a.attention_mask.sum() == 12 * 32 + 10
    for i in range(13):  # a sequence never mixes domains ("document" has none of the letters w, x, y, z)
        text = "".join(chr(t - 3) for t in a.input_ids[i].tolist() if t >= 3)
        own = a.domains[int(a.domain_ids[i])]
        assert own == "w" or own in text and not any(d in text for d in "xyz" if d != own)
    with pytest.raises(MoecompressError, match="only"):
        build_calibration_data(path, tok, samples=10_000, seq_len=32)


def test_dataset_txt_paragraphs_and_errors(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first paragraph\nstill first\n\n\nsecond one\n  \nthird")
    from moecompress.calibrate.dataset import read_documents

    docs = read_documents(DatasetSpec.parse(txt))
    assert [d for d, _ in docs] == ["first paragraph\nstill first", "second one", "third"]
    assert all(dom is None for _, dom in docs)
    data = build_calibration_data(txt, CharTokenizer(), samples=2, seq_len=8)
    assert data.domain_ids is None and data.domains == () and data.input_ids.shape == (2, 8)
    with pytest.raises(MoecompressError, match="not a file"):
        DatasetSpec.parse(tmp_path / "missing.jsonl")
    (tmp_path / "c.csv").write_text("a")
    with pytest.raises(MoecompressError, match="extension"):
        DatasetSpec.parse(tmp_path / "c.csv")
    assert DatasetSpec.parse("hf:wikitext:wikitext-2-raw-v1:test") == DatasetSpec(
        "wikitext", hub=True, config="wikitext-2-raw-v1", split="test")
    with pytest.raises(MoecompressError, match="positive"):
        CalibrationOptions(samples=0)


# ---- reference model / memory (slow) ----------------------------------------------------------------------

needs_ref = pytest.mark.skipif(not (REF_MODEL.is_dir() and REF_CALIB.is_file()), reason="../shared reference absent")


@pytest.mark.slow
@needs_ref
def test_command_on_reference_model(tmp_path, capsys):
    from moecompress.calibrate.command import run_calibrate_command

    stats = run_calibrate_command(str(REF_MODEL), str(REF_CALIB), samples=18, seq_len=64, out=tmp_path / "c",
                                  progress=False)
    assert stats.num_tokens == 18 * 64 and len(stats.domains) == 9
    assert {p.name for p in (tmp_path / "c").iterdir()} >= {"stats.safetensors", "summary.json", "popularity.png",
                                                            "domain_popularity.png", "coactivation.png"}
    assert "max/mean load" in capsys.readouterr().out
    layerwise = calibrate(str(REF_MODEL), None, str(REF_CALIB),
                          CalibrationOptions(samples=18, seq_len=64, progress=False, layerwise=True))
    _assert_stats_equal(CalibrationStats.load(tmp_path / "c"), layerwise, exact=False)


_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
_CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from moecompress.calibrate import CalibrationData, CalibrationOptions, calibrate
    if sys.argv[2] == "baseline":  # everything but weights: the architecture's code, a meta skeleton, a matmul
        with init_empty_weights(include_buffers=False):
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))
        torch.randn(256, 256) @ torch.randn(256, 256)
    else:
        ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
        stats = calibrate(sys.argv[1], None, CalibrationData(ids, torch.ones_like(ids)),
                          CalibrationOptions(batch_size=2, progress=False, layerwise=True, hessian_dir=sys.argv[3]))
        stats.save(sys.argv[3])
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


@pytest.mark.slow
def test_layerwise_peak_memory_bounded(tmp_path):
    """Layer-by-layer calibration (Hessians included, written per layer) of a ~300 MB checkpoint peaks at less
    than half the model's size above a baseline process that holds everything but weights."""
    from moecompress.arch.tiny import tiny_config, reinit_
    from transformers import AutoModelForCausalLM

    # ~300 MB of fp32 weights: 24 decoder layers of ~12.6 MB (16 experts of 256 x 256), saved as safetensors.
    cfg = tiny_config("qwen3_moe", hidden_size=256, moe_intermediate_size=256, num_local_experts=16,
                      num_hidden_layers=24, vocab_size=256, num_attention_heads=4, head_dim=64)
    model = reinit_(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), seed=0).eval()
    model.save_pretrained(tmp_path / "m")
    size = sum(f.stat().st_size for f in (tmp_path / "m").glob("*.safetensors"))
    assert size > 280e6
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def child(mode: str) -> int:
        # Through a small launcher: Linux carries a parent's peak RSS into a child it execs directly (ru_maxrss
        # keeps the old address space's high-water mark across execve), and this parent holds the model.
        cmd = [sys.executable, "-c", _CHILD, str(tmp_path / "m"), mode, str(tmp_path / "s")]
        out = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True, env=env,
                             check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kb"] * 1024

    baseline, peak = child("baseline"), child("layerwise")
    print(f"layer-by-layer peak RSS {peak / 1e6:.0f} MB, baseline {baseline / 1e6:.0f} MB, model {size / 1e6:.0f} MB")
    assert peak < baseline + 0.5 * size, (baseline / 1e6, peak / 1e6, size / 1e6)
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    whole = calibrate(model, None, CalibrationData(ids, torch.ones_like(ids)),
                      CalibrationOptions(batch_size=2, progress=False))
    _assert_stats_equal(whole, CalibrationStats.load(tmp_path / "s"), exact=False)
