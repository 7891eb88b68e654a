"""One-token attention on CPU (runtime/kernels/cpu_attention.py): the same attention as a float64 reference, transformers'
own function for everything else, and a model using it generates the tokens of the plain model."""
from __future__ import annotations

import math

import pytest
import torch

from moecompress.runtime.kernels import cpu_attention


class Attn:
    def __init__(self, groups: int):
        self.num_key_value_groups = groups


def reference(q, k, v, mask, scale):
    """float64: query head i attends with key/value head i // groups; mask bool (True = attend) or additive."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [B, q, heads, d]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_step_equals_reference(dtype, tol, masked):
    gen = torch.Generator().manual_seed(0)
    B, H, KV, S, D = 2, 8, 2, 37, 16
    q, k, v = (torch.randn(B, h, n, D, generator=gen).to(dtype) for h, n in ((H, 1), (KV, S), (KV, S)))
    mask = None
    if masked:  # the second sequence is left-padded by 5 tokens
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        mask[1, ..., :5] = False
    out, weights = cpu_attention.decode_sdpa(Attn(H // KV), q, k, v, mask, scaling=1 / math.sqrt(D))
    assert weights is None and out.shape == (B, 1, H, D) and out.dtype == dtype
    ref = reference(q, k, v, mask, 1 / math.sqrt(D))
    assert (out.double() - ref).abs().max().item() <= tol * ref.abs().max().item()


def test_other_calls_are_transformers_own():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 6, 8, generator=gen), torch.randn(1, 2, 6, 8, generator=gen), torch.randn(1, 2, 6, 8, generator=gen)
    ours, _ = cpu_attention.decode_sdpa(Attn(2), q, k, v, None, scaling=0.3, is_causal=True)  # prefill: 6 queries
    theirs, _ = sdpa_attention_forward(Attn(2), q, k, v, None, scaling=0.3, is_causal=True)
    assert torch.equal(ours, theirs)


def test_model_generates_the_same_tokens(tiny_model):
    model = tiny_model("qwen3_moe")
    model.config._attn_implementation = "sdpa"  # the tiny models are built with eager attention
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # grouped-query: the path under test
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    with torch.no_grad():
        plain = model.generate(ids, **kwargs)
        assert cpu_attention.install(model) and model.config._attn_implementation == cpu_attention.NAME
        ours = model.generate(ids, **kwargs)
    assert torch.equal(plain, ours)
    assert not cpu_attention.install(model)  # already installed: nothing to do
