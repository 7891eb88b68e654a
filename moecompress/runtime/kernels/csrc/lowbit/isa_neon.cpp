// ARM64 NEON kernels with the dot-product extension (sdot, vdotq_s32: Armv8.2-A+dotprod, /proc/cpuinfo `asimddp`;
// Cortex-A55/A76 and later, Neoverse N1 and later, Apple M1 and later). The decode arithmetic of kernel_x86.h:
// a 32-input block unpacks into two int8x16 vectors in the same block order (block_order), so the activations are
// quantized exactly as for x86 SIMD; vdotq_s32 sums four int8 products per int32 lane. Weights must be signed int8:
// bits <= 4 are already (0..15); 8-bit weights take q - 128, the 128 folded into the zero point as on AVX2.
// Prefill tiles use the portable dequantization (kernel_registry.py), so there is no NEON dequant here.
#include "lowbit.h"
#if defined(__aarch64__)
// every header before the target pragma: no inline function of theirs is compiled for this ISA alone
#include <arm_neon.h>
#include <cstring>
#include <vector>
#pragma GCC target("arch=armv8.2-a+dotprod")

namespace mc_lowbit {
namespace {

struct Block {
  int8x16_t lo, hi;  // lanes 0..15 and 16..31 of the block order
};

template <int BITS> inline Block unpack(const uint8_t* p);

template <> inline Block unpack<2>(const uint8_t* p) {  // lane 8t + j <- input 4j + t
  const uint8x8_t b = vld1_u8(p), m = vdup_n_u8(3);
  return {vreinterpretq_s8_u8(vcombine_u8(vand_u8(b, m), vand_u8(vshr_n_u8(b, 2), m))),
          vreinterpretq_s8_u8(vcombine_u8(vand_u8(vshr_n_u8(b, 4), m), vshr_n_u8(b, 6)))};
}

template <> inline Block unpack<4>(const uint8_t* p) {  // lane 16h + j <- input 2j + h
  const uint8x16_t v = vld1q_u8(p);
  return {vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15))), vreinterpretq_s8_u8(vshrq_n_u8(v, 4))};
}

template <> inline Block unpack<3>(const uint8_t* p) {  // natural order, as on x86 (kernel_x86.h's unpack<3>)
  uint8_t raw[16] = {};
  std::memcpy(raw, p, 12);  // exactly the block's 12 bytes
  // input 8c + i: the byte pair (3c + 3i/8, +1) in a 16-bit lane, times 2^(13 - 3i%8), shifted down by 13
  static const uint8_t pairs[16] = {0, 1, 0, 1, 0, 1, 1, 2, 1, 2, 1, 2, 2, 3, 2, 3};
  static const uint16_t lift[8] = {8192, 1024, 128, 4096, 512, 64, 2048, 256};
  const uint8x16_t v = vld1q_u8(raw), base = vld1q_u8(pairs);
  const uint16x8_t m = vld1q_u16(lift);
  uint8x8_t words[4];
  for (int c = 0; c < 4; ++c) {
    const uint8x16_t idx = vaddq_u8(base, vdupq_n_u8(static_cast<uint8_t>(3 * c)));
    words[c] = vmovn_u16(vshrq_n_u16(vmulq_u16(vreinterpretq_u16_u8(vqtbl1q_u8(v, idx)), m), 13));
  }
  return {vreinterpretq_s8_u8(vcombine_u8(words[0], words[1])), vreinterpretq_s8_u8(vcombine_u8(words[2], words[3]))};
}

template <> inline Block unpack<8>(const uint8_t* p) {  // q - 128 as int8
  const uint8x16_t bias = vdupq_n_u8(0x80);
  return {vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p), bias)), vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p + 16), bias))};
}

inline float half_bits_to_float(uint16_t h) {
  __fp16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

template <int BITS, int MR>
void rows_kernel(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, float* y) {
  const int64_t bpg = w.group / 32, G = w.group;
  const int shift = BITS == 8 ? 128 : 0;
  const int8_t* xr[MR];
  const float* dx[MR];
  const int32_t* is[MR];
  _Pragma("GCC unroll 8")
  for (int m = 0; m < MR; ++m)
    xr[m] = a.xq + (x0 + m) * a.k, dx[m] = a.dx + (x0 + m) * a.groups, is[m] = a.isum + (x0 + m) * a.groups;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* src = w.row(e, r);
    float32x4_t facc[MR];
    float corr[MR];
    _Pragma("GCC unroll 8")
    for (int m = 0; m < MR; ++m) facc[m] = vdupq_n_f32(0.f), corr[m] = 0.f;
    for (int64_t g = 0; g < w.groups; ++g) {
      int32x4_t iacc[MR];
      _Pragma("GCC unroll 8")
      for (int m = 0; m < MR; ++m) iacc[m] = vdupq_n_s32(0);
      for (int64_t b = 0; b < bpg; ++b) {
        const Block wv = unpack<BITS>(src + (g * bpg + b) * 4 * BITS);
        _Pragma("GCC unroll 8")
        for (int m = 0; m < MR; ++m) {
          const int8_t* xp = xr[m] + g * G + 32 * b;
          iacc[m] = vdotq_s32(vdotq_s32(iacc[m], wv.lo, vld1q_s8(xp)), wv.hi, vld1q_s8(xp + 16));
        }
      }
      const int64_t gi = w.at(e, r, g);
      const float s = half_bits_to_float(w.s[gi]), sz = s * static_cast<float>(w.zero(gi) - shift);
      _Pragma("GCC unroll 8")
      for (int m = 0; m < MR; ++m) {
        facc[m] = vfmaq_n_f32(facc[m], vcvtq_f32_s32(iacc[m]), s * dx[m][g]);
        corr[m] += sz * (dx[m][g] * static_cast<float>(is[m][g]));
      }
    }
    _Pragma("GCC unroll 8")
    for (int m = 0; m < MR; ++m) y[(x0 + m) * w.n + r] = vaddvq_f32(facc[m]) - corr[m];
  }
}

template <int BITS>
void decode_bits(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, int64_t rows, float* y) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) rows_kernel<BITS, 4>(w, a, e, r0, r1, x0 + m, y);
  switch (rows - m) {
    case 3: rows_kernel<BITS, 3>(w, a, e, r0, r1, x0 + m, y); break;
    case 2: rows_kernel<BITS, 2>(w, a, e, r0, r1, x0 + m, y); break;
    case 1: rows_kernel<BITS, 1>(w, a, e, r0, r1, x0 + m, y); break;
    default: break;
  }
}

}  // namespace

void decode_neon_dotprod(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, int64_t rows,
                         float* y) {
  switch (w.bits) {
    case 2: decode_bits<2>(w, a, e, r0, r1, x0, rows, y); break;
    case 3: decode_bits<3>(w, a, e, r0, r1, x0, rows, y); break;
    case 4: decode_bits<4>(w, a, e, r0, r1, x0, rows, y); break;
    default: decode_bits<8>(w, a, e, r0, r1, x0, rows, y); break;
  }
}

}  // namespace mc_lowbit
#endif
