"""Low-bit kernels for packed experts on CPUs without AMX (sources: csrc/lowbit/, its lowbit.h explains the math).

- `decode` (few rows per expert), llama.cpp's approach: each row of x is quantized to int8 per group of the weights
  (dx = max|x| / 127), integer dot products against the packed 2/3/4/8-bit weights unpacked in registers
  (AVX2: vpmaddubsw + vpmaddwd; AVX-512 VNNI: vpdpbusd; ARM64 NEON dotprod: sdot; portable C++ elsewhere), then per group
  s * dx * (sum(q * xq) - z * sum(xq)) in float32. The result is x_hat @ W^T with x_hat = dx * xq: the only error
  beyond float32 summation order is the int8 rounding of x, at most dx / 2 per input.
- `prefill` (many rows per expert): for each expert and strip of `tile_rows` weight rows, the strip is dequantized
  into a per-thread tile, (q - z) * s exact in float32 (bf16 where the CPU computes bf16 natively, see
  cpu_features.compute_dtype), and multiplied with at::mm. No more than one tile per thread is ever dequantized.
- Threads: both split the work over (expert, block of weight rows) with at::parallel_for.
- `linear16` / `moe_prefill16`: 16-bit (bf16 / float16) weights x float32 activations, for unquantized models on CPUs
  without native bf16 (csrc/lowbit/gemm16.h: panels of weight rows converted to float32 once, a 6 x 16 FMA kernel
  on AVX2, 6 x 32 on AVX-512).

The module is compiled with torch.utils.cpp_extension on first use (tens of seconds, cached in torch's extension
directory by machine type, torch version, flags and source; later loads import the build directly, extension.py).
It is built with the compiler's baseline flags, never -march=native: each ISA's kernels carry their own target
pragma and run only where cpu_features finds that ISA, so one build runs on every CPU of the architecture. Without a compiler, or with MOECOMPRESS_NO_CPP=1, `available()`
is False and the registry falls back to the torch-ops paths.
"""
from __future__ import annotations

import os
import platform
import warnings
from functools import cache, lru_cache
from pathlib import Path

import torch

from moecompress.runtime.kernels.extension import extension_name, load_extension

CSRC = Path(__file__).parent / "csrc" / "lowbit"
ISA_ID = {"cpu:portable": 0, "cpu:avx2": 1, "cpu:avx512_vnni": 2, "cpu:neon_dotprod": 3}  # the Isa enum of lowbit.h
TILE_ROWS = 128  # weight rows per prefill tile: 128 x 2048 float32 = 1 MiB, one core's L2 on current x86 CPUs


CFLAGS, LDFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp"), ("-fopenmp",)


def build_name() -> str:
    """The build's name: sources (.cpp, .h), flags, machine type, torch version (extension.extension_name)."""
    files = [p for p in sorted(CSRC.iterdir()) if p.suffix in (".cpp", ".h")]
    return extension_name("moecompress_lowbit", files, CFLAGS + LDFLAGS, platform.machine(), torch.__version__)


@cache
def _module():
    if os.environ.get("MOECOMPRESS_NO_CPP"):
        return None
    try:
        return load_extension(build_name(), sorted(CSRC.glob("*.cpp")), CFLAGS, LDFLAGS)
    except Exception as exc:  # no compiler, no ninja, failed build: the torch-ops paths stay in use
        warnings.warn(f"moecompress: the low-bit C++ CPU kernels are unavailable ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); using the slower torch-ops paths")
        return None


def available() -> bool:
    """The module is built (compiles it on first call)."""
    return _module() is not None


def _slots_starts(slots: list[int], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return _slots_starts_of(tuple(slots), tuple(counts))


@lru_cache(maxsize=4096)
def _slots_starts_of(slots: tuple[int, ...], counts: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read-only index tensors of the C++ calls, made once per (slots, counts): decode steps repeat a few of them."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return torch.tensor(slots, dtype=torch.int64), torch.tensor(starts, dtype=torch.int64)


def _zeros(zeros: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8) if zeros is None else zeros


def quantize_rows(x: torch.Tensor, group: int, bits: int, isa: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float32 [R, k] -> (xq int8 [R, k] in the ISA's block order, dx float32 [R, k/group], isum int32)."""
    return tuple(_module().quantize_rows(x.float().contiguous(), group, bits, ISA_ID[isa]))


@cache
def block_order(bits: int) -> torch.Tensor:
    """int64 [32]: lane of each input of a 32-input block in the SIMD kernels' order."""
    return _module().block_order(bits)


@cache
def _column_order(bits: int, k: int) -> torch.Tensor:
    """int64 [k]: x[:, order] puts x's columns in the SIMD block order (order[32b + lane(i)] = 32b + i)."""
    lane = block_order(bits)
    inverse = torch.empty(32, dtype=torch.int64)
    inverse[lane] = torch.arange(32)
    return (torch.arange(0, k, 32).unsqueeze(1) + inverse).reshape(-1)


def decode(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
           group: int, slots: list[int], counts: list[int], isa: str) -> torch.Tensor:
    """x [R, k] sorted by slot (counts[i] rows for slots[i]); qweight [N, n, k*bits/8], scales float16 / zeros uint8
    [N, n, k/group] (None: symmetric) -> [R, n] in x's dtype, x @ W[slot]^T with x quantized to int8 per group."""
    s, starts = _slots_starts(slots, counts)
    y = _module().decode(x.float().contiguous(), qweight, scales, _zeros(zeros), bits, group, s, starts, ISA_ID[isa])
    return y.to(x.dtype)


def prefill_q8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               group: int, slots: list[int], counts: list[int], isa: str) -> torch.Tensor:
    """As `decode` (the same integers and per-group factors), with the register-blocked GEMM (csrc/lowbit/gemm.h) for
    slots of at least `gemm_min_rows()` rows on AVX2: [R, n] in x's dtype."""
    s, starts = _slots_starts(slots, counts)
    y = _module().prefill_q8(x.float().contiguous(), qweight, scales, _zeros(zeros), bits, group, s, starts, ISA_ID[isa])
    return y.to(x.dtype)


def gemm_min_rows(rows: int | None = None) -> int:
    """Rows per slot from which the prefill calls (prefill_q8, moe_prefill) run the GEMM on AVX2; with `rows`, sets
    it (tests and eval/bench_cpu_prefill.py compare it with the decode kernels). Returns the value before."""
    return _module().prefill_gemm_min_rows(-1 if rows is None else rows)


def prefill(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
            group: int, slots: list[int], counts: list[int], isa: str, dtype: torch.dtype,
            tile_rows: int = TILE_ROWS) -> torch.Tensor:
    """As `decode`, through dequantized tiles in `dtype` (float32 or bfloat16) and at::mm: [R, n] in x's dtype."""
    s, starts = _slots_starts(slots, counts)
    xt = x.to(dtype)
    if isa in ("cpu:avx2", "cpu:avx512_vnni"):  # their tiles hold each block's inputs in SIMD order: permute x
        xt = xt.index_select(1, _column_order(bits, x.shape[1]))
    y = _module().tile_linear(xt.contiguous(), qweight, scales, _zeros(zeros), bits, group, s, starts, ISA_ID[isa],
                              tile_rows)
    return y.to(x.dtype)


def dequant_tile(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group: int,
                 slot: int, rows: tuple[int, int], isa: str) -> torch.Tensor:
    """Weight rows [rows[0], rows[1]) of one slot, float32 [r, k], in the ISA's block order (what `prefill` uses)."""
    return _module().dequant_tile(qweight, scales, _zeros(zeros), bits, group, slot, rows[0], rows[1], ISA_ID[isa])


def linear16(x: torch.Tensor, weight: torch.Tensor, isa: str) -> torch.Tensor:
    """x [M, k] @ weight [n, k]^T with bfloat16 / float16 weights, computed in float32 by the packed-panel GEMM
    (csrc/lowbit/gemm16.h; AVX-512F on cpu:avx512_vnni, AVX2 on cpu:avx2, else portable C++): [M, n] in x's dtype."""
    y = _module().linear16(x.float().contiguous(), weight.contiguous(), ISA_ID[isa])
    return y.to(x.dtype)


def moe_prefill16(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  gate_up: torch.Tensor, down: torch.Tensor, isa: str) -> torch.Tensor:
    """A MoE layer of many tokens from transformers' fused 16-bit experts (gate_up [E, 2I, H], down [E, H, I]) in one
    call (csrc/lowbit/moe_prefill16.cpp): hidden [T, H], top_k_index / top_k_weights [T, K] -> [T, H] in hidden's
    dtype; float32 in between."""
    y = _module().moe_prefill16(hidden.float().contiguous(), top_k_index.long().contiguous(),
                                top_k_weights.float().contiguous(), gate_up, down, ISA_ID[isa])
    return y.to(hidden.dtype)
