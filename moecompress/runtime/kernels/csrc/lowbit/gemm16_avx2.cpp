// The AVX2 + FMA + F16C GEMM of 16-bit weights x float32 activations (gemm16.h): panels of 16 weight rows converted
// to float32 by an 8 x 8 transposition, a 6 x 16 register-blocked FMA micro-kernel.
#include "dense.h"
#include "gemm16.h"
#if defined(__x86_64__) || defined(_M_X64)
// every header before the target pragma: no inline function of theirs is compiled for this ISA alone
#include <immintrin.h>
#include <algorithm>
#include <vector>
#pragma GCC target("avx2,fma,f16c")

namespace mc_lowbit {
namespace {

#include "gemm16_x86.h"

// MR x rows (stride ldx) x one panel -> c (stride ldc): cols <= 16 columns stored; accumulate: c += instead of c =.
template <int MR>
inline void micro(const float* x, int64_t ldx, const float* wp, int64_t kc, float* c, int64_t ldc, int64_t cols,
                  bool accumulate) {
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) acc0[m] = _mm256_setzero_ps(), acc1[m] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m256 w0 = _mm256_loadu_ps(wp + kk * 16), w1 = _mm256_loadu_ps(wp + kk * 16 + 8);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * ldx + kk);
      acc0[m] = _mm256_fmadd_ps(xb, w0, acc0[m]);
      acc1[m] = _mm256_fmadd_ps(xb, w1, acc1[m]);
    }
  }
  if (cols == 16) {
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      float* cm = c + m * ldc;
      if (accumulate) {
        acc0[m] = _mm256_add_ps(acc0[m], _mm256_loadu_ps(cm));
        acc1[m] = _mm256_add_ps(acc1[m], _mm256_loadu_ps(cm + 8));
      }
      _mm256_storeu_ps(cm, acc0[m]);
      _mm256_storeu_ps(cm + 8, acc1[m]);
    }
    return;
  }
  alignas(32) float tmp[MR * 16];  // every index constant (unrolled): the accumulators stay in registers above
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) {
    _mm256_store_ps(tmp + m * 16, acc0[m]);
    _mm256_store_ps(tmp + m * 16 + 8, acc1[m]);
  }
  for (int m = 0; m < MR; ++m) {
    float* cm = c + m * ldc;
    for (int64_t j = 0; j < cols; ++j) cm[j] = accumulate ? cm[j] + tmp[m * 16 + j] : tmp[m * 16 + j];
  }
}

struct Avx2 {
  static constexpr int64_t kPanelsPerStep = 1;
  template <int MR>
  static void tile(const float* x, int64_t ldx, const float* wp, int64_t kc, float* c, int64_t ldc, int64_t cols,
                   bool accumulate) {
    micro<MR>(x, ldx, wp, kc, c, ldc, cols, accumulate);
  }
};

}  // namespace

void gemm16_avx2(const float* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t type, int64_t k, int64_t r0,
                 int64_t r1, float* y, int64_t ldy) {
  gemm16_blocked<Avx2>(x, ldx, M, w, type, k, r0, r1, y, ldy);
}

}  // namespace mc_lowbit
#endif
