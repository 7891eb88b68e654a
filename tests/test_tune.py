"""Scale tuning: only scales change, the report's KL is the checkpoint's KL, and bad scales are repaired."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import fake_quant_reference, quantize_tiny

from moecompress.arch.adapters import describe
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.artifacts.quantized import QuantizedTensors
from moecompress.errors import MoecompressError
from moecompress.quantize.tune import TuneOptions, tune_scales


def _batches(model, n: int = 3, rows: int = 4, seq: int = 24):
    gen = torch.Generator().manual_seed(1)
    v = model.config.vocab_size
    return [(torch.randint(0, v, (rows, seq), generator=gen), torch.ones(rows, seq, dtype=torch.long))
            for _ in range(n)]


def _kl(ref, model, batches) -> float:
    """Token-weighted mean KL(ref || model) of next-token distributions, computed independently of tune.py."""
    total = n = 0.0
    with torch.no_grad():
        for ids, mask in batches:
            p = torch.log_softmax(ref(input_ids=ids, attention_mask=mask).logits.float(), -1)
            q = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            total += float((p.exp() * (p - q)).sum(-1).sum())
            n += ids.numel()
    return total / n


def _misscaled(quantized: QuantizedTensors, factor: float) -> QuantizedTensors:
    weights = {k: dataclasses.replace(w, scales=(w.scales.float() * factor).half()) for k, w in quantized.weights.items()}
    return QuantizedTensors(weights=weights, fallbacks=quantized.fallbacks, method=quantized.method)


def test_tuning_repairs_bad_scales_and_changes_nothing_else(tiny_model):
    model = tiny_model("qwen3_moe")
    layout, plan, quantized = quantize_tiny(model, linears={"model.layers.0.self_attn.q_proj": 4})
    bad = _misscaled(quantized, 1.3)
    batches = _batches(model)
    tuned, report = tune_scales(model, layout, bad, batches, TuneOptions(steps=40, lr=2e-2, batch_size=4, holdout=0.25),
                                progress=False)
    assert report["kept"] and report["holdout_kl_after"] < 0.5 * report["holdout_kl_before"]
    assert set(tuned.weights) == set(bad.weights)
    for key, w in tuned.weights.items():
        old = bad.weights[key]
        assert torch.equal(w.q, old.q) and torch.equal(w.zeros, old.zeros) and w.bits == old.bits
        assert w.scales.dtype == torch.float16 and bool((w.scales > 0).all()) and bool(torch.isfinite(w.scales).all())
    assert not torch.equal(tuned.weights["model.layers.0.self_attn.q_proj"].scales,
                           bad.weights["model.layers.0.self_attn.q_proj"].scales)
    # the reported KL is that of the weights the checkpoint will hold, on the held-out sequences
    holdout = [(torch.cat([i for i, _ in batches])[-3:], torch.cat([m for _, m in batches])[-3:])]
    for q, kl in ((bad, report["holdout_kl_before"]), (tuned, report["holdout_kl_after"])):
        assert _kl(model, fake_quant_reference(model, layout, plan, q), holdout) == pytest.approx(kl, rel=1e-4)


def test_no_gain_keeps_the_original_scales(tiny_model):
    model = tiny_model("mixtral")
    layout, _, quantized = quantize_tiny(model)
    tuned, report = tune_scales(model, layout, quantized, _batches(model), TuneOptions(steps=0), progress=False)
    assert not report["kept"] and report["holdout_kl_after"] == report["holdout_kl_before"]
    assert all(torch.equal(tuned.weights[k].scales, w.scales) for k, w in quantized.weights.items())


def test_transposed_experts_are_tuned(tiny_model):
    model = tiny_model("gpt_oss")  # experts stored [E, in, out]
    layout, plan, quantized = quantize_tiny(model, plan=BitPlan.uniform(describe(model), 8, 32))
    bad = _misscaled(quantized, 1.3)  # 8 bits: the error is the wrong scales, which tuning can undo
    tuned, report = tune_scales(model, layout, bad, _batches(model), TuneOptions(steps=30, lr=2e-2, batch_size=4,
                                                                                 holdout=0.25), progress=False)
    assert report["kept"] and report["holdout_kl_after"] < 0.5 * report["holdout_kl_before"]


def test_bad_options_and_inputs_are_errors(tiny_model):
    model = tiny_model("qwen3_moe")
    layout, _, quantized = quantize_tiny(model)
    with pytest.raises(MoecompressError, match="steps >= 0"):
        TuneOptions(steps=-1)
    with pytest.raises(MoecompressError, match="nothing to tune"):
        tune_scales(model, layout, QuantizedTensors(weights={}), _batches(model), progress=False)
    one = [(torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))]
    with pytest.raises(MoecompressError, match="at least 2 calibration sequences"):
        tune_scales(model, layout, quantized, one, progress=False)
