// The AVX-512F GEMM of 16-bit weights x float32 activations (gemm16.h), for AVX-512 CPUs without AVX512_BF16 (Intel
// Skylake-SP to Ice Lake; with AVX512_BF16 or AMX torch's bf16 matmul runs natively and is faster): the AVX2 file's
// panels (gemm16_x86.h), two at a time: a 6 x 32 micro-kernel, one 16-float vector per panel and x row (12
// accumulators of 32 registers), per input two panel loads, six broadcasts of x, twelve FMAs.
#include "dense.h"
#include "gemm16.h"
#if defined(__x86_64__) || defined(_M_X64)
// every header before the target pragma: no inline function of theirs is compiled for this ISA alone
#include <immintrin.h>
#include <algorithm>
#include <vector>
#pragma GCC target("avx512f,avx2,fma,f16c")

namespace mc_lowbit {
namespace {

#include "gemm16_x86.h"

// MR x rows (stride ldx) x two panels (wp, wp + one panel) -> c (stride ldc): cols <= 32 columns stored;
// accumulate: c += instead of c =.
template <int MR>
inline void micro2(const float* x, int64_t ldx, const float* wp, int64_t kc, float* c, int64_t ldc, int64_t cols,
                   bool accumulate) {
  const float* wq = wp + kKc16 * kNr16;
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) acc0[m] = _mm512_setzero_ps(), acc1[m] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m512 w0 = _mm512_loadu_ps(wp + kk * 16), w1 = _mm512_loadu_ps(wq + kk * 16);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * ldx + kk]);
      acc0[m] = _mm512_fmadd_ps(xb, w0, acc0[m]);
      acc1[m] = _mm512_fmadd_ps(xb, w1, acc1[m]);
    }
  }
  const __mmask16 lo = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 hi = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) {
    float* cm = c + m * ldc;
    if (accumulate) {
      acc0[m] = _mm512_add_ps(acc0[m], _mm512_maskz_loadu_ps(lo, cm));
      acc1[m] = _mm512_add_ps(acc1[m], _mm512_maskz_loadu_ps(hi, cm + 16));
    }
    _mm512_mask_storeu_ps(cm, lo, acc0[m]);
    _mm512_mask_storeu_ps(cm + 16, hi, acc1[m]);
  }
}

struct Avx512 {
  static constexpr int64_t kPanelsPerStep = 2;
  template <int MR>
  static void tile(const float* x, int64_t ldx, const float* wp, int64_t kc, float* c, int64_t ldc, int64_t cols,
                   bool accumulate) {
    micro2<MR>(x, ldx, wp, kc, c, ldc, cols, accumulate);
  }
};

}  // namespace

void gemm16_avx512(const float* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t type, int64_t k, int64_t r0,
                   int64_t r1, float* y, int64_t ldy) {
  gemm16_blocked<Avx512>(x, ldx, M, w, type, k, r0, r1, y, ldy);
}

}  // namespace mc_lowbit
#endif
