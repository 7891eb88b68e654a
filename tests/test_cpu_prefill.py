"""The MoE layer of many tokens on CPU in one C++ call (runtime/experts/cpu_prefill.py, csrc/lowbit/moe_prefill.cpp).

Against the float64 reference of test_cpu_moe (pairs from the dequantized weights, activations quantized to int8 as
the kernels do): |err| <= 1e-3 of the output's scale (float32 summation order, a rare int8 rounding flip). Against
the fused decode call (moe_decode, same arguments): 1e-5 of the scale (the rows kernel groups rows differently).
Every ISA here, the portable one forced; mixed bit-widths, experts not held, gate_up and down grouping the experts
differently, 1 and 2 threads. On AVX2 the experts of >= cpu_lowbit.gemm_min_rows() rows run the prefill GEMM
(csrc/lowbit/gemm.h); its own test compares it with the decode kernels and float64 x_hat @ W^T.
"""
from __future__ import annotations

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.format.pack import pack
from moecompress.runtime.experts import cpu_moe, cpu_prefill
from moecompress.runtime.kernels import cpu_features, cpu_lowbit, kernel_registry
from test_cpu_moe import isas, make_layer, reference


def _group(gen, n: int, out_f: int, in_f: int, bits: int, group: int, symmetric: bool):
    q = torch.randint(0, 1 << bits, (n, out_f, in_f), generator=gen).to(torch.uint8)
    s = ((torch.rand(n, out_f, in_f // group, generator=gen) + 0.5) * 2.0 / ((1 << bits) * in_f ** 0.5)).half()
    z = (torch.empty(0, dtype=torch.uint8) if symmetric
         else torch.randint(0, 1 << bits, (n, out_f, in_f // group), generator=gen).to(torch.uint8))
    return pack(q, bits), s, z


@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_call_matches_the_decode_call_with_other_groupings(threads):
    """gate_up groups the experts as {0,1,2} 4-bit / {3,4,5} 2-bit symmetric, down as {1,3} 8-bit / {0,2,4} 3-bit
    (expert 5 not held by down: dropped); 70 tokens top-3."""
    isa_list = isas()
    gen = torch.Generator().manual_seed(3)
    group, hidden, inter, tokens = 32, 96, 64, 70
    gu = [_group(gen, 3, 2 * inter, hidden, 4, group, False), _group(gen, 3, 2 * inter, hidden, 2, group, True)]
    dn = [_group(gen, 2, hidden, inter, 8, group, False), _group(gen, 3, hidden, inter, 3, group, False)]
    gu_map = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
    dn_map = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1], [1, 2], [-1, -1]])
    args = ([g[0] for g in gu], [g[1] for g in gu], [g[2] for g in gu], [4, 2], gu_map,
            [g[0] for g in dn], [g[1] for g in dn], [g[2] for g in dn], [8, 3], dn_map)
    x = torch.randn(tokens, hidden, generator=gen)
    idx = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(tokens)])
    w = torch.rand(tokens, 3, generator=gen)
    module, before = cpu_lowbit._module(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for isa in isa_list:
            want = module.moe_decode(x, idx, w, *args, group, cpu_lowbit.ISA_ID[isa])
            got = module.moe_prefill(x, idx, w, *args, group, cpu_lowbit.ISA_ID[isa])
            scale = want.abs().max()
            assert scale > 0 and (got - want).abs().max() <= 1e-5 * scale, isa
            # a token whose experts are all dropped gets zeros
            alone = module.moe_prefill(x[:2], torch.tensor([[5, 5, 5], [5, 5, 5]]), w[:2], *args, group,
                                       cpu_lowbit.ISA_ID[isa])
            assert torch.equal(alone, torch.zeros(2, hidden))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("symmetric", [False, True])
def test_prefill_layer_matches_the_reference(symmetric, monkeypatch):
    """More tokens than the fused decode call takes: on the ISAs whose prefill kernel is q8 (AVX2) the prefill call
    runs, elsewhere (portable: the exact tiles) the general path; both within the reference's tolerances."""
    group, hidden, inter, experts, tokens = 32, 96, 64, 12, 40
    layer = make_layer(experts, hidden, inter, [2, 3, 4, 8] * 3, [e for e in range(experts) if e not in (5, 9)], group,
                       symmetric, seed=7 + symmetric)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:4] for _ in range(tokens)])
    w = torch.rand(tokens, 4, generator=gen).to(torch.bfloat16)
    want = reference(layer, x.float(), idx, w.float(), group)
    scale = want.abs().max()
    for isa in isas():
        monkeypatch.setenv(cpu_features.ISA_ENV, isa)
        call = cpu_prefill.prefill_layer(layer, x)
        assert (call is not None) == (isa in kernel_registry.Q8_PREFILL_ISAS)
        assert cpu_prefill.prefill_layer(layer, x[:cpu_moe.FUSED_MAX_TOKENS]) is None  # the decode call's tokens
        got = layer(x, idx, w)
        assert got.dtype == torch.bfloat16 and got.shape == x.shape
        if call is not None:
            exact = call(x.float(), idx, w).double()
            assert (exact - want).abs().max() <= 1e-3 * scale
            assert torch.equal(got, exact.to(torch.bfloat16))
        assert (got.double() - want).abs().max() <= 3e-2 * scale
        monkeypatch.setenv(cpu_prefill.PREFILL_FUSED_ENV, "0")  # the general path: same kernels, bf16 in between
        assert cpu_prefill.prefill_layer(layer, x) is None
        assert (layer(x, idx, w).double() - want).abs().max() <= 3e-2 * scale
        monkeypatch.delenv(cpu_prefill.PREFILL_FUSED_ENV)


def test_layers_the_prefill_call_does_not_take(monkeypatch):
    isas()
    if "cpu:avx2" not in kernel_registry.Q8_PREFILL_ISAS or not cpu_features.detect().has("cpu:avx2"):
        pytest.skip("no ISA here whose prefill kernel is the q8 one")
    monkeypatch.setenv(cpu_features.ISA_ENV, "cpu:avx2")
    layer = make_layer(4, 64, 32, [4, 4, 4, 4], [0, 1, 2, 3], 32, False, seed=1)
    x = torch.randn(20, 64).to(torch.bfloat16)
    assert cpu_prefill.prefill_layer(layer, x) is not None
    assert cpu_prefill.prefill_layer(layer, x.float()) is None  # float32 x: the exact tiles
    group = layer.gate_up.b4  # in_features 64: below Q8_PREFILL_MIN_IN the general path takes the tiles
    monkeypatch.setattr(kernel_registry, "Q8_PREFILL_MIN_IN", 65)
    assert kernel_registry.select(4, "prefill", group, torch.bfloat16).name == "tile_mm_avx2"
    monkeypatch.setattr(kernel_registry, "Q8_PREFILL_MIN_IN", 64)
    assert kernel_registry.select(4, "prefill", group, torch.bfloat16).name == "q8_avx2"
    assert kernel_registry.select(4, "prefill", group, torch.float32).name == "tile_mm_avx2"
    monkeypatch.setenv(cpu_prefill.PREFILL_FUSED_ENV, "yes")
    with pytest.raises(MoecompressError, match="PREFILL_FUSED"):
        cpu_prefill.prefill_layer(layer, x)
    monkeypatch.delenv(cpu_prefill.PREFILL_FUSED_ENV)
    other = make_layer(4, 64, 32, [4, 4, 4, 4], [0, 1, 2, 3], 32, False, seed=1)
    other._gate_fn = lambda self, h: h[..., :32] * h[..., 32:]  # a gate of its own
    assert cpu_prefill.prefill_layer(other, x) is None


@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_gemm_matches_the_decode_kernels_and_the_reference(threads):
    """cpu_lowbit.prefill_q8 (the register-blocked GEMM for slots of >= gemm_min_rows rows on AVX2, the decode kernel
    elsewhere and on the portable ISA) against the decode op (exactly, where both run the decode kernel; 1e-5 of the
    scale with the GEMM: float32 order) and against float64 x_hat @ W^T (x_hat: x quantized as the kernels do, 1e-5):
    every bit-width, symmetric or not, 100 output rows (a 64-row unit and one of 36: the GEMM's 8-row vectors and a
    4-row tail), slots of 0-33 rows (token tails of 1-3 rows, both sides of the threshold)."""
    from moecompress.format.pack import dequantize

    isa_list = isas()
    gen = torch.Generator().manual_seed(5)
    n_out, k, group = 100, 96, 32
    slots, counts = [2, 0, 3, 1, 4, 0], [9, 1, 33, 0, 7, 8]
    before, min_rows = torch.get_num_threads(), cpu_lowbit.gemm_min_rows()
    torch.set_num_threads(threads)
    try:
        for bits in (2, 3, 4, 8):
            for symmetric in (False, True):
                q, s, z = _group(gen, 5, n_out, k, bits, group, symmetric)
                zeros = None if symmetric else z
                wd = dequantize(q, s, zeros, bits, group, k, torch.float64)  # [5, n, k]
                x = torch.randn(sum(counts), k, generator=gen)
                xq, dx, _ = cpu_lowbit.quantize_rows(x, group, bits, "cpu:portable")  # natural order
                x_hat = (xq.double().view(-1, k // group, group) * dx.double().unsqueeze(-1)).view(-1, k)
                rows = torch.tensor(slots).repeat_interleave(torch.tensor(counts))
                want = torch.einsum("rk,rnk->rn", x_hat, wd[rows])
                scale = want.abs().max()
                for isa in isa_list:
                    dec = cpu_lowbit.decode(x, q, s, zeros, bits, group, slots, counts, isa)
                    got = cpu_lowbit.prefill_q8(x, q, s, zeros, bits, group, slots, counts, isa)
                    assert (got.double() - want).abs().max() <= 1e-5 * scale, (bits, symmetric, isa)
                    assert (got - dec).abs().max() <= 1e-5 * scale, (bits, symmetric, isa)
                    cpu_lowbit.gemm_min_rows(10**9)  # the decode kernel for every slot: the decode op's numbers
                    assert torch.equal(cpu_lowbit.prefill_q8(x, q, s, zeros, bits, group, slots, counts, isa), dec)
                    cpu_lowbit.gemm_min_rows(min_rows)
    finally:
        torch.set_num_threads(before)
        cpu_lowbit.gemm_min_rows(min_rows)
