// Prefill GEMM of the int8-activation kernels (gemm_avx2.cpp, gemm.cpp): the same integers and per-group float factors
// as decode_* (lowbit.h), register-blocked for many x rows per expert.
//
// decode_avx2 takes one weight row at a time against up to 4 x rows (int8 dot products along k, a horizontal sum
// and the row's per-group factors for every 4 x rows). With small in_features that per-row work is as large as the
// multiply-adds (256 inputs at group 64: 8 blocks per row, 4 groups). gemm_avx2 instead transposes 8 unpacked weight
// rows into vectors of 8 rows x 4 inputs once per call (block by block, in the block order the activations are
// stored in) and keeps 8 outputs per vector: per 4 inputs of a block one vpmaddubsw per x row against a broadcast
// 4-byte group of xq, int16 sums over a block (int32 for 8-bit weights), int32 per group, then s * dx per group and
// the zero-point term s * (z - shift) * dx * isum as two FMAs for 8 outputs. No horizontal sums.
#pragma once
#include <cstdint>
#include "lowbit.h"

namespace mc_lowbit {

// x rows per call from which the GEMM replaces decode_avx2 (the transposition is paid once per call); the module's
// `prefill_gemm_min_rows` reads and sets it (tests and eval/bench_cpu_prefill.py compare both kernels).
constexpr int64_t kGemmMinRows = 8;
int64_t gemm_min_rows();

// As decode_avx2 (same arguments), rows r0 .. r0 + 8 * ((r1 - r0) / 8) by the GEMM, the rest by decode_avx2.
void gemm_avx2(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, int64_t rows, float* y);

// The prefill kernel of an Isa id for `rows` x rows: gemm_avx2 on AVX2 from gemm_min_rows() rows,
// else the decode kernel (ops.h decode_kernel).
using RowsFn = void (*)(const Weights&, const Acts&, int64_t, int64_t, int64_t, int64_t, int64_t, float*);
RowsFn prefill_kernel(int64_t isa, int64_t rows);

// The x86 SIMD ISAs (AVX2, AVX-512 VNNI): their activations are quantized by quantize_group_avx2 (bit-identical to
// ops.h's quantize_group) and silu_mul_avx2 runs (dense.h), as moe.cpp does.
bool simd_isa(int64_t isa);
using QuantizeFn = float (*)(const float*, int64_t, const int*, int8_t*, int32_t*);
QuantizeFn quantize_fn(int64_t isa);

}  // namespace mc_lowbit
