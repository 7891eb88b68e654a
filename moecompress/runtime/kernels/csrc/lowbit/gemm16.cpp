// The 16-bit-weight GEMM (gemm16.h): its portable version, the dispatch, and the dense linear's torch op.
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>
#include "dense.h"
#include "gemm16.h"
#include "ops.h"

namespace mc_lowbit {
namespace {

float value16(uint16_t h, int64_t type) { return type == kF16 ? half_to_float(h) : bf16_value(h); }

}  // namespace

void gemm16_portable(const float* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t type, int64_t k, int64_t r0,
                     int64_t r1, float* y, int64_t ldy) {
  thread_local std::vector<float> buf;
  buf.resize(kUnit16 * kKc16);
  const int64_t panels = (r1 - r0 + kNr16 - 1) / kNr16;
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * ldy + r0, y + m * ldy + r1, 0.f);
  for (int64_t k0 = 0; k0 < k; k0 += kKc16) {
    const int64_t kc = std::min(kKc16, k - k0);
    for (int64_t p = 0; p < panels; ++p) {  // panel p: [kk][16], rows past r1 zero
      float* dst = buf.data() + p * kKc16 * kNr16;
      for (int64_t kk = 0; kk < kc; ++kk)
        for (int64_t i = 0; i < kNr16; ++i) {
          const int64_t r = r0 + p * kNr16 + i;
          dst[kk * kNr16 + i] = r < r1 ? value16(w[r * k + k0 + kk], type) : 0.f;
        }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t p = 0; p < panels; ++p) {
        float acc[kNr16] = {};
        const float* wp = buf.data() + p * kKc16 * kNr16;
        const float* xm = x + m * ldx + k0;
        for (int64_t kk = 0; kk < kc; ++kk)
          for (int64_t i = 0; i < kNr16; ++i) acc[i] += xm[kk] * wp[kk * kNr16 + i];
        const int64_t r = r0 + p * kNr16, cols = std::min(kNr16, r1 - r);
        for (int64_t i = 0; i < cols; ++i) y[m * ldy + r + i] += acc[i];
      }
  }
}

Gemm16Fn gemm16_kernel(int64_t isa) {
  decode_kernel(isa);  // checks the ISA
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == kAvx512Vnni) return gemm16_avx512;
  if (isa == kAvx2) return gemm16_avx2;
#endif
  return gemm16_portable;
}

int64_t type16(const torch::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kHalf, "weights: bfloat16 or float16");
  return w.scalar_type() == torch::kBFloat16 ? kBf16 : kF16;
}

const uint16_t* bits16(const torch::Tensor& w) { return reinterpret_cast<const uint16_t*>(w.data_ptr()); }

// x float32 [M, k] @ w [n, k]^T (bfloat16 / float16) -> float32 [M, n], threads over units of kUnit16 weight rows.
torch::Tensor linear16(torch::Tensor x, torch::Tensor w, int64_t isa) {
  const Gemm16Fn fn = gemm16_kernel(isa);
  const int64_t type = type16(w);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w: contiguous [n, k]");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.size(1) == w.size(1), "x: float32 [M, k]");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), n = w.size(0), k = w.size(1);
  auto y = torch::empty({M, n}, torch::kFloat);
  if (M == 0 || n == 0) return y;
  const float* xs = xc.data_ptr<float>();
  const uint16_t* ws = bits16(w);
  float* out = y.data_ptr<float>();
  const int64_t units = (n + kUnit16 - 1) / kUnit16;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) fn(xs, k, M, ws, type, k, u * kUnit16, std::min(n, (u + 1) * kUnit16), out, n);
  });
  return y;
}

}  // namespace mc_lowbit
