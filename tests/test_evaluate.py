"""Evaluation: NLL/perplexity and KL against hand computations, domain weighting, padding, sizes, results I/O."""
from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import quantize_tiny
from torch import nn

from moecompress.artifacts.bit_plan import BitPlan
from moecompress.errors import MoecompressError
from moecompress.evaluate import (
    DomainScore, EvalResult, ModelSize, evaluate, evaluate_checkpoint, format_table, load_eval_data, merge_results,
    pareto_front, plot_pareto, read_results, token_kl, token_nll, write_results,
)
from moecompress.evaluate.command import run_eval_command
from moecompress.export.checkpoint import export_checkpoint
from moecompress.runtime.loading.inspect import checkpoint_report

V = 128  # vocabulary of the tiny models


class CharTokenizer:
    """One token per character, ids 3..122; EOS 2, PAD 0 (the tiny models' ids)."""

    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}


class Bigram(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: fixed, known next-token distributions."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


def _table(seed: int) -> torch.Tensor:
    return torch.randn(V, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


@pytest.fixture
def corpus(tmp_path):
    """Two domains; 'poem' is short, so its last window is padded."""
    rows = [{"text": f"def f{i}(x):\n    return x * {i} + {i * i}", "domain": "code"} for i in range(12)]
    rows += [{"text": "the sea is wide and the sky is blue", "domain": "poem"},
             {"text": "a short line, the end", "domain": "poem"}]
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def test_nll_of_fixed_logits_equals_hand_value():
    table = _table(0)
    ids = torch.tensor([[5, 9, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    nll = token_nll(table[ids], ids, mask)
    hand = [-_log_softmax(table[5].tolist())[9], -_log_softmax(table[9].tolist())[7]]
    assert nll.shape == (1, 4)
    assert nll[0, :2].tolist() == pytest.approx(hand, rel=1e-12)
    assert nll[0, 2:].tolist() == [0.0, 0.0]  # padding targets are not scored
    garbage = torch.tensor([[5, 9, 7, 100, 3]])  # whatever sits in the padding changes nothing
    assert torch.equal(token_nll(table[garbage], garbage, mask), nll)


def test_evaluate_matches_hand_computation_and_domains_combine(corpus):
    table, tok = _table(1), CharTokenizer()
    res = evaluate(Bigram(table), tok, str(corpus), samples=6, seq_len=24, seed=3, batch_size=4, progress=False)
    data = load_eval_data(str(corpus), tok, 6, 24, 3)
    assert data.attention_mask.sum() < data.attention_mask.numel()  # the poem domain really was padded
    per = {d: [0.0, 0] for d in data.domains}
    for ids, mask, dom in zip(data.input_ids.tolist(), data.attention_mask.tolist(), data.domain_ids.tolist()):
        n = sum(mask)
        for t in range(n - 1):
            per[data.domains[dom]][0] -= _log_softmax(table[ids[t]].tolist())[ids[t + 1]]
            per[data.domains[dom]][1] += 1
    assert res.tokens == sum(n for _, n in per.values()) == int((data.attention_mask.sum(1) - 1).sum())
    for d in res.domains:
        assert d.tokens == per[d.name][1]
        assert d.perplexity == pytest.approx(math.exp(per[d.name][0] / per[d.name][1]), rel=1e-9)
    assert res.nll == pytest.approx(sum(s for s, _ in per.values()) / res.tokens, rel=1e-9)
    # token weighting: overall log-ppl is the token-weighted mean of the domains' log-ppl
    combined = sum(d.tokens * math.log(d.perplexity) for d in res.domains) / sum(d.tokens for d in res.domains)
    assert math.log(res.perplexity) == pytest.approx(combined, rel=1e-12)
    assert res.kl is None and res.samples == 6 and res.seq_len == 24
    assert {d.name for d in res.domains} == {"code", "poem"}
    # deterministic for a seed, and independent of the batch size
    again = evaluate(Bigram(table), tok, str(corpus), samples=6, seq_len=24, seed=3, batch_size=1, progress=False)
    assert again.nll == pytest.approx(res.nll, rel=1e-12) and again.tokens == res.tokens


def test_kl_of_bigram_models_equals_hand_value(corpus):
    ref_t, t = _table(2), _table(2) + 0.3 * _table(3)
    tok = CharTokenizer()
    data = load_eval_data(str(corpus), tok, 4, 16, 0)
    res = evaluate(Bigram(t), None, data, reference_model=Bigram(ref_t), batch_size=3, progress=False)
    total = 0.0
    for ids, mask in zip(data.input_ids.tolist(), data.attention_mask.tolist()):
        for t_ in range(sum(mask) - 1):
            lq, lp = _log_softmax(ref_t[ids[t_]].tolist()), _log_softmax(t[ids[t_]].tolist())
            total += sum(math.exp(a) * (a - b) for a, b in zip(lq, lp))
    assert res.kl > 0.05
    assert res.kl == pytest.approx(total / res.tokens, rel=1e-9)
    assert sum(d.kl * d.tokens for d in res.domains) / res.tokens == pytest.approx(res.kl, rel=1e-12)


def test_kl_of_tiny_model_with_itself_is_zero_and_positive_for_a_perturbed_copy(tiny_model, corpus):
    model, tok = tiny_model("qwen3_moe"), CharTokenizer()
    data = load_eval_data(str(corpus), tok, 4, 32, 0)
    same = evaluate(model, None, data, reference_model=copy.deepcopy(model), progress=False)
    assert same.kl == 0.0
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        w = noisy.lm_head.weight
        w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    res = evaluate(noisy, None, data, reference_model=model, batch_size=2, progress=False)
    with torch.no_grad():  # hand: float64 KL over the scored positions
        lq = torch.log_softmax(model(data.input_ids, attention_mask=data.attention_mask).logits.double(), -1)
        lp = torch.log_softmax(noisy(data.input_ids, attention_mask=data.attention_mask).logits.double(), -1)
    m = (data.attention_mask[:, :-1] * data.attention_mask[:, 1:]).bool()
    kl = (lq.exp() * (lq - lp)).sum(-1)[:, :-1][m]
    assert res.kl > 1e-3
    assert res.kl == pytest.approx(kl.mean().item(), rel=1e-4)
    assert token_kl(torch.zeros(1, 3, V), torch.zeros(1, 3, V), torch.ones(1, 3)).abs().max() == 0
    with pytest.raises(MoecompressError, match="same vocabulary"):
        token_kl(torch.zeros(1, 3, V), torch.zeros(1, 3, V + 1), torch.ones(1, 3))


def test_evaluate_checkpoint_sizes(tiny_model, tmp_path, corpus):
    model, tok = tiny_model("qwen3_moe"), CharTokenizer()
    model.save_pretrained(tmp_path / "plain")
    from moecompress.arch.adapters import describe

    layout = describe(model)
    layout, plan, quantized = quantize_tiny(model, plan=BitPlan.uniform(layout, 4, group_size=32))
    export_checkpoint(model, layout, plan, quantized, tmp_path / "q4", manifest={"method": "rtn@4"})
    kw = dict(samples=4, seq_len=32, tokenizer=tok, progress=False)
    plain = evaluate_checkpoint(tmp_path / "plain", str(corpus), **kw)
    n = sum(p.numel() for p in model.parameters())
    assert plain.method == "bf16" and plain.size == ModelSize(2 * n, 2 * n, 16.0, 16.0, "parameters", 16.0)
    q = evaluate_checkpoint(tmp_path / "q4", str(corpus), reference=tmp_path / "plain", **kw)
    assert (q.method, q.family) == ("rtn@4", "rtn") and q.reference == str(tmp_path / "plain")
    report = checkpoint_report(tmp_path / "q4")
    assert q.size.avg_bits == 4.0 and q.size.bytes == report["total_bytes"]
    expert_weights = report["expert_bf16_bytes"] // 2  # group 32, asymmetric: 4 + 24 / 32 bits, + expert biases
    assert q.size.stored_bits == pytest.approx(8 * report["expert_bytes"] / expert_weights)
    assert 4.75 <= q.size.stored_bits < 4.8
    assert q.size.bf16_bytes == 2 * n  # every weight found, packed or not
    assert 4.0 < q.size.bits_per_weight < 16.0 and q.kl > 0 and q.tokens == plain.tokens


def test_results_round_trip_table_and_plot(tmp_path):
    doms = (DomainScore("code", 300, 1.2, 0.01), DomainScore("poem", 100, 2.0, 0.03))
    a = EvalResult("rtn@4", "rtn", "eval.jsonl", 8, 64, 0, 400, 1.4, doms, 0.015, "base",
                   ModelSize(1_048_576, 4_194_304, 4.0, 4.5, "checkpoint", 4.375))
    b = EvalResult("bf16", "bf16", "eval.jsonl", 8, 64, 0, 400, 1.3, (), None, None,
                   ModelSize(4_194_304, 4_194_304, 16.0, 16.0, "parameters", 16.0))
    c = EvalResult("rtn@3", "rtn", "eval.jsonl", 8, 64, 0, 400, 1.7)
    js, md = write_results([a, b, c], tmp_path)
    assert read_results(tmp_path) == [a, b, c]
    assert json.loads(js.read_text())["results"][0]["perplexity"] == pytest.approx(math.exp(1.4))
    lines = md.read_text().splitlines()
    assert lines[0] == "| method | avg bits | stored bits | bits/weight | MB | ppl | ppl code | ppl poem | KL |"
    assert lines[2] == f"| rtn@4 | 4.00 | 4.375 | 4.50 | 1.00 | {math.exp(1.4):.3f} | {math.exp(1.2):.3f} | " \
                       f"{math.exp(2.0):.3f} | 0.0150 |"
    assert lines[3] == f"| bf16 | 16.00 | 16.000 | 16.00 | 4.00 | {math.exp(1.3):.3f} | – | – | – |"
    assert format_table([c]).splitlines()[2].startswith("| rtn@3 | – | – | – | – |")
    a2 = EvalResult(**{**a.__dict__, "nll": 1.35})
    assert merge_results([a, b], [a2]) == [b, a2]
    front = pareto_front([(4, 5.0), (3, 6.0), (8, 5.5), (16, 4.0), (2, 9.0)])
    assert front == [(2, 9.0), (3, 6.0), (4, 5.0), (16, 4.0)]
    png = plot_pareto([a, b, c], tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MoecompressError, match="unknown result field"):
        EvalResult.from_dict({**a.to_dict(), "bogus": 1})


def test_eval_command_merges_runs(tiny_model, tmp_path, corpus):
    from moecompress.builtin.tokenizer import train_tokenizer

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tok = train_tokenizer(texts * 5, vocab_size=300)
    model = tiny_model("qwen3_moe", vocab_size=len(tok))
    model.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    layout, plan, quantized = quantize_tiny(model)
    export_checkpoint(model, layout, plan, quantized, tmp_path / "mixed", tokenizer=tok)
    out = tmp_path / "results"
    kw = dict(samples=4, seq_len=16, out=out, device="cpu", progress=False)
    run_eval_command(str(tmp_path / "plain"), str(corpus), **kw)
    r = run_eval_command(str(tmp_path / "mixed"), str(corpus), reference=str(tmp_path / "plain"), **kw)
    assert r.method == "mixed" and r.kl > 0 and r.size.avg_bits < 16
    assert [x.method for x in read_results(out)] == ["bf16", "mixed"]
    assert (out / "pareto.png").is_file() and "| mixed |" in (out / "results.md").read_text()
    with pytest.raises(MoecompressError, match="not a file"):
        run_eval_command(str(tmp_path / "plain"), str(tmp_path / "missing.jsonl"), **kw)
