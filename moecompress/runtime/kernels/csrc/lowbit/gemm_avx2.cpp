// The AVX2 prefill GEMM (gemm.h): 8 weight rows x up to 4 x rows per register block.
#include "gemm.h"
#if defined(__x86_64__) || defined(_M_X64)
// every header before the target pragma: no inline function of theirs is compiled for this ISA alone
#include <immintrin.h>
#include <cstring>
#include <vector>
#pragma GCC target("avx2,fma,f16c")
#define MC_VNNI 0
#include "kernel_x86.h"  // unpack<BITS>, zero_shift<BITS> (internal linkage: compiled here for AVX2 again)

namespace mc_lowbit {
namespace {

#include "transpose_x86.h"

// Weight rows r .. r + 8 of expert e -> wp[b * 8 + q]: lanes 4q .. 4q + 3 of block b of the 8 rows (8-bit: q - 128);
// fac[g * 16 + i] = s of row i, fac[g * 16 + 8 + i] = s * (z - shift) of row i, group g.
template <int BITS>
void pack8(const Weights& w, int64_t e, int64_t r, __m256i* wp, float* fac) {
  const int64_t blocks = w.k / 32;
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i v[8];
    for (int i = 0; i < 8; ++i) {
      v[i] = unpack<BITS>(w.row(e, r + i) + b * 4 * BITS);
      if (BITS == 8) v[i] = _mm256_xor_si256(v[i], _mm256_set1_epi8(-128));
    }
    transpose8(v);
    for (int q = 0; q < 8; ++q) _mm256_storeu_si256(wp + b * 8 + q, v[q]);
  }
  const float shift = static_cast<float>(zero_shift<BITS>());
  for (int64_t g = 0; g < w.groups; ++g)
    for (int i = 0; i < 8; ++i) {
      const int64_t gi = w.at(e, r + i, g);
      const float s = _cvtsh_ss(w.s[gi]);
      fac[g * 16 + i] = s;
      fac[g * 16 + 8 + i] = s * (static_cast<float>(w.zero(gi)) - shift);
    }
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// 8 packed weight rows against TB x rows (xr[t]: int8 in block order; dx, xs = dx * isum per group) -> y[t][0 .. 8).
template <int BITS, int TB>
inline void tile(const __m256i* wp, const float* fac, int64_t groups, int64_t bpg, const int8_t* const* xr,
                 const float* const* dx, const float* const* xs, float* const* y) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 facc[TB];
  MC_UNROLL
  for (int t = 0; t < TB; ++t) facc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[TB];
    MC_UNROLL
    for (int t = 0; t < TB; ++t) acc[t] = _mm256_setzero_si256();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const __m256i* wb = wp + b * 8;
      if constexpr (BITS == 8) {  // sign trick as kernel_x86.h: |q - 128| x sign-adjusted x, int32 per quad
        MC_UNROLL
        for (int q = 0; q < 8; ++q) {
          const __m256i ws = _mm256_loadu_si256(wb + q), aw = _mm256_sign_epi8(ws, ws);
          MC_UNROLL
          for (int t = 0; t < TB; ++t)
            acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast4(xr[t] + 32 * b + 4 * q), ws)), ones));
        }
      } else {  // int16 lanes gather one pair per quad: 8 pairs <= 8 * 2 * 15 * 127 < 2^15
        __m256i a16[TB];
        MC_UNROLL
        for (int t = 0; t < TB; ++t) a16[t] = _mm256_setzero_si256();
        MC_UNROLL
        for (int q = 0; q < 8; ++q) {
          const __m256i wv = _mm256_loadu_si256(wb + q);
          MC_UNROLL
          for (int t = 0; t < TB; ++t) a16[t] = _mm256_add_epi16(a16[t], _mm256_maddubs_epi16(wv, bcast4(xr[t] + 32 * b + 4 * q)));
        }
        MC_UNROLL
        for (int t = 0; t < TB; ++t) acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(a16[t], ones));
      }
    }
    const __m256 s = _mm256_loadu_ps(fac + g * 16), sz = _mm256_loadu_ps(fac + g * 16 + 8);
    MC_UNROLL
    for (int t = 0; t < TB; ++t) {
      facc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), _mm256_mul_ps(s, _mm256_set1_ps(dx[t][g])), facc[t]);
      facc[t] = _mm256_fnmadd_ps(sz, _mm256_set1_ps(xs[t][g]), facc[t]);
    }
  }
  MC_UNROLL
  for (int t = 0; t < TB; ++t) _mm256_storeu_ps(y[t], facc[t]);
}

template <int BITS, int TB>
void tiles(const Weights& w, const Acts& a, const __m256i* wp, const float* fac, int64_t nv, int64_t r0, int64_t x0,
           const float* xs_all, float* y) {
  const int64_t bpg = w.group / 32, blocks = w.k / 32;
  const int8_t* xr[TB];
  const float* dx[TB];
  const float* xs[TB];
  for (int t = 0; t < TB; ++t)
    xr[t] = a.xq + (x0 + t) * a.k, dx[t] = a.dx + (x0 + t) * a.groups, xs[t] = xs_all + t * a.groups;
  float* yo[TB];
  for (int64_t v = 0; v < nv; ++v) {
    for (int t = 0; t < TB; ++t) yo[t] = y + (x0 + t) * w.n + r0 + 8 * v;
    tile<BITS, TB>(wp + v * blocks * 8, fac + v * w.groups * 16, w.groups, bpg, xr, dx, xs, yo);
  }
}

template <int BITS>
void gemm_bits(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t nv, int64_t x0, int64_t rows, float* y) {
  thread_local std::vector<int64_t> wbuf;  // the packed rows, 32 bytes per vector
  thread_local std::vector<float> fac, xs;
  const int64_t blocks = w.k / 32;
  wbuf.resize(nv * blocks * 8 * 4);
  __m256i* const wp = reinterpret_cast<__m256i*>(wbuf.data());
  fac.resize(nv * w.groups * 16);
  xs.resize(rows * w.groups);
  for (int64_t v = 0; v < nv; ++v) pack8<BITS>(w, e, r0 + 8 * v, wp + v * blocks * 8, fac.data() + v * w.groups * 16);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < w.groups; ++g)
      xs[m * w.groups + g] = a.dx[(x0 + m) * a.groups + g] * static_cast<float>(a.isum[(x0 + m) * a.groups + g]);
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) tiles<BITS, 4>(w, a, wp, fac.data(), nv, r0, x0 + m, xs.data() + m * w.groups, y);
  const float* xt = xs.data() + m * w.groups;
  switch (rows - m) {
    case 3: tiles<BITS, 3>(w, a, wp, fac.data(), nv, r0, x0 + m, xt, y); break;
    case 2: tiles<BITS, 2>(w, a, wp, fac.data(), nv, r0, x0 + m, xt, y); break;
    case 1: tiles<BITS, 1>(w, a, wp, fac.data(), nv, r0, x0 + m, xt, y); break;
    default: break;
  }
}

}  // namespace

void gemm_avx2(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, int64_t rows, float* y) {
  const int64_t nv = (r1 - r0) / 8, split = r0 + 8 * nv;
  switch (w.bits) {
    case 2: gemm_bits<2>(w, a, e, r0, nv, x0, rows, y); break;
    case 3: gemm_bits<3>(w, a, e, r0, nv, x0, rows, y); break;
    case 4: gemm_bits<4>(w, a, e, r0, nv, x0, rows, y); break;
    default: gemm_bits<8>(w, a, e, r0, nv, x0, rows, y); break;
  }
  if (split < r1) decode_avx2(w, a, e, split, r1, x0, rows, y);
}

}  // namespace mc_lowbit
#endif
