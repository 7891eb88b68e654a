"""The 16-bit-weight GEMM (csrc/lowbit/gemm16.h) and the bf16 / float16 prefill through it (experts/cpu_prefill16.py):
against float64 references, the float32 forward of the same weights, and greedy generation."""
from __future__ import annotations

import copy

import pytest
import torch

from moecompress.runtime.experts import cpu_prefill16
from moecompress.runtime.experts.cpu_prefill16 import GEMM16_ENV, Gemm16Prefill, gemm16_isa
from moecompress.runtime.kernels import cpu_features, cpu_lowbit

pytestmark = pytest.mark.skipif(not cpu_lowbit.available(), reason="the low-bit C++ kernels are not built")

ISAS = ["cpu:portable"] + [isa for isa in ("cpu:avx2", "cpu:avx512_vnni") if cpu_features.detect().has(isa)]
SHAPES = [(1, 1, 1), (5, 17, 9), (6, 16, 256), (7, 64, 257), (13, 70, 300), (19, 129, 513), (40, 200, 64)]  # M, n, k
U = 2.0 ** -24  # float32 unit roundoff


def gemm_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Float32 summation in any order: |error| <= k * u * sum |x| |w| per output (plus the rounding of the result)."""
    k = x.shape[1]
    return (k + 1) * U * (x.double().abs() @ w.double().abs().T) + 1e-30


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm16_matches_float64_at_ragged_shapes_and_threads(isa, dtype):
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    try:
        for M, n, k in SHAPES:
            x, w = torch.randn(M, k, generator=g), torch.randn(n, k, generator=g).to(dtype)
            want = x.double() @ w.double().T  # the 16-bit weights are exact in float64
            torch.set_num_threads(1)
            one = cpu_lowbit.linear16(x, w, isa)
            torch.set_num_threads(2)
            two = cpu_lowbit.linear16(x, w, isa)
            assert one.shape == (M, n) and one.dtype == torch.float32
            assert ((one.double() - want).abs() <= gemm_bound(x, w)).all(), (M, n, k)
            assert torch.equal(one, two)  # each thread owns whole output rows: the same sums in the same order
    finally:
        torch.set_num_threads(threads)


def test_simd_and_portable_kernels_agree():
    if "cpu:avx2" not in ISAS:
        pytest.skip("no AVX2 here")
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(23, 700, generator=g), torch.randn(90, 700, generator=g).bfloat16()
    a, b = cpu_lowbit.linear16(x, w, "cpu:avx2"), cpu_lowbit.linear16(x, w, "cpu:portable")
    assert ((a.double() - b.double()).abs() <= 2 * gemm_bound(x, w)).all()


def moe_reference(x, idx, weights, gate_up, down):
    """float64: sum over k of weights[t, k] * down_e(silu(gate_e x) * up_e x), e = idx[t, k] (ids outside [0, E) skip)."""
    E, I = gate_up.shape[0], down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if not 0 <= e < E:
                continue
            h = gate_up[e].double() @ x[t].double()
            out[t] += float(weights[t, k]) * (down[e].double() @ (torch.nn.functional.silu(h[:I]) * h[I:]))
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_prefill16_matches_float64(isa, dtype):
    g = torch.Generator().manual_seed(2)
    E, H, I, K, T = 6, 72, 40, 3, 37  # 2I = 80: a partial panel; H = 72: partial input blocks
    gate_up = (0.2 * torch.randn(E, 2 * I, H, generator=g)).to(dtype)
    down = (0.2 * torch.randn(E, H, I, generator=g)).to(dtype)
    x = torch.randn(T, H, generator=g)
    idx = torch.randint(0, E - 1, (T, K), generator=g)  # expert E - 1 never routed
    idx[3, 1] = -1  # a pair outside the layer's experts: skipped
    weights = torch.rand(T, K, generator=g)
    want = moe_reference(x, idx, weights, gate_up, down)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        got = cpu_lowbit.moe_prefill16(x, idx, weights, gate_up, down, isa)
        torch.set_num_threads(2)
        assert torch.equal(got, cpu_lowbit.moe_prefill16(x, idx, weights, gate_up, down, isa))
    finally:
        torch.set_num_threads(threads)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def tiny(arch: str, dtype: torch.dtype):
    """(a tiny transformers model of `arch` in `dtype`, the same weights in float32)."""
    from conftest import _build

    model = _build(arch)
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties in the argmax
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    ref = copy.deepcopy(model).to(dtype).float().eval()  # the 16-bit values, in float32 (Module.to is in place)
    return model.to(dtype).eval(), ref


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe", "mixtral"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_logits_against_the_float32_forward(arch, dtype, monkeypatch):
    """A 40-token prefill (batch 2) of a 16-bit model with every MoE layer and attention linear through the GEMM:
    against the float32 forward of the same weights, its median per-token max |logit error| is within 1.25x torch's
    own 16-bit forward's (both keep 16-bit hidden states between the ops; the GEMM sums in float32), and at most 5 %
    of the tokens err by more than 2 % of the logits' scale (router near-ties); calls of few tokens (decode through
    transformers) run the previous implementation exactly, and leaving the block restores torch's forward."""
    monkeypatch.setenv(GEMM16_ENV, "always")
    model, ref = tiny(arch, dtype)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits.double()
        torch_16 = model(ids).logits.double()
        short = model(ids[:, :4]).logits
        with Gemm16Prefill(model) as block:
            got = model(ids).logits.double()
            short_inside = model(ids[:, :4]).logits
        layers = model.config.num_hidden_layers
        assert (block.experts, block.linears) == (layers, 4 * layers)
        again = model(ids).logits.double()
    scale = want.abs().max()
    err, err_torch = (got - want).abs().amax(-1).flatten(), (torch_16 - want).abs().amax(-1).flatten()  # per token
    # a token whose router top-k flips between two near-tied experts (16-bit hidden states either way) moves by more
    assert err.median() <= 1.25 * err_torch.median(), (err.median(), err_torch.median())
    assert (err > 0.02 * scale).float().mean() <= 0.05, err / scale
    assert torch.equal(short_inside, short)
    assert torch.equal(again, torch_16)  # left the block: torch's forward again
    cfg = model.model.layers[0].mlp.experts.config
    assert cfg._experts_implementation_internal != cpu_prefill16.INTERFACE_NAME
    assert not any("forward" in m.__dict__ for m in model.modules())


TIE_TOL = 0.05  # |logit| gap of a near-tie: 16-bit hidden states move logits of scale ~3 by up to ~0.03 (above)


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe", "mixtral"])
def test_greedy_tokens_unchanged(arch, monkeypatch):
    """CpuDecoder on a bf16 model, the prompt's prefill through the GEMM or through torch: the same 12 greedy tokens
    per row, or a first divergence at a near-tie (the float32 forward of the same weights over torch's tokens puts
    the two candidates within TIE_TOL)."""
    from moecompress.runtime.cpu_step import CpuDecoder

    model, ref = tiny(arch, torch.bfloat16)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    n, out = ids.shape[1], {}
    for mode in ("always", "never"):
        monkeypatch.setenv(GEMM16_ENV, mode)
        out[mode] = CpuDecoder(model, max_cache_len=40, batch_size=2).generate(ids, 12)
    got, want = out["always"], out["never"]
    assert torch.equal(got[:, :n], ids) and got.shape == want.shape
    with torch.no_grad():
        logits = ref(want).logits  # [2, n + 12, V]
    for r in range(2):
        diff = (got[r] != want[r]).nonzero()
        if len(diff):
            t = int(diff[0, 0])
            gap = float(logits[r, t - 1, want[r, t]] - logits[r, t - 1, got[r, t]])
            assert abs(gap) <= TIE_TOL, (r, t - n, gap)


def test_the_isa_decision(monkeypatch):
    """auto: the GEMM where the CPU lacks native bf16 (AVX2; AVX-512 without BF16), torch's matmul with AMX /
    AVX512_BF16 and on ISAs not measured (portable, ARM); MOECOMPRESS_CPU_ISA=cpu:avx2 counts as AVX2-only."""
    def cpu(*flags):
        feats = cpu_features.CpuFeatures("x86_64", frozenset(flags))
        monkeypatch.setattr(cpu_features, "detect", lambda: feats)

    avx2 = ("avx2", "fma", "f16c")
    avx512 = avx2 + ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
    amx = avx512 + ("amx_tile", "amx_bf16", "avx512_bf16", "avx512vbmi")
    monkeypatch.delenv(cpu_features.ISA_ENV, raising=False)
    monkeypatch.delenv(GEMM16_ENV, raising=False)
    cpu(*avx2)
    assert gemm16_isa() == "cpu:avx2"
    cpu(*avx512)
    assert gemm16_isa() == "cpu:avx512_vnni"
    cpu(*avx512, "avx512_bf16")
    assert gemm16_isa() is None
    cpu(*amx)
    assert gemm16_isa() is None
    monkeypatch.setenv(cpu_features.ISA_ENV, "cpu:avx2")
    assert gemm16_isa() == "cpu:avx2"
    monkeypatch.setenv(GEMM16_ENV, "never")
    assert gemm16_isa() is None
    monkeypatch.setenv(cpu_features.ISA_ENV, "cpu:portable")
    monkeypatch.setenv(GEMM16_ENV, "auto")
    assert gemm16_isa() is None
    monkeypatch.setenv(GEMM16_ENV, "always")
    assert gemm16_isa() == "cpu:portable"
    monkeypatch.setenv(GEMM16_ENV, "sometimes")
    with pytest.raises(Exception, match="allowed: auto, always, never"):
        gemm16_isa()
