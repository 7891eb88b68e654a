"""Test helpers: mixed bit plans and fake-quantized references for tiny models."""
from __future__ import annotations

import copy
import gzip
import json
import random
from pathlib import Path

import torch

from moecompress.arch.adapters import describe, proj_weights, set_proj_weights
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.artifacts.quantized import expert_key
from moecompress.quantize.stage import QuantizeOptions, quantize_model

MIXED = (2, 3, 4, 8, 16)


def decode_logits(model, ids: torch.Tensor, prompt: int = 0) -> list[torch.Tensor]:
    """Each call's logits: ids[:, :prompt] in one call (when prompt > 0), then one token per call with the KV cache."""
    past, logits = None, []
    with torch.no_grad():
        if prompt:
            out = model(ids[:, :prompt], use_cache=True)
            past = out.past_key_values
            logits.append(out.logits)
        for i in range(prompt, ids.shape[1]):
            out = model(ids[:, i:i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits)
    return logits


def mixed_plan(layout, group_size: int = 32, symmetric: bool = False, linears: dict | None = None) -> BitPlan:
    """Every bit-width in every layer: expert e of layer l gets MIXED[(e + l + proj) % 5]."""
    experts = {
        m.experts_path: {p.name: tuple(MIXED[(e + m.layer + j) % len(MIXED)] for e in range(m.num_experts))
                         for j, p in enumerate(m.projs)}
        for m in layout.moe_layers
    }
    return BitPlan(group_size=group_size, symmetric=symmetric, experts=experts, linears=linears or {})


def fake_quant_reference(model, layout, plan: BitPlan, quantized):
    """A copy of `model` whose quantized weights are replaced by their dequantized values (float)."""
    ref = copy.deepcopy(model)
    for m in layout.moe_layers:
        experts = ref.get_submodule(m.experts_path)
        for p in m.projs:
            w = proj_weights(experts, m, p.name).detach().clone()
            for e, bits in enumerate(plan.experts[m.experts_path][p.name]):
                if bits != 16:
                    w[e] = quantized.weights[expert_key(m.experts_path, p.name, e)].dequantize(w.dtype)
            set_proj_weights(experts, m, p.name, w)
    with torch.no_grad():
        for path, bits in plan.linears.items():
            if bits != 16:
                lin = ref.get_submodule(path)
                lin.weight.copy_(quantized.weights[path].dequantize(lin.weight.dtype))
    return ref


def quantize_tiny(model, plan: BitPlan | None = None, linears: dict | None = None, method: str = "rtn", stats=None):
    layout = describe(model)
    plan = plan or mixed_plan(layout, linears=linears)
    quantized = quantize_model(model, layout, plan, stats, QuantizeOptions(method=method), progress=False)
    return layout, plan, quantized


JOB_WORDS = ("def class return import self value list dict for while if else print open file data model expert "
             "token layer server bits group scale zero weight router").split()


def make_job_inputs(tmp: Path, docs_per_domain: int, words: int) -> Path:
    """A tiny qwen3_moe with a tokenizer saved as tmp/model, and a two-domain corpus tmp/data.jsonl.gz."""
    from conftest import _build

    from moecompress.builtin.tokenizer import train_tokenizer

    rng = random.Random(0)
    docs = [{"domain": d, "text": " ".join(rng.choice(JOB_WORDS) for _ in range(words))}
            for d in ("a", "b") * docs_per_domain]
    with gzip.open(tmp / "data.jsonl.gz", "wt") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    tokenizer = train_tokenizer((d["text"] for d in docs), vocab_size=300)
    model = _build("qwen3_moe", vocab_size=320)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    return tmp
