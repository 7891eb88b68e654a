// AVX2 + FMA + F16C kernels (Haswell / Zen and later): vpmaddubsw + vpmaddwd integer dot products (kernel_x86.h).
#include "lowbit.h"
#if defined(__x86_64__) || defined(_M_X64)
// every header before the target pragma: no inline function of theirs is compiled for this ISA alone
#include <immintrin.h>
#include <cstring>
#include <vector>
#pragma GCC target("avx2,fma,f16c")
#define MC_VNNI 0
#include "kernel_x86.h"

namespace mc_lowbit {
void decode_avx2(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, int64_t rows, float* y) {
  decode_any(w, a, e, r0, r1, x0, rows, y);
}
void dequant_avx2(const Weights& w, int64_t e, int64_t r0, int64_t r1, float* tile) { dequant_any(w, e, r0, r1, tile); }
}  // namespace mc_lowbit
#endif
