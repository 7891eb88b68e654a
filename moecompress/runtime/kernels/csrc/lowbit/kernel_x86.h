// The x86 SIMD kernels, compiled once per ISA: included by isa_avx2.cpp (AVX2 + FMA + F16C) and isa_avx512_vnni.cpp
// (the same plus AVX-512 VL/VNNI: vpdpbusd on 256-bit vectors) after their target pragma, with MC_VNNI 0 or 1.
// Everything here has internal linkage, so that the two compilations never stand in for each other at link time.
//
// Per block of 32 inputs: unpack the weights into 32 uint8 lanes (a few shifts and masks, see block_order), then
//   AVX2:  vpmaddubsw (uint8 weights x int8 activations -> int16 pairs; bits <= 4 sum up to 8 blocks in int16),
//          vpmaddwd with ones -> int32. 8-bit weights go through the sign trick on q - 128 (|q - 128| <= 128 keeps
//          the int16 pair sums below 2^15), the 128 folded into the zero point.
//   VNNI:  vpdpbusd: uint8 x int8, four products summed straight into int32 (no saturation for any bit-width).
// Per group: its int32 sum times s * dx into a float32 accumulator; per output the zero-point term
// sum_g s * z * dx * sum(xq) (computed 8 groups at a time) is subtracted.
#pragma once
#include <immintrin.h>
#include <cstring>
#include <vector>
#include "lowbit.h"

#ifndef MC_VNNI
#error "define MC_VNNI before including kernel_x86.h"
#endif

// Fully unrolled loops over the NR x MR accumulators: they must live in registers (a rolled loop keeps them in
// memory, and every block then waits on a store-to-load round trip).
#define MC_UNROLL _Pragma("GCC unroll 16")


namespace mc_lowbit {
namespace {

constexpr int64_t kPrefetchBytes = 2048;
constexpr int64_t kStackFloats = 3072;  // rows_kernel's factors (and permuted x) on the stack up to this size

inline uint64_t load_u64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return v; }
inline uint32_t load_u32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }

// 32 weights (4 * BITS bytes) -> 32 uint8 lanes in block_order.
template <int BITS> inline __m256i unpack(const uint8_t* p);

template <> inline __m256i unpack<2>(const uint8_t* p) {  // lane 8t + j <- input 4j + t: qword t shifted by 2t
  const __m256i v = _mm256_srlv_epi64(_mm256_set1_epi64x(static_cast<long long>(load_u64(p))), _mm256_set_epi64x(6, 4, 2, 0));
  return _mm256_and_si256(v, _mm256_set1_epi8(3));
}

template <> inline __m256i unpack<4>(const uint8_t* p) {  // lane 16h + j <- input 2j + h: low nibbles, then high ones
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(15));
}

template <> inline __m256i unpack<3>(const uint8_t* p) {
  // natural order: lane i <- input i. Four 24-bit words of 8 inputs; input 8c + i sits at bits 3i .. 3i+2 of word c,
  // inside the byte pair (3c + 3i/8, +1). pshufb puts each input's byte pair in a 16-bit lane (a: inputs 16h .. +7,
  // b: 16h + 8 .. +15 in half h), a multiply by 2^(13 - 3i%8) moves its bits to 13..15, a shift by 13 brings them
  // down, and packus interleaves a and b back into input order. Reads exactly the 12 bytes.
  __m128i raw = _mm_cvtsi64_si128(static_cast<long long>(load_u64(p)));
  raw = _mm_insert_epi32(raw, static_cast<int>(load_u32(p + 8)), 2);
  const __m256i bytes = _mm256_broadcastsi128_si256(raw);
  const __m256i pairs_a = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 1, 2, 1, 2, 1, 2, 2, 3, 2, 3,
                                           6, 7, 6, 7, 6, 7, 7, 8, 7, 8, 7, 8, 8, 9, 8, 9);
  const __m256i pairs_b = _mm256_setr_epi8(3, 4, 3, 4, 3, 4, 4, 5, 4, 5, 4, 5, 5, 6, 5, 6,
                                           9, 10, 9, 10, 9, 10, 10, 11, 10, 11, 10, 11, 11, 12, 11, 12);
  const __m256i lift = _mm256_setr_epi16(8192, 1024, 128, 4096, 512, 64, 2048, 256,
                                         8192, 1024, 128, 4096, 512, 64, 2048, 256);
  const __m256i a = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(bytes, pairs_a), lift), 13);
  const __m256i b = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(bytes, pairs_b), lift), 13);
  return _mm256_packus_epi16(a, b);
}

// 3-bit weights two blocks (24 bytes) at a time, for the AVX2 kernel (rows_kernel with an even number of blocks per
// group): fewer shuffle-port operations than unpack<3> (which is bound by them: 2 pshufb + 2 shifts + a pack + the
// loads' inserts per block). Block A sits in the low 128-bit lane (bytes 0..11), block B in the high one (bytes
// 4..15: no byte past the pair is read). Vector t's 16-bit lane l holds, per half, the value j = 8t + l in its low
// byte (pshufb a byte pair, (pair >> p) by pmulhuw with 2^(16 - p), p in 1..8) and j = 16 + 8t + l in its high byte
// (pair << (8 - p) by pmullw), blended, masked to 3 bits. x's int8 inputs are permuted to match (permute3).
inline void unpack3_pair(const uint8_t* p, __m256i& v0, __m256i& v1) {
  const __m256i bytes = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)), 1);
  const __m256i lo0 = _mm256_setr_epi8(-128, 0, 0, 1, 0, 1, 1, 2, 1, 2, 1, 2, 2, 3, 2, 3,
                                       -128, 4, 4, 5, 4, 5, 5, 6, 5, 6, 5, 6, 6, 7, 6, 7);
  const __m256i hi0 = _mm256_setr_epi8(6, 7, 6, 7, 6, 7, 7, 8, 7, 8, 7, 8, 8, 9, 8, 9,
                                       10, 11, 10, 11, 10, 11, 11, 12, 11, 12, 11, 12, 12, 13, 12, 13);
  const __m256i lo1 = _mm256_setr_epi8(2, 3, 3, 4, 3, 4, 4, 5, 4, 5, 4, 5, 5, 6, 5, 6,
                                       6, 7, 7, 8, 7, 8, 8, 9, 8, 9, 8, 9, 9, 10, 9, 10);
  const __m256i hi1 = _mm256_setr_epi8(9, 10, 9, 10, 9, 10, 10, 11, 10, 11, 10, 11, 11, -128, 11, -128,
                                       13, 14, 13, 14, 13, 14, 14, 15, 14, 15, 14, 15, 15, -128, 15, -128);
  const __m256i down = _mm256_setr_epi16(256, 8192, 1024, -32768, 4096, 512, 16384, 2048,
                                         256, 8192, 1024, -32768, 4096, 512, 16384, 2048);
  const __m256i up = _mm256_setr_epi16(256, 32, 4, 128, 16, 2, 64, 8, 256, 32, 4, 128, 16, 2, 64, 8);
  const __m256i high = _mm256_set1_epi16(static_cast<short>(0xFF00)), three = _mm256_set1_epi8(7);
  v0 = _mm256_and_si256(_mm256_blendv_epi8(_mm256_mulhi_epu16(_mm256_shuffle_epi8(bytes, lo0), down),
                                           _mm256_mullo_epi16(_mm256_shuffle_epi8(bytes, hi0), up), high), three);
  v1 = _mm256_and_si256(_mm256_blendv_epi8(_mm256_mulhi_epu16(_mm256_shuffle_epi8(bytes, lo1), down),
                                           _mm256_mullo_epi16(_mm256_shuffle_epi8(bytes, hi1), up), high), three);
}

// x's int8 row (k inputs, natural order, k % 64 == 0) in unpack3_pair's order: per 64 inputs (blocks A, B), vector t's
// half h holds inputs 32h + 8t + l (even bytes) and 32h + 16 + 8t + l (odd bytes), l = 0..7.
inline void permute3(const int8_t* x, int64_t k, int8_t* out) {
  for (int64_t c = 0; c < k; c += 64)
    for (int t = 0; t < 2; ++t)
      for (int h = 0; h < 2; ++h) {
        const __m128i a = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x + c + 32 * h + 8 * t));
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x + c + 32 * h + 16 + 8 * t));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c + 32 * t + 16 * h), _mm_unpacklo_epi8(a, b));
      }
}

template <> inline __m256i unpack<8>(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The zero point used with the int32 sums: the AVX2 8-bit path computes with q - 128.
template <int BITS> constexpr int zero_shift() { return (BITS == 8 && !MC_VNNI) ? 128 : 0; }

// Per weight row, its groups' float factors, 8 groups at a time (tail scalar): sd[m][g] = s * dx[m][g], the factor
// of group g's int32 sum, and the zero-point term sum_g s * z * dx * isum, subtracted once per output.
template <int BITS, int MR>
inline void row_factors(const Weights& w, int64_t e, int64_t r, const float* const* dx, const float* const* xs,
                        float* const* sd, float* corr) {
  const int64_t base = w.at(e, r, 0);
  const float shift = static_cast<float>(zero_shift<BITS>());
  __m256 cv[MR];
  for (int m = 0; m < MR; ++m) cv[m] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= w.groups; g += 8) {
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.s + base + g)));
    const __m256 z = w.z ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.z + base + g))))
                         : _mm256_set1_ps(static_cast<float>(1 << (BITS - 1)));
    const __m256 sz = _mm256_mul_ps(s, _mm256_sub_ps(z, _mm256_set1_ps(shift)));
    for (int m = 0; m < MR; ++m) {
      _mm256_storeu_ps(sd[m] + g, _mm256_mul_ps(s, _mm256_loadu_ps(dx[m] + g)));
      cv[m] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xs[m] + g), cv[m]);
    }
  }
  for (int m = 0; m < MR; ++m) corr[m] = hsum(cv[m]);
  if (g + 4 <= w.groups) {  // 4 more groups at once (small in_features: k = 256 at group 64 has 4 in all)
    const __m128 s = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.s + base + g)));
    int32_t z4;
    if (w.z) std::memcpy(&z4, w.z + base + g, 4);
    const __m128 z = w.z ? _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(z4))) : _mm_set1_ps(static_cast<float>(1 << (BITS - 1)));
    const __m128 sz = _mm_mul_ps(s, _mm_sub_ps(z, _mm_set1_ps(shift)));
    for (int m = 0; m < MR; ++m) {
      _mm_storeu_ps(sd[m] + g, _mm_mul_ps(s, _mm_loadu_ps(dx[m] + g)));
      __m128 c = _mm_mul_ps(sz, _mm_loadu_ps(xs[m] + g));
      c = _mm_add_ps(c, _mm_movehl_ps(c, c));
      c = _mm_add_ss(c, _mm_movehdup_ps(c));
      corr[m] += _mm_cvtss_f32(c);
    }
    g += 4;
  }
  if (g + 2 <= w.groups) {  // 2 more (k = 768 at group 128: 4 + 2 groups): the 4-wide path with two lanes
    const __m128 s = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(load_u32(reinterpret_cast<const uint8_t*>(w.s + base + g)))));
    uint16_t z2 = 0;
    if (w.z) std::memcpy(&z2, w.z + base + g, 2);
    const __m128 z = w.z ? _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(z2))) : _mm_set1_ps(static_cast<float>(1 << (BITS - 1)));
    const __m128 sz = _mm_mul_ps(s, _mm_sub_ps(z, _mm_set1_ps(shift)));
    for (int m = 0; m < MR; ++m) {
      const __m128 d = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(dx[m] + g)));
      const __m128 x = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(xs[m] + g)));
      _mm_store_sd(reinterpret_cast<double*>(sd[m] + g), _mm_castps_pd(_mm_mul_ps(s, d)));
      const __m128 c = _mm_mul_ps(sz, x);
      corr[m] += _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
    }
    g += 2;
  }
  for (; g < w.groups; ++g) {
    const float s = _cvtsh_ss(w.s[base + g]), sz = s * (static_cast<float>(w.zero(base + g)) - shift);
    for (int m = 0; m < MR; ++m) sd[m][g] = s * dx[m][g], corr[m] += sz * xs[m][g];
  }
}

// MR rows of x (x0 ..) against weight rows r0 .. r1 of expert e, NR weight rows at a time ((r1 - r0) % NR == 0):
// each activation block is loaded once for NR rows, each unpacked weight block used for MR rows, and the NR * MR
// accumulators are independent chains.
// BPG: blocks per group when known at compile time (group 64: 2, group 128: 4; 0: read from w), so that the loops
// over a group's blocks have a constant trip count.
template <int BITS, int MR, int NR, int BPG>
void rows_kernel(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, float* y) {
  const int64_t bpg = BPG ? BPG : w.group / 32, G = 32 * bpg;
  // 3-bit on AVX2 with an even number of blocks per group: two blocks per unpack, x's rows permuted to match
  constexpr bool kPair3 = BITS == 3 && !MC_VNNI && BPG > 0 && BPG % 2 == 0;
  const int8_t* xr[MR];
  const float* dx[MR];
  // xs[m] = dx * isum per group; sd[j][m] per weight row (+ kPair3: x's permuted rows): on the stack when small (no
  // allocation per call)
  const int64_t xfloats = kPair3 ? (MR * a.k + 3) / 4 : 0, need = (1 + NR) * MR * w.groups + xfloats;
  float stack_buf[kStackFloats];
  std::vector<float> heap_buf(need > kStackFloats ? need : 0);
  float* const buf_p = need > kStackFloats ? heap_buf.data() : stack_buf;
  float* xs[MR];
  float* sd[NR][MR];
  MC_UNROLL
  for (int m = 0; m < MR; ++m) {
    xr[m] = a.xq + (x0 + m) * a.k, dx[m] = a.dx + (x0 + m) * a.groups, xs[m] = buf_p + xfloats + m * w.groups;
    if constexpr (kPair3) {
      int8_t* const xp = reinterpret_cast<int8_t*>(buf_p) + m * a.k;
      permute3(xr[m], a.k, xp);
      xr[m] = xp;
    }
    MC_UNROLL
    for (int j = 0; j < NR; ++j) sd[j][m] = buf_p + xfloats + ((1 + j) * MR + m) * w.groups;
    const int32_t* is = a.isum + (x0 + m) * a.groups;
    for (int64_t g = 0; g < w.groups; ++g) xs[m][g] = dx[m][g] * static_cast<float>(is[g]);
  }
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t r = r0; r < r1; r += NR) {
    const uint8_t* src[NR];
    float corr[NR][MR];
    __m256 facc[NR][MR];
    MC_UNROLL
    for (int j = 0; j < NR; ++j) {
      src[j] = w.row(e, r + j);
      row_factors<BITS, MR>(w, e, r + j, dx, xs, sd[j], corr[j]);
      MC_UNROLL
      for (int m = 0; m < MR; ++m) facc[j][m] = _mm256_setzero_ps();
    }
    // Software prefetch of the weight bytes kPrefetchBytes ahead (whole passes of NR rows; an expert's rows are
    // contiguous), a group's share per group: with the hardware prefetchers alone one thread streamed the weights
    // at 3-4 GB/s on a Zen 3 EPYC, with this at 7-10 GB/s (1 KB-2 KB ahead measured best, none 1.5-2.6x slower).
    const int64_t pass = NR * w.row_bytes, dist = (kPrefetchBytes + pass - 1) / pass * pass;
    const uint8_t* pf = src[0] + dist;
    const int64_t pf_step = NR * G * BITS / 8;
    for (int64_t g = 0; g < w.groups; ++g) {
      for (int64_t off = 0; off < pf_step; off += 64) _mm_prefetch(reinterpret_cast<const char*>(pf + g * pf_step + off), _MM_HINT_T0);
      __m256i iacc[NR][MR];
      MC_UNROLL
      for (int j = 0; j < NR; ++j)
        MC_UNROLL
        for (int m = 0; m < MR; ++m) iacc[j][m] = _mm256_setzero_si256();
#if MC_VNNI
      for (int64_t b = 0; b < bpg; ++b) {
        __m256i xv[MR];
        MC_UNROLL
        for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[m] + g * G + 32 * b));
        MC_UNROLL
        for (int j = 0; j < NR; ++j) {
          const __m256i wv = unpack<BITS>(src[j] + (g * bpg + b) * 4 * BITS);
          MC_UNROLL
          for (int m = 0; m < MR; ++m) iacc[j][m] = _mm256_dpbusd_epi32(iacc[j][m], wv, xv[m]);
        }
      }
#else
      if constexpr (BITS == 8) {
        for (int64_t b = 0; b < bpg; ++b) {
          __m256i xv[MR];
          MC_UNROLL
          for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[m] + g * G + 32 * b));
          MC_UNROLL
          for (int j = 0; j < NR; ++j) {
            const __m256i ws = _mm256_xor_si256(unpack<8>(src[j] + (g * bpg + b) * 32), _mm256_set1_epi8(-128));  // q - 128
            const __m256i aw = _mm256_sign_epi8(ws, ws);  // |q - 128| as uint8 (128 stays 0x80 = 128)
            MC_UNROLL
            for (int m = 0; m < MR; ++m)
              iacc[j][m] = _mm256_add_epi32(iacc[j][m], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[m], ws)), ones));
          }
        }
      } else {
        for (int64_t b0 = 0; b0 < bpg; b0 += 8) {  // int16 pair sums <= 2 * 15 * 127 each: 8 blocks stay below 2^15
          __m256i acc16[NR][MR];
          MC_UNROLL
          for (int j = 0; j < NR; ++j)
            MC_UNROLL
            for (int m = 0; m < MR; ++m) acc16[j][m] = _mm256_setzero_si256();
          const int64_t b1 = b0 + 8 < bpg ? b0 + 8 : bpg;
          if constexpr (kPair3) {
            for (int64_t b = b0; b < b1; b += 2) {
              __m256i xv0[MR], xv1[MR];
              MC_UNROLL
              for (int m = 0; m < MR; ++m) {
                xv0[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[m] + g * G + 32 * b));
                xv1[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[m] + g * G + 32 * b + 32));
              }
              MC_UNROLL
              for (int j = 0; j < NR; ++j) {
                __m256i v0, v1;
                unpack3_pair(src[j] + (g * bpg + b) * 12, v0, v1);
                MC_UNROLL
                for (int m = 0; m < MR; ++m)
                  acc16[j][m] = _mm256_add_epi16(acc16[j][m], _mm256_add_epi16(_mm256_maddubs_epi16(v0, xv0[m]),
                                                                               _mm256_maddubs_epi16(v1, xv1[m])));
              }
            }
          } else {
            for (int64_t b = b0; b < b1; ++b) {
              __m256i xv[MR];
              MC_UNROLL
              for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[m] + g * G + 32 * b));
              MC_UNROLL
              for (int j = 0; j < NR; ++j) {
                const __m256i wv = unpack<BITS>(src[j] + (g * bpg + b) * 4 * BITS);
                MC_UNROLL
                for (int m = 0; m < MR; ++m) acc16[j][m] = _mm256_add_epi16(acc16[j][m], _mm256_maddubs_epi16(wv, xv[m]));
              }
            }
          }
          MC_UNROLL
          for (int j = 0; j < NR; ++j)
            MC_UNROLL
            for (int m = 0; m < MR; ++m) iacc[j][m] = _mm256_add_epi32(iacc[j][m], _mm256_madd_epi16(acc16[j][m], ones));
        }
      }
#endif
      MC_UNROLL
      for (int j = 0; j < NR; ++j)
        MC_UNROLL
        for (int m = 0; m < MR; ++m)
          facc[j][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[j][m]), _mm256_broadcast_ss(sd[j][m] + g), facc[j][m]);
    }
    MC_UNROLL
    for (int j = 0; j < NR; ++j)
      MC_UNROLL
      for (int m = 0; m < MR; ++m) y[(x0 + m) * w.n + r + j] = hsum(facc[j][m]) - corr[j][m];
  }
}

// NR weight rows at a time where the accumulators fit the registers (NR * MR <= 4 with AVX2's 16, <= 8 with
// AVX-512's 32), the last rows one by one.
template <int BITS, int MR, int BPG>
void rows_group(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, float* y) {
  constexpr int NR = MC_VNNI ? (MR <= 2 ? 4 : 2) : (MR <= 2 ? 2 : 1);
  const int64_t split = r0 + (r1 - r0) / NR * NR;
  rows_kernel<BITS, MR, NR, BPG>(w, a, e, r0, split, x0, y);
  if (split < r1) rows_kernel<BITS, MR, 1, BPG>(w, a, e, split, r1, x0, y);
}

template <int BITS, int MR>
void rows_any(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, float* y) {
  switch (w.group) {  // the common group sizes with constant loop counts, others as read
    case 64: rows_group<BITS, MR, 2>(w, a, e, r0, r1, x0, y); break;
    case 128: rows_group<BITS, MR, 4>(w, a, e, r0, r1, x0, y); break;
    default: rows_group<BITS, MR, 0>(w, a, e, r0, r1, x0, y); break;
  }
}

template <int BITS>
void decode_bits(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, int64_t rows, float* y) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) rows_any<BITS, 4>(w, a, e, r0, r1, x0 + m, y);
  switch (rows - m) {
    case 3: rows_any<BITS, 3>(w, a, e, r0, r1, x0 + m, y); break;
    case 2: rows_any<BITS, 2>(w, a, e, r0, r1, x0 + m, y); break;
    case 1: rows_any<BITS, 1>(w, a, e, r0, r1, x0 + m, y); break;
    default: break;
  }
}

void decode_any(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, int64_t rows, float* y) {
  switch (w.bits) {
    case 2: decode_bits<2>(w, a, e, r0, r1, x0, rows, y); break;
    case 3: decode_bits<3>(w, a, e, r0, r1, x0, rows, y); break;
    case 4: decode_bits<4>(w, a, e, r0, r1, x0, rows, y); break;
    default: decode_bits<8>(w, a, e, r0, r1, x0, rows, y); break;
  }
}

// (q - z) * s of rows r0 .. r1 in block order: 8 lanes at a time, uint8 -> int32 -> float, exact.
template <int BITS>
void dequant_bits(const Weights& w, int64_t e, int64_t r0, int64_t r1, float* tile) {
  const int64_t bpg = w.group / 32;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* src = w.row(e, r);
    float* dst = tile + (r - r0) * w.k;
    for (int64_t g = 0; g < w.groups; ++g) {
      const int64_t gi = w.at(e, r, g);
      const __m256 s = _mm256_set1_ps(_cvtsh_ss(w.s[gi]));
      const __m256 z = _mm256_set1_ps(static_cast<float>(w.zero(gi)));
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
        const __m256i v = unpack<BITS>(src + b * 4 * BITS);
        const __m128i half[2] = {_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)};
        for (int j = 0; j < 4; ++j) {
          const __m128i eight = (j & 1) ? _mm_unpackhi_epi64(half[j / 2], half[j / 2]) : half[j / 2];
          const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight));
          _mm256_storeu_ps(dst + 32 * b + 8 * j, _mm256_mul_ps(_mm256_sub_ps(q, z), s));
        }
      }
    }
  }
}

void dequant_any(const Weights& w, int64_t e, int64_t r0, int64_t r1, float* tile) {
  switch (w.bits) {
    case 2: dequant_bits<2>(w, e, r0, r1, tile); break;
    case 3: dequant_bits<3>(w, e, r0, r1, tile); break;
    case 4: dequant_bits<4>(w, e, r0, r1, tile); break;
    default: dequant_bits<8>(w, e, r0, r1, tile); break;
  }
}

}  // namespace
}  // namespace mc_lowbit
