// Low-bit CPU kernels without AMX (built by runtime/kernels/cpu_lowbit.py as their own module, with the compiler's baseline
// flags: each ISA's kernels are compiled for that ISA alone, by a target pragma in their own file).
//
// Weights in moecompress's packing (format/pack.py): row r of expert e holds k values of `bits` bits, blocks of 8
// values in `bits` bytes, little-endian; scales float16 and zeros uint8 per group of `group` inputs; w = (q - z) * s
// (symmetric: z = 2^(bits-1)).
//
// Decode (few rows per expert), as llama.cpp does: each row of x is quantized to int8 per group of the weights
// (scale dx = max|x| / 127), and each group's integer dot product sum(q * xq) - z * sum(xq) is exact in int32; the
// float result is sum over groups of s * dx * that integer. So the output equals x_hat @ W^T, x_hat = dx * xq,
// up to float32 summation order.
//
// A block is 32 consecutive inputs (4 * bits bytes of a row). The SIMD kernels unpack a block into 32 byte lanes in
// an order of their own (`block_order`); the activations are stored in that order, so no shuffle is needed per
// weight. The prefill path's dequantized tiles come out in the same order, and x's columns are permuted to match.
#pragma once
#include <cstdint>

namespace mc_lowbit {

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512Vnni = 2, kNeonDotprod = 3 };

struct Weights {
  const uint8_t* q;     // [N, n, row_bytes]
  const uint16_t* s;    // float16 bits [N, n, groups]
  const uint8_t* z;     // [N, n, groups], nullptr: symmetric
  int64_t n, k, bits, group, groups, row_bytes;
  const uint8_t* row(int64_t e, int64_t r) const { return q + (e * n + r) * row_bytes; }
  int64_t at(int64_t e, int64_t r, int64_t g) const { return (e * n + r) * groups + g; }
  int zero(int64_t i) const { return z ? z[i] : 1 << (bits - 1); }
};

// Quantized rows of x: xq int8 [R, k] in the ISA's block order, dx float [R, groups], isum int32 [R, groups]
// (sum of xq over the group).
struct Acts {
  const int8_t* xq;
  const float* dx;
  const int32_t* isum;
  int64_t k, groups;
};

// Position inside a 32-input block, in the SIMD kernels' order, of input i (0..31) of that block.
int block_order(int64_t bits, int i);

float half_to_float(uint16_t h);

// y[x0 + m, r] for m < rows, r in [r0, r1): rows x0.. of x against rows r0..r1 of expert e; y float [R, n].
void decode_portable(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, int64_t rows, float* y);
void decode_avx2(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, int64_t rows, float* y);
void decode_avx512_vnni(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, int64_t rows, float* y);
void decode_neon_dotprod(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, int64_t rows, float* y);

// Rows r0..r1 of expert e dequantized, (q - z) * s exact in float32, into tile [r1 - r0, k]: natural input order
// (portable) or the SIMD block order.
void dequant_portable(const Weights& w, int64_t e, int64_t r0, int64_t r1, float* tile);
void dequant_avx2(const Weights& w, int64_t e, int64_t r0, int64_t r1, float* tile);

}  // namespace mc_lowbit
