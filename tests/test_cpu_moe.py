"""The fused MoE decode call on CPU (runtime/experts/cpu_moe.py, csrc/lowbit/moe.cpp) against a float64 reference.

The reference computes the layer pair by pair from the dequantized weights with the activations quantized to int8
exactly as the kernels do (cpu_lowbit.quantize_rows), so the fused result may differ from it only by float32
summation order, plus a rare flip of one int8 rounding of the activation (the reference's activation is float64):
|err| <= 1e-3 of the output's scale. Every ISA here is checked, the portable one always (forced), with mixed
bit-widths in one layer, experts not held, repeated experts across tokens and 1-8 tokens.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.format.pack import dequantize, pack
from moecompress.format.spec import ExpertsSpec
from moecompress.runtime.kernels import cpu_features, cpu_lowbit, kernel_registry
from moecompress.runtime.experts import cpu_moe
from moecompress.runtime.experts.packed_experts import PackedExperts

SIMD = ("cpu:avx2", "cpu:avx512_vnni")


def isas() -> list[str]:
    if not cpu_lowbit.available():
        pytest.skip("no C++ compiler: the low-bit kernels are not built")
    return ["cpu:portable", *(i for i in SIMD if cpu_features.detect().has(i))]


class Template(nn.Module):
    """A transformers experts module as the fused call accepts it: the default gate, SiLU."""

    has_gate, has_bias, has_post_expert_norm = True, False, False

    def __init__(self):
        super().__init__()
        from transformers.activations import ACT2FN

        self.act_fn = ACT2FN["silu"]


def _default_gate():
    from transformers.integrations.moe import _default_apply_gate

    return _default_apply_gate


def make_layer(num_experts: int, hidden: int, inter: int, bits: list[int], held: list[int], group: int,
               symmetric: bool, seed: int) -> PackedExperts:
    Template._apply_gate = _default_gate()
    gen = torch.Generator().manual_seed(seed)
    by_bits: dict[int, tuple[int, ...]] = {}
    for e in held:
        by_bits[bits[e]] = by_bits.get(bits[e], ()) + (e,)
    spec = ExpertsSpec(num_experts, {"gate_up": dict(by_bits), "down": dict(by_bits)})
    layer = PackedExperts(Template(), [("gate_up", hidden, 2 * inter), ("down", inter, hidden)], spec, group, symmetric,
                          dtype=torch.bfloat16)
    for proj in ("gate_up", "down"):
        for g in getattr(layer, proj).children():
            n, out_f, in_f = len(g.experts), g.out_features, g.in_features
            g.qweight.copy_(pack(torch.randint(0, 1 << g.bits, (n, out_f, in_f), generator=gen).to(torch.uint8), g.bits))
            scale = 2.0 / ((1 << g.bits) * in_f ** 0.5)
            g.scales.copy_((torch.rand(n, out_f, in_f // group, generator=gen) + 0.5).mul(scale).half())
            if not symmetric:
                g.zeros.copy_(torch.randint(0, 1 << g.bits, g.zeros.shape, generator=gen).to(torch.uint8))
    return layer


def quantized(x: torch.Tensor, group: int) -> torch.Tensor:
    """x as the decode kernels see it: int8 per group times dx, float64."""
    xq, dx, _ = cpu_lowbit.quantize_rows(x.float().contiguous(), group, 8, "cpu:portable")
    r, k = x.shape
    return (xq.double().view(r, k // group, group) * dx.double().unsqueeze(-1)).view(r, k)


def reference(layer: PackedExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, group: int) -> torch.Tensor:
    weights = {}
    for proj in ("gate_up", "down"):
        for g in getattr(layer, proj).children():
            deq = dequantize(g.qweight, g.scales, None if g.symmetric else g.zeros, g.bits, g.group_size, g.in_features,
                             torch.float64)
            for slot, e in enumerate(g.experts):
                weights[proj, e] = deq[slot]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if ("gate_up", e) not in weights:
                continue
            h = quantized(x[t:t + 1], group) @ weights["gate_up", e].t()
            gate, up = h.chunk(2, dim=-1)
            a = (gate / (1 + torch.exp(-gate)) * up).float()
            out[t] += w[t, k].double() * (quantized(a, group) @ weights["down", e].t())[0]
    return out


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_fused_layer_matches_the_reference_on_every_isa(symmetric, tokens, monkeypatch):
    group, hidden, inter, experts = 32, 96, 64, 12
    bits = [2, 3, 4, 8] * 3
    held = [e for e in range(experts) if e not in (5, 9)]  # two experts computed elsewhere
    layer = make_layer(experts, hidden, inter, bits, held, group, symmetric, seed=tokens + 10 * symmetric)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:4] for _ in range(tokens)])
    idx[0, :2] = torch.tensor([5, 3])  # a dropped expert, and expert 3 shared by all tokens
    idx[1:, 0] = 3
    w = torch.rand(tokens, 4, generator=gen).to(torch.bfloat16)
    want = reference(layer, x.float(), idx, w.float(), group)
    scale = want.abs().max()
    for isa in isas():
        monkeypatch.setenv(cpu_features.ISA_ENV, isa)
        fused = cpu_moe.fused_layer(layer, x)
        assert fused is not None and fused.isa == isa
        got = layer(x, idx, w)
        assert got.dtype == torch.bfloat16 and got.shape == x.shape
        exact = fused(x.float(), idx, w).double()  # float32 x: no bf16 rounding of the output
        assert (exact - want).abs().max() <= 1e-3 * scale
        assert torch.equal(got, exact.to(torch.bfloat16))
        # the general path (per group, h and the activation rounded to bf16) agrees within bf16 rounding
        monkeypatch.setattr(cpu_moe, "FUSED_MAX_TOKENS", 0)
        general = layer(x, idx, w).double()
        monkeypatch.setattr(cpu_moe, "FUSED_MAX_TOKENS", 8)
        assert (general - want).abs().max() <= 3e-2 * scale


def test_layers_the_fused_call_does_not_take(monkeypatch):
    isas()
    layer = make_layer(4, 64, 32, [4, 4, 4, 4], [0, 1, 2, 3], 32, False, seed=1)
    x = torch.randn(2, 64).to(torch.bfloat16)
    assert cpu_moe.fused_layer(layer, x) is not None
    assert cpu_moe.fused_layer(layer, torch.randn(cpu_moe.FUSED_MAX_TOKENS + 1, 64).to(torch.bfloat16)) is None
    assert cpu_moe.fused_layer(layer, x.float()) is None  # float32 x: the exact tile kernels
    monkeypatch.setenv(kernel_registry.INT8_ACTIVATIONS_ENV, "always")
    assert cpu_moe.fused_layer(layer, x.float()) is not None
    monkeypatch.setenv(cpu_features.ISA_ENV, "cpu:torch")  # no q8 kernel
    assert cpu_moe.fused_layer(layer, x) is None
    monkeypatch.delenv(cpu_features.ISA_ENV)
    monkeypatch.setenv(cpu_moe.FUSED_TOKENS_ENV, "0")
    assert cpu_moe.fused_layer(layer, x) is None
    monkeypatch.setenv(cpu_moe.FUSED_TOKENS_ENV, "two")
    with pytest.raises(MoecompressError, match="whole number"):
        cpu_moe.fused_layer(layer, x)
    monkeypatch.delenv(cpu_moe.FUSED_TOKENS_ENV)
    other = make_layer(4, 64, 32, [4, 4, 4, 4], [0, 1, 2, 3], 32, False, seed=1)
    other._gate_fn = lambda self, h: h[..., :32] * h[..., 32:]  # a gate of its own
    assert cpu_moe.fused_layer(other, x) is None


def test_fused_call_refuses_bad_maps():
    isas()
    layer = make_layer(4, 64, 32, [4, 4, 4, 4], [0, 1, 2, 3], 32, False, seed=2)
    fused = cpu_moe.fused_layer(layer, torch.zeros(1, 64, dtype=torch.bfloat16))
    args = list(fused.args)
    args[4] = torch.tensor([[0, 7]] * 4)  # slot 7 of a 4-expert group
    with pytest.raises(RuntimeError, match="slot out of range"):
        cpu_lowbit._module().moe_decode(torch.zeros(1, 64), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), *args,
                                        32, cpu_lowbit.ISA_ID["cpu:portable"])
