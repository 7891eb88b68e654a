"""C++ kernels for packed experts on CPU (sources: csrc/).

PyTorch's own int4 kernel dequantizes its weights again for every 4 rows of x, so past a few rows per expert it
costs more than the bf16 matmul it replaces; dequantizing a whole expert first and running a bf16 matmul writes and
reads back 4x the packed bytes (8x at 2 bits). The kernels here do better:

- `int4_mm` and `packed_mm` (CPUs with AMX BF16, e.g. Xeon Sapphire Rapids and later): for each expert and 64-row
  strip of its weights, the strip is dequantized into a small buffer in AMX's tile layout and multiplied there,
  float32 accumulation; the dequantized weights never leave the core's caches. `packed_mm` reads our own packing
  of any bit-width, 2/3/4/8 (csrc/packed_mm.cpp): the registry's prefill kernel on AMX CPUs (packed_amx), where every
  width keeps the format's packing. `int4_mm` reads the blocked int4 layout that 4-bit groups are converted to at
  load on the cpu:torch ISA only (csrc/int4_blocked.cpp).
- `dequant_blocked` (AVX-512 BF16 vectorized, else scalar): a whole 4-bit expert in bf16, one pass, for a bf16
  matmul where there is no AMX.

Each weight is rounded once to bf16 from its exact float32 value: q * scale + (zero - 8 * scale) from the int4
layout's bf16 (scale, zero), (q - z) * s from our format. The module is compiled with torch.utils.cpp_extension the
first time it is needed (when a packed model computing in bf16 loads on CPU: a minute or two, cached in torch's
extension directory per CPU, torch version, flags and source; later loads import the build directly, extension.py).
Without a C++ compiler, or with MOECOMPRESS_NO_CPP=1, `available()` is False and callers keep the torch-ops paths
(the int4 one computes the same formula in three passes, its shift rounded to bf16 first: results may differ in the
last bf16 bit).
"""
from __future__ import annotations

import os
import warnings
from functools import cache
from pathlib import Path

import torch

from moecompress.runtime.kernels.extension import extension_name, load_extension

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))


# -march=native: the build is cached per CPU (its flags are part of the build's name)
CFLAGS, LDFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp"), ("-fopenmp",)


def build_name() -> str:
    """The build's name: sources, headers, flags, the CPU's flags, torch version (extension.extension_name)."""
    return extension_name("moecompress_cpu_kernels", SOURCES + HEADERS, CFLAGS + LDFLAGS, _cpu_flags(),
                          torch.__version__)


@cache
def _module():
    if os.environ.get("MOECOMPRESS_NO_CPP"):
        return None
    try:
        return load_extension(build_name(), SOURCES, CFLAGS, LDFLAGS)
    except Exception as exc:  # no compiler, no ninja, failed build: the torch-ops path stays in use
        warnings.warn(f"moecompress: the C++ CPU kernels are unavailable ({type(exc).__name__}: {str(exc)[:200]}); "
                      f"using the slower torch-ops paths")
        return None


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() + platform.machine()


def available() -> bool:
    """The module is built (compiles it on first call)."""
    return _module() is not None


@cache
def amx() -> bool:
    """`int4_mm` and `packed_mm` run here: built with AMX BF16, and the OS grants this process the AMX tile state."""
    return available() and bool(_module().amx_available())


def _slots(slots: list[int]) -> torch.Tensor:
    return torch.tensor(slots, dtype=torch.int64)


def _starts(counts: list[int]) -> torch.Tensor:
    """Row offsets of each slot's rows in x: [0, c0, c0 + c1, ...]."""
    return torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)


def dequant_blocked(packed: torch.Tensor, sz: torch.Tensor, slots: list[int], block: int, group: int) -> torch.Tensor:
    """packed uint8 [N, n, k/2] (blocked layout), sz bf16 [N, k/group, n, 2] -> bf16 [len(slots), k, n] (transposed)."""
    return _module().dequant_blocked(packed, sz, _slots(slots), block, group)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, slots: list[int], counts: list[int], block: int,
            group: int) -> torch.Tensor:
    """x bf16 [R, k], rows sorted by slot with counts[i] rows for slots[i] -> bf16 [R, n], x @ W[slot]^T per slot."""
    return _module().int4_mm_amx(x.contiguous(), packed, sz, _slots(slots), _starts(counts), block, group)


def packed_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
              group: int, slots: list[int], counts: list[int]) -> torch.Tensor:
    """x bf16 [R, k] sorted by slot (counts[i] rows for slots[i]); qweight [N, n, k*bits/8] in our packing, scales
    float16 / zeros uint8 [N, n, k/group] (zeros None: symmetric) -> bf16 [R, n], x @ W[slot]^T per slot."""
    zeros = torch.empty(0, dtype=torch.uint8) if zeros is None else zeros
    return _module().packed_mm_amx(x.contiguous(), qweight, scales, zeros, bits, group, _slots(slots), _starts(counts))
