"""The built-in demo model's pieces: stdlib corpus, tokenizer, a tiny training run, the cache."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moecompress.builtin import cache, resolve_dataset, resolve_model
from moecompress.builtin.corpus import (
    DOMAINS,
    corpus_digest,
    read_corpus_jsonl,
    split_of,
    stdlib_documents,
    write_corpus_jsonl,
)
from moecompress.builtin.tokenizer import train_tokenizer
from moecompress.builtin.train import BuildSpec, ModelDims, TrainConfig, build_model
from moecompress.errors import MoecompressError

TINY = BuildSpec(
    dims=ModelDims(hidden_size=32, num_layers=2, num_experts=4, top_k=2, moe_intermediate_size=32,
                   num_heads=2, num_kv_heads=1, head_dim=16, vocab_size=384),
    train=TrainConfig(steps=12, seq_len=32, batch_size=8, lr=1e-2, warmup_steps=2, log_every=1,
                      max_chars_per_domain=60_000),
    split_max_chars=5_000,
)
SNIPPET = (
    'def f(x, *a, **kw):\n\t"""Dökümân ✓ — 😀"""\r\n'
    '    return {"k": x ** 2, \'s\': [1, 2.5e-3]}  # end\n\n'
)


def test_corpus_is_deterministic_and_capped():
    a = stdlib_documents(max_chars=20_000)
    b = stdlib_documents(max_chars=20_000)
    assert corpus_digest(a) == corpus_digest(b)
    for domain in DOMAINS:
        chars = sum(len(d["text"]) for d in a if d["domain"] == domain)
        assert chars == 20_000  # the stdlib holds far more than this of either domain
    assert not any("/test/" in f"/{d['doc']}" or d["doc"].startswith("site-packages") for d in a)


def test_calib_and_eval_files_are_disjoint_and_reproducible(tmp_path):
    calib = write_corpus_jsonl(tmp_path / "calib.jsonl.gz", "calib", max_chars=30_000)
    evl = write_corpus_jsonl(tmp_path / "eval.jsonl.gz", "eval", max_chars=30_000)
    again = write_corpus_jsonl(tmp_path / "again.jsonl.gz", "eval", max_chars=30_000)
    assert evl.read_bytes() == again.read_bytes()
    c, e = read_corpus_jsonl(calib), read_corpus_jsonl(evl)
    assert {d["domain"] for d in c} == {d["domain"] for d in e} == set(DOMAINS)
    assert {d["doc"] for d in c}.isdisjoint({d["doc"] for d in e})
    files = lambda docs: {d["doc"].split("#")[0] for d in docs if "#" not in d["doc"]}  # noqa: E731
    assert files(c).isdisjoint(files(e))  # a module's code and docstrings stay in one split
    assert all(split_of(d["doc"]) == "train" for d in c) and all(split_of(d["doc"]) == "eval" for d in e)


def test_tokenizer_round_trip_is_exact(tmp_path):
    texts = [d["text"] for d in stdlib_documents(max_chars=50_000, split="train")]
    tok = train_tokenizer(texts, vocab_size=512)
    assert len(tok) == 512 and tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == 0
    ids = tok.encode(SNIPPET, add_special_tokens=False)
    assert tok.decode(ids) == SNIPPET
    assert len(ids) < len(SNIPPET.encode("utf-8"))  # merges were learned
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode(SNIPPET, add_special_tokens=False) == ids
    assert loaded.decode(ids) == SNIPPET


def test_tiny_build_trains_saves_and_reloads(tmp_path):
    path = tmp_path / "tiny"
    info = build_model(path, TINY, threads=1, progress=False)
    assert json.loads((path / "build_info.json").read_text()) == json.loads(json.dumps(info))
    losses = [loss for _, loss in info["loss_log"]]
    assert info["steps"] == 12 and info["final_loss"] < info["start_loss"] - 0.3
    assert min(losses[-3:]) < min(losses[:3])
    assert set(info["eval_ppl"]) == {*DOMAINS, "all"}
    assert len(info["routing_max_over_mean"]) == TINY.dims.num_layers
    assert (path / "corpus" / "calib.jsonl.gz").is_file() and (path / "corpus" / "eval.jsonl.gz").is_file()

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "qwen3_moe" and model.dtype == torch.float32
    assert model.config.num_experts == 4 and model.config.tie_word_embeddings
    again = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([tok.encode(SNIPPET, add_special_tokens=False)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def _fake_build(out, spec, progress=True):
    out.mkdir(parents=True)
    (out / "build_info.json").write_text("{}")


def test_cache_builds_once_and_never_leaves_half_a_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(cache, "build_model", lambda out, spec, progress: calls.append(out) or _fake_build(out, spec))
    path = cache.builtin_model_dir()
    assert path.parent.parent == tmp_path and (path / "build_info.json").is_file()
    assert cache.builtin_model_dir() == path and resolve_model("builtin:demo-qwen3moe") == str(path)
    assert len(calls) == 1 and calls[0].name == path.name and not list(path.parent.glob(".tmp-*"))

    def interrupted(out, spec, progress):
        _fake_build(out, spec)
        raise KeyboardInterrupt

    monkeypatch.setitem(cache.BUILTIN_MODELS, "other", cache.BUILTIN_MODELS["demo-qwen3moe"])
    monkeypatch.setattr(cache, "build_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.builtin_model_dir("other")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # nothing that looks complete, no leftovers

    def raced(out, spec, progress):  # another process finishes first
        _fake_build(out, spec)
        _fake_build(cache._entry_dir("other"), spec)
        (cache._entry_dir("other") / "winner").touch()

    monkeypatch.setattr(cache, "build_model", raced)
    assert (cache.builtin_model_dir("other") / "winner").is_file()
    assert not list(path.parent.glob(".tmp-*"))


def test_resolve_passes_other_specs_and_builds_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path))
    assert resolve_model("Qwen/Qwen3-30B-A3B") == "Qwen/Qwen3-30B-A3B"
    assert resolve_dataset("/data/calib.jsonl.gz") == "/data/calib.jsonl.gz"
    path = resolve_dataset("builtin:stdlib-eval")
    assert path.startswith(str(tmp_path)) and path.endswith("eval.jsonl.gz")
    assert {d["domain"] for d in read_corpus_jsonl(path)} == set(DOMAINS)
    with pytest.raises(MoecompressError, match="unknown built-in model"):
        resolve_model("builtin:nope")
    with pytest.raises(MoecompressError, match="unknown built-in dataset"):
        resolve_dataset("builtin:nope")
