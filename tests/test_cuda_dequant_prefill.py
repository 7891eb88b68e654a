"""Prefill by dequantize-then-GEMM (runtime/cuda/dequant.py) against the dequantize-then-matmul reference.

dequant_kernel gives the reference's bf16 weights bit for bit (every packed width, asymmetric and symmetric, groups of
32/64/128, partial tiles); the layer matches reference_layer on mixed bit-widths with a bf16 group and dropped experts,
without launching the fused kernels; below the rule's rows or above its bits the fused kernels run; a CUDA-graph
replay equals the eager call. Skipped without CUDA/Triton (the reason is
moecompress.runtime.cuda.unavailable_reason()); the rule (launch.prefill_dequant) is checked on the CPU in
tests/test_gpu_launch_rules.py.
"""
from __future__ import annotations

import pytest
import torch

from moecompress.runtime import cuda
from moecompress.runtime.cuda import launch
from test_cuda_kernels import (activations, dequantized_weights, random_experts, reference_layer, rel_err, routing,
                               tolerance)

pytestmark = pytest.mark.skipif(not cuda.available(), reason=f"CUDA kernels: {cuda.unavailable_reason()}")


def _grouped_mm_reason() -> str | None:
    if not cuda.available():
        return cuda.unavailable_reason()
    if not hasattr(torch, "_grouped_mm") or torch.cuda.get_device_capability() < (8, 0):
        return "torch._grouped_mm needs torch >= 2.9 and an sm80+ GPU"
    return None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,symmetric,hidden,inter", [(128, False, 384, 256), (32, True, 352, 96),
                                                               (64, False, 320, 192)])
def test_dequant_kernel_gives_the_reference_weights(bits, group_size, symmetric, hidden, inter):
    """K 352 / 320: a partial step of 128; N 352 / 320: partial tiles of 64 rows."""
    from moecompress.runtime.cuda import dequant

    layer = random_experts(3, hidden, inter, [bits] * 3, group_size=group_size, symmetric=symmetric, seed=bits)
    for proj in ("gate_up", "down"):
        for group in getattr(layer, proj).children():
            ref = dequantized_weights(group, torch.bfloat16)
            out = torch.full(ref.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
            dequant.dequantize_into(group, out)
            assert torch.equal(out.float(), ref), (proj, group.bits)
            one = torch.full(ref[1:2].shape, float("nan"), dtype=torch.bfloat16, device="cuda")
            dequant.dequantize_into(group, one, slice(1, 2))
            assert torch.equal(one.float(), ref[1:2])


def _forced(monkeypatch) -> None:
    monkeypatch.setattr(launch, "PREFILL_DEQUANT", True)
    monkeypatch.setattr(launch, "PREFILL_DEQUANT_MIN_ROWS", 0)
    monkeypatch.setattr(launch, "PREFILL_DEQUANT_MAX_BITS", 16)


def _fused_ran(layer) -> bool:
    return any(g.__dict__.get("_cuda_launchers") for proj in ("gate_up", "down")
               for g in getattr(layer, proj).children())


@pytest.mark.skipif(_grouped_mm_reason() is not None, reason=f"{_grouped_mm_reason()}")
@pytest.mark.parametrize("bits,held", [((2, 3, 4, 8, 3, 4), None), ((3, 16, 2, 3, 4, 2), [0, 1, 3, 5])])
def test_dequant_prefill_matches_reference(bits, held, monkeypatch):
    _forced(monkeypatch)
    layer = random_experts(6, 256, 128, list(bits), group_size=64, held=held, seed=3)
    x = activations(300, 256, seed=4)
    idx, w = routing(300, 6, 2, "cuda", seed=5)
    with torch.no_grad():
        out = layer(x, idx, w)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_err(out, reference_layer(layer, x, idx, w)) < tolerance(300)
    assert not _fused_ran(layer)


@pytest.mark.parametrize("min_rows,max_bits", [(1000, 16.0), (0, 3.5)])
def test_rule_keeps_the_fused_kernels(min_rows, max_bits, monkeypatch):
    """Mean rows per expert below PREFILL_DEQUANT_MIN_ROWS (100 < 1000), or mean bits above PREFILL_DEQUANT_MAX_BITS
    (4.0 > 3.5): the fused prefill kernels, as before."""
    monkeypatch.setattr(launch, "PREFILL_DEQUANT", True)
    monkeypatch.setattr(launch, "PREFILL_DEQUANT_MIN_ROWS", min_rows)
    monkeypatch.setattr(launch, "PREFILL_DEQUANT_MAX_BITS", max_bits)
    layer = random_experts(6, 256, 128, [2, 3, 4, 8, 3, 4], group_size=64, seed=3)
    x = activations(300, 256, seed=4)
    idx, w = routing(300, 6, 2, "cuda", seed=5)
    with torch.no_grad():
        out = layer(x, idx, w)
    assert rel_err(out, reference_layer(layer, x, idx, w)) < tolerance(300)
    assert _fused_ran(layer)


@pytest.mark.skipif(_grouped_mm_reason() is not None, reason=f"{_grouped_mm_reason()}")
def test_dequant_prefill_graph_replay_equals_eager(monkeypatch):
    _forced(monkeypatch)
    layer = random_experts(6, 256, 128, [2, 3, 4, 8, 3, 4], group_size=64, seed=7)
    static = [activations(200, 256, seed=8), *routing(200, 6, 2, "cuda", seed=9)]
    with torch.no_grad():
        layer(*static)  # compiles the kernels (outside the capture)
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(*static)
        for seed in (10, 11):  # new inputs into the captured buffers
            new = [activations(200, 256, seed=seed), *routing(200, 6, 2, "cuda", seed=seed)]
            for buf, value in zip(static, new):
                buf.copy_(value)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, layer(*new))
    assert not _fused_ran(layer)
