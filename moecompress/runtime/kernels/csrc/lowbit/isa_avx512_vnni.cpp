// AVX-512 VNNI kernels (Ice Lake / Zen 4 and later): vpdpbusd on 256-bit vectors (kernel_x86.h). 256 bits, not 512:
// a block of 32 inputs fills one vector for every group size, and Zen 4 runs 512-bit operations as two halves.
#include "lowbit.h"
#if defined(__x86_64__) || defined(_M_X64)
// every header before the target pragma: no inline function of theirs is compiled for this ISA alone
#include <immintrin.h>
#include <cstring>
#include <vector>
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define MC_VNNI 1
#include "kernel_x86.h"

namespace mc_lowbit {
void decode_avx512_vnni(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, int64_t rows,
                        float* y) {
  decode_any(w, a, e, r0, r1, x0, rows, y);
}
}  // namespace mc_lowbit
#endif
