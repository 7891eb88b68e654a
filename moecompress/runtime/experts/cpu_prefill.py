"""The MoE layer of many tokens (prefill) on CPU in one C++ call (csrc/lowbit/moe_prefill.cpp).

Where the decode kernel of every group is a `q8_*` one of an ISA whose prefill runs the int8 kernels too (AVX2
without VNNI, bf16 / float16 activations: kernel_registry.Q8_PREFILL_ISAS), PackedExperts' general path would run
the same integer kernels per projection and group (the register-blocked GEMM of csrc/lowbit/gemm.h for experts of
8 rows and more, cpu_lowbit.prefill_q8), with the
routing, the gather of 8 copies of each token, their float32 conversion and int8 quantization, the
activation and the weighted sum as torch ops in between (about a sixth of a 512-token prefill of a Qwen3-30B-A3B-dims
layer). This call does all of it in C++, each step split over the threads: every token quantized once, copied to its
pairs; the experts' (expert, 64-row block) units across the threads; silu(gate) * up per pair; the weighted sum per
token in k order. It takes the calls of more tokens than cpu_moe.fused_layer takes (at least its default limit,
also where MOECOMPRESS_CPU_FUSED_TOKENS turns that call off) under the same
conditions (packed groups, one ISA and group size, the default SiLU gate); MOECOMPRESS_CPU_PREFILL_FUSED=0 turns it
off (eval/bench_cpu.py compares). The numbers are the fused decode call's: int8 activations, float32 in between.
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from moecompress.errors import MoecompressError
from moecompress.runtime.experts import cpu_moe
from moecompress.runtime.kernels import kernel_registry

PREFILL_FUSED_ENV = "MOECOMPRESS_CPU_PREFILL_FUSED"


def enabled() -> bool:
    value = os.environ.get(PREFILL_FUSED_ENV, "1")
    if value not in ("0", "1"):
        raise MoecompressError(f"{PREFILL_FUSED_ENV}={value!r}: 1 (default) or 0 (the general path)")
    return value == "1"


def prefill_layer(module, hidden: torch.Tensor) -> cpu_moe.FusedLayer | None:
    """The prefill call for this PackedExperts module and these hidden states, or None (the general path runs)."""
    if (hidden.device.type != "cpu" or hidden.shape[0] <= max(cpu_moe.max_tokens(), cpu_moe.FUSED_MAX_TOKENS)
            or not enabled()):
        return None
    return cpu_moe.cached_on(module, ("prefill", hidden.dtype, *kernel_registry.settings()),
                           lambda: _build(module, hidden.dtype))


def _build(module, dtype: torch.dtype) -> cpu_moe.FusedLayer | None:
    layer = cpu_moe.build_layer(module, dtype)  # packed groups whose decode kernels are q8_* ones of one ISA
    if layer is None or layer.isa not in kernel_registry.Q8_PREFILL_ISAS:
        return None
    return replace(layer, op="moe_prefill")
