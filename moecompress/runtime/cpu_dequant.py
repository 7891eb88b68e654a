"""One-pass dequantization of PyTorch's blocked CPU int4 layout, as a small C++ kernel compiled once per machine.

With torch ops, turning the int4 layout into bf16 weights takes three passes over the weights (unpack the nibbles,
convert, scale and shift); at Qwen3-30B-A3B expert sizes that costs more than the bf16 matmul that follows. This
kernel reads each byte once and writes both of its weights, (q * scale + shift) rounded to bf16, in the transposed
[in, out] order the grouped matmul takes. It is compiled with torch.utils.cpp_extension the first time it is needed
(when a 4-bit model computing in bf16 loads: about a minute, cached in torch's extension directory); without a C++
compiler, or with MOECOMPRESS_NO_CPP=1, `available()` is False and callers keep the torch-ops path, the same formula
in three passes (its shift is rounded to bf16 first, so results may differ in the last bf16 bit).
"""
from __future__ import annotations

import os
import warnings
from functools import cache

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <cstring>

// float -> bf16 bits, round to nearest even (finite inputs); branch-free so the loops below vectorize
static inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// packed: uint8 [E, n, k/2] in the blocked layout of `block` rows (viewed [E, n/block, k, block/2]: byte j holds
// row j in its low nibble and row j + block/2 in its high nibble); scale, shift: float32 [E, k/group, n].
// Returns bf16 [E, k, n] with w[e, k, r] = q[e, r, k] * scale[e, k/group, r] + shift[e, k/group, r].
torch::Tensor dequant_blocked(torch::Tensor packed, torch::Tensor scale, torch::Tensor shift, int64_t block,
                              int64_t group, torch::Tensor out) {
  TORCH_CHECK(packed.is_contiguous() && scale.is_contiguous() && shift.is_contiguous(), "contiguous inputs");
  const int64_t E = packed.size(0), n = packed.size(1), k = packed.size(2) * 2, half = block / 2, nb = n / block;
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == torch::kBFloat16 && out.numel() == E * k * n, "out");
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  const float* z = shift.data_ptr<float>();
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  at::parallel_for(0, E * k, 16, [&](int64_t begin, int64_t end) {
    for (int64_t ek = begin; ek < end; ++ek) {
      const int64_t e = ek / k, kk = ek % k, row = e * (k / group) + kk / group;
      const float* __restrict__ sr = s + row * n;
      const float* __restrict__ zr = z + row * n;
      uint16_t* __restrict__ orow = o + ek * n;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* __restrict__ src = p + ((e * nb + b) * k + kk) * half;
        const int64_t lo = b * block, hi = lo + half;
        for (int64_t j = 0; j < half; ++j)
          orow[lo + j] = to_bf16(static_cast<float>(src[j] & 15) * sr[lo + j] + zr[lo + j]);
        for (int64_t j = 0; j < half; ++j)
          orow[hi + j] = to_bf16(static_cast<float>(src[j] >> 4) * sr[hi + j] + zr[hi + j]);
      }
    }
  });
  return out;
}
"""


@cache
def _module():
    if os.environ.get("MOECOMPRESS_NO_CPP"):
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        # -march=native: the build is cached per CPU (flags hashed into the name) and per torch version
        name = f"moecompress_cpu_dequant_v4_{_cpu_tag()}_" + torch.__version__.replace(".", "_").replace("+", "_")
        return load_inline(name=name, cpp_sources=[_SOURCE], functions=["dequant_blocked"],
                           extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, failed build: the torch-ops path stays in use
        warnings.warn(f"moecompress: the C++ int4 dequantization kernel is unavailable ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); using the slower torch-ops path")
        return None


def _cpu_tag() -> str:
    import hashlib
    from pathlib import Path

    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        import platform

        flags = platform.processor() + platform.machine()
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def available() -> bool:
    return _module() is not None


def dequant_blocked(packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, block: int,
                    group: int) -> torch.Tensor:
    """packed uint8 [E, n, k/2] (blocked layout), scale / shift [E, k/group, n] -> bf16 [E, k, n] (transposed)."""
    e, n, half_k = packed.shape
    out = torch.empty(e, 2 * half_k, n, dtype=torch.bfloat16)
    return _module().dequant_blocked(packed.contiguous(), scale.float().contiguous(), shift.float().contiguous(),
                                     block, group, out)
