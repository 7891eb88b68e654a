"""W{2,3,4,8}A8 prefill (runtime/cuda/a8.py): int8 activations against the unpacked low-bit weights.

Not bit-equal to the bf16 reference by design, so two checks: (1) a8_kernel against a float64 reference built from
the SAME int8 activations (xq * sx) and the format's exact weights (q - z) * s: relative error ~1e-7 (float32
promotion), bound 1e-5, every packed width, asymmetric and symmetric, groups of 32/64/128, both operand orders, partial
column tiles, dropped experts; (2) the layer against the float32 dequantize-then-matmul reference, within a bound
derived from the measured int8 rounding error of its two inputs (x and h), next to the bf16 kernels' own error.
Also: quant_kernel against torch, a CUDA-graph replay equal to eager. Skipped without CUDA/Triton; the rule
(launch.prefill_a8) is checked on the CPU in tests/test_gpu_launch_rules.py.
"""
from __future__ import annotations

import pytest
import torch

from moecompress.format.pack import dequantize
from moecompress.runtime import cuda
from moecompress.runtime.cuda import launch
from test_cuda_kernels import activations, random_experts, reference_layer, rel_err, routing

pytestmark = pytest.mark.skipif(not cuda.available(), reason=f"CUDA kernels: {cuda.unavailable_reason()}")


def exact_weights(group) -> torch.Tensor:
    """[n, out, in] float64: (q - z) * s, exact (no rounding to bf16)."""
    zeros = None if group.symmetric else group.zeros
    return dequantize(group.qweight, group.scales, zeros, group.bits, group.group_size, group.in_features,
                      torch.float32).double()


def dequantized_input(xq, sx, bk: int) -> torch.Tensor:
    rows, k = xq.shape
    return (xq.double().view(rows, k // bk, bk) * sx.double()[..., None]).view(rows, k)


def _quant_error(x: torch.Tensor, bk: int) -> float:
    from moecompress.runtime.cuda import a8

    xq, sx, _ = a8.quantize(x.contiguous(), bk)
    return rel_err(dequantized_input(xq, sx, bk), x.double())


@pytest.mark.parametrize("gated", [False, True])
def test_quantize_matches_torch(gated):
    from moecompress.runtime.cuda import a8

    x = activations(70, 512 if gated else 256, seed=1) * 3
    x[5] = 0  # an all-zero row: scale 0, values 0
    xq, sx, sq = a8.quantize(x, 64, gated=gated)
    if gated:
        g, u = x.float().chunk(2, dim=-1)
        g = g.to(torch.bfloat16).float()
        act = (g / (1 + torch.exp(-g))).to(torch.bfloat16).float()
        v = (act * u).to(torch.bfloat16).float()
    else:
        v = x.float()
    groups = v.view(70, 4, 64)
    amax = groups.abs().amax(-1)
    if not gated:  # (gated: torch's exp may round SiLU's bf16 output the other way; the error bound below holds)
        assert torch.allclose(sx, amax / 127, rtol=1e-6, atol=0)
        want = torch.floor(groups * torch.where(amax > 0, 127 / amax, 0)[..., None] + 0.5).clamp(-127, 127)
        assert (xq.view(70, 4, 64).float() - want).abs().max() <= 1  # (127 / amax: division rounding)
    assert torch.equal(sq, xq.view(70, 4, 64).int().sum(-1))
    assert not xq[5].any() and not sx[5].any()
    # ~ absmax / 127 / sqrt(12) / rms: 0.6 % for Gaussian x, 1.3 % for the heavier-tailed h = SiLU(gate) * up
    assert rel_err(dequantized_input(xq, sx, 64), v.double()) < (2e-2 if gated else 1e-2)


def _run_projection(layer, proj: str, x, idx, config, trans: bool, weighted: bool):
    """(kernel output float32 [S, N], float64 reference from the same int8 activations)."""
    from moecompress.runtime.cuda import a8, routing as rt

    tokens, top_k = idx.shape
    pairs = tokens * top_k
    mod = getattr(layer, proj)
    groups, positions = rt.proj_groups(mod)
    keys = rt.lookup(mod, x.device)[idx.reshape(-1).clamp(max=mod.num_experts)]
    tables = rt.build_torch(keys, positions, config.block_m)
    bk = min(a8.step_k(g.group_size, config) for g, _ in groups)
    row_div = 1 if proj == "down" else top_k  # down: x holds one row per pair
    xq, sx, sq = a8.quantize(x, bk)
    rw = torch.rand(pairs, device=x.device) if weighted else None
    out = torch.full((pairs, mod.out_features), float("nan"), device=x.device)
    xd = dequantized_input(xq, sx, bk)
    ref = torch.zeros(pairs, mod.out_features, dtype=torch.float64, device=x.device)
    flat = idx.reshape(-1)
    for group, pos0 in groups:
        a8.run(group, xq, sx, sq, tables, pos0, min(len(group.experts), pairs) + pairs // tables.block_rows, out,
               row_div, bk, rw, config=config, trans=trans, out_dtype=torch.float32)
        w = exact_weights(group)
        for slot, e in enumerate(group.experts):
            hit = (flat == e).nonzero().flatten()
            y = xd[hit // row_div] @ w[slot].t()
            ref[hit] = y * rw[hit, None].double() if weighted else y
    computed = torch.isin(flat, torch.tensor([e for g, _ in groups for e in g.experts], device=x.device))
    return out[computed], ref[computed]


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("group_size,symmetric,block_k", [(128, False, 128), (64, True, 64), (32, False, 128),
                                                          (128, True, 64)])
def test_a8_kernel_equals_float64_reference_of_the_same_int8_activations(trans, group_size, symmetric, block_k):
    """Every packed width in one layer, experts 1 and 6 not held; symmetric: BN 256, the down projection's N 384 a
    partial tile."""
    config = launch.A8Config(64, 256 if symmetric else 128, block_k, num_warps=4, num_stages=2)
    layer = random_experts(8, 384, 256, [2, 3, 4, 8, 3, 2, 8, 4], group_size=group_size, symmetric=symmetric,
                           held=[0, 2, 3, 4, 5, 7], seed=group_size + symmetric)
    idx, _ = routing(150, 8, 2, "cuda", seed=3)
    out, ref = _run_projection(layer, "gate_up", activations(150, 384, seed=2), idx, config, trans, False)
    assert rel_err(out.double(), ref) < 1e-5
    h = activations(300, 256, seed=4)
    out, ref = _run_projection(layer, "down", h, idx, config, trans, True)
    assert rel_err(out.double(), ref) < 1e-5


def exact_layer(layer, x, idx, w, hs: list | None = None) -> torch.Tensor:
    """float64 dequantize-then-matmul with no rounding to bf16 anywhere (the truth both paths approximate); the
    routed rows of h appended to hs."""
    x64 = x.double()
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    wts = {(proj, e): exact_weights(g)[slot] for proj in ("gate_up", "down") for g in getattr(layer, proj).children()
           for slot, e in enumerate(g.experts)}
    for e in {e for (_, e) in wts}:
        t, k = (idx == e).nonzero(as_tuple=True)
        hg, hu = (x64[t] @ wts["gate_up", e].t()).chunk(2, dim=-1)
        h = torch.nn.functional.silu(hg) * hu
        if hs is not None:
            hs.append(h)
        out.index_add_(0, t, (h @ wts["down", e].t()) * w[t, k, None].double())
    return out


def _forced(monkeypatch, config=None) -> None:
    monkeypatch.setattr(launch, "PREFILL_A8", True)
    monkeypatch.setattr(launch, "PREFILL_A8_MIN_ROWS", 0)
    if config is not None:
        monkeypatch.setattr(launch, "A8", config)


@pytest.mark.parametrize("bits,held", [((2, 3, 4, 8, 3, 4), None), ((3, 4, 2, 3, 4, 2), [0, 1, 3, 5])])
def test_a8_layer_within_the_int8_activation_bound(bits, held, monkeypatch, record_property):
    """Layer error against the exact reference <= 2 x (x's int8 error + h's int8 error) + the bf16 kernels'
    tolerance (1e-2); the a8 path, not the fused kernels, ran."""
    from moecompress.runtime.cuda import a8

    layer = random_experts(6, 256, 128, list(bits), group_size=64, held=held, seed=3)
    x = activations(300, 256, seed=4)
    idx, w = routing(300, 6, 2, "cuda", seed=5)
    calls = []
    forward = a8.forward
    monkeypatch.setattr(a8, "forward", lambda *args, **kw: calls.append(1) or forward(*args, **kw))
    with torch.no_grad():
        bf16 = layer(x, idx, w)
        assert not calls
        _forced(monkeypatch, launch.A8Config(64, 128, 128, num_warps=4, num_stages=2))
        out = layer(x, idx, w)
    assert calls
    assert out.dtype == x.dtype and out.shape == x.shape
    hs = []
    exact = exact_layer(layer, x, idx, w, hs)
    h = torch.cat(hs).to(torch.bfloat16)
    bk = a8.step_k(64)
    bound = 2 * (_quant_error(x, bk) + _quant_error(h, bk)) + 1e-2
    err, err_bf16 = rel_err(out, exact), rel_err(bf16, exact)
    record_property("a8_vs_exact", err)
    record_property("bf16_vs_exact", err_bf16)
    print(f"a8 {err:.2e} bf16 kernels {err_bf16:.2e} bound {bound:.2e}")
    assert err < bound
    assert rel_err(out, reference_layer(layer, x, idx, w)) < bound


def test_a8_graph_replay_equals_eager(monkeypatch):
    _forced(monkeypatch, launch.A8Config(64, 128, 64, num_warps=4, num_stages=2))
    layer = random_experts(6, 256, 128, [2, 3, 4, 8, 3, 4], group_size=64, seed=7)
    static = [activations(200, 256, seed=8), *routing(200, 6, 2, "cuda", seed=9)]
    with torch.no_grad():
        layer(*static)
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(*static)
        for seed in (10, 11):
            new = [activations(200, 256, seed=seed), *routing(200, 6, 2, "cuda", seed=seed)]
            for buf, value in zip(static, new):
                buf.copy_(value)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, layer(*new))
