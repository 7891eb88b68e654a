// GEMM of 16-bit weights (bfloat16 or float16) x float32 activations, for CPUs without native bf16 compute (AVX2-only
// x86: AMD EPYC Zen 1-3, Intel before Cooper Lake): y[m, r] = sum_k x[m, k] * W[r, k] in float32.
//
// Without AVX512_BF16 / AMX, torch's bf16 matmul converts every element on every use and runs far below the FMA
// peak. Here a unit of at most kUnit16 weight rows is packed, kKc16 inputs at a time, into a per-thread buffer of
// float32 panels of 16 rows laid out [k][16] (16 rows x 256 inputs: 16 KB, one L1; the unit's panels: 64 KB, one
// L2), converted once (bf16: the 16 bits become a float's upper half, exact; float16: F16C); then a micro-kernel of
// MR <= 6 x rows x 16 outputs keeps 12 float32 accumulators in registers: per input, two loads of the panel, six
// broadcasts of x, twelve FMAs. The x rows are read in place (each 6-row tile of kKc16 inputs stays in L1 across the
// unit's panels). Partial panels (rows not a multiple of 16) are zero-padded; x row tails run MR = 1..5.
// The portable version (gemm16.cpp) does the same blocking in plain C++: it is the reference of the SIMD one and runs
// where no x86 SIMD ISA is named.
#pragma once
#include <cstdint>

namespace mc_lowbit {

enum WType16 : int64_t { kBf16 = 0, kF16 = 1 };

constexpr int64_t kKc16 = 256;   // inputs per packed block
constexpr int64_t kNr16 = 16;    // weight rows per panel (two AVX2 vectors)
constexpr int64_t kUnit16 = 64;  // weight rows per work unit (what one thread packs and runs)

// Rows r0 .. r1 (r1 - r0 <= kUnit16) of W [n, k] (row stride k, `type` bits), against x rows 0 .. M (row stride ldx)
// -> y[m * ldy + r] (overwritten).
using Gemm16Fn = void (*)(const float* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t type, int64_t k,
                          int64_t r0, int64_t r1, float* y, int64_t ldy);
void gemm16_portable(const float* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t type, int64_t k, int64_t r0,
                     int64_t r1, float* y, int64_t ldy);
void gemm16_avx2(const float* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t type, int64_t k, int64_t r0,
                 int64_t r1, float* y, int64_t ldy);
void gemm16_avx512(const float* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t type, int64_t k, int64_t r0,
                   int64_t r1, float* y, int64_t ldy);

// The kernel of an Isa id (lowbit.h): AVX-512F on kAvx512Vnni (gemm16_avx512.cpp: two panels per step), AVX2 on
// kAvx2, else the portable one.
Gemm16Fn gemm16_kernel(int64_t isa);

}  // namespace mc_lowbit
