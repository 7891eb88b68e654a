"""The CPU's instruction sets, read at run time, and what follows from them: the ISA whose kernels run and the
compute dtype.

Flags come from /proc/cpuinfo (x86 `flags`, ARM `Features`), else from torch.backends.cpu.get_cpu_capability().
ISAs, best first, each with the flags it needs (kernel_registry.py says which kernel each takes per bit-width):

- `cpu:amx`          AMX tiles + BF16 (Xeon Sapphire Rapids and later)
- `cpu:avx512_vnni`  AVX-512 F/BW/VL + VNNI (Ice Lake, Zen 4 and later)
- `cpu:avx2`         AVX2 + FMA + F16C (Haswell, Zen 1-3 and later)
- `cpu:neon_dotprod` ARM64 with the dot-product extension (`asimddp`: Cortex-A55/A76+, Neoverse N1+, Apple M1+)
- `cpu:portable`     any CPU: plain C++ kernels (needs a C++ compiler, as all of the above)
- `cpu:torch`        no compiler: PyTorch ops only

MOECOMPRESS_CPU_ISA=<name> (e.g. `cpu:avx2`, `cpu:portable`) forces a lower ISA than the CPU's best: how the tests
cover the other paths on one machine. Naming one the CPU lacks is an error.

Compute dtype: bfloat16 where the CPU computes it natively (AVX-512 BF16 or AMX BF16: vdpbf16ps / tdpbf16ps),
float32 elsewhere (AVX2-only and ARM without BF16): there bf16 matmuls convert every element and run slower than
float32 ones, while float32 weights tiles cost only cache, never memory (they live for one tile).
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from moecompress.errors import MoecompressError

ISA_ENV = "MOECOMPRESS_CPU_ISA"
ISA_ORDER = ("cpu:amx", "cpu:avx512_vnni", "cpu:avx2", "cpu:neon_dotprod", "cpu:portable", "cpu:torch")  # best first
REQUIRES: dict[str, frozenset[str]] = {
    "cpu:amx": frozenset({"amx_tile", "amx_bf16", "avx512f", "avx512bw", "avx512_bf16", "avx512vbmi"}),
    "cpu:avx512_vnni": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"}),
    "cpu:avx2": frozenset({"avx2", "fma", "f16c"}),
    "cpu:neon_dotprod": frozenset({"asimd", "asimddp"}),
    "cpu:portable": frozenset(),
    "cpu:torch": frozenset(),
}
ARCH = {"cpu:amx": "x86_64", "cpu:avx512_vnni": "x86_64", "cpu:avx2": "x86_64", "cpu:neon_dotprod": "aarch64"}
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags; ARM's `bf16` feature
# What torch.backends.cpu.get_cpu_capability() implies, where /proc/cpuinfo cannot be read
_CAPABILITY_FLAGS = {
    "AVX2": {"avx2", "fma", "f16c"},
    "AVX512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"},
}


@dataclass(frozen=True)
class CpuFeatures:
    machine: str  # platform.machine(): x86_64, aarch64, ...
    flags: frozenset[str]

    def has(self, isa: str) -> bool:
        return REQUIRES[isa] <= self.flags and ARCH.get(isa, self.arch) == self.arch

    @property
    def arch(self) -> str:
        return {"amd64": "x86_64", "arm64": "aarch64"}.get(self.machine.lower(), self.machine.lower())


def _read_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return frozenset(value.split())
    except OSError:
        pass
    return frozenset(_CAPABILITY_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ()))


@cache
def detect() -> CpuFeatures:
    return CpuFeatures(platform.machine(), _read_flags())


def best_isa(features: CpuFeatures | None = None) -> str:
    """The best ISA of this CPU, or the one MOECOMPRESS_CPU_ISA names (an error when the CPU lacks it)."""
    features = features or detect()
    forced = os.environ.get(ISA_ENV)
    if forced:
        if forced not in REQUIRES:
            raise MoecompressError(f"{ISA_ENV}={forced!r} is not an ISA; allowed: {', '.join(ISA_ORDER)}")
        if not features.has(forced):
            raise MoecompressError(f"{ISA_ENV}={forced!r}: this CPU lacks {', '.join(sorted(REQUIRES[forced] - features.flags))}")
        return forced
    return next(isa for isa in ISA_ORDER if features.has(isa))


def compute_dtype(features: CpuFeatures | None = None) -> torch.dtype:
    """bfloat16 where the CPU computes it natively, float32 elsewhere (see the module docstring)."""
    features = features or detect()
    return torch.bfloat16 if features.flags & NATIVE_BF16 else torch.float32
