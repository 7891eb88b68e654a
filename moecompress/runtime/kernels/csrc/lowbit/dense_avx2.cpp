// AVX2 + FMA dense GEMV of the decode step (dense.h): float32 or bfloat16 weights, float32 x, B <= 8 rows of x
// sharing each weight row's loads (one accumulator per row of x, kept in registers by the template on B), the weights
// prefetched 2 KB ahead; the attention of one head, silu and the int8 quantization of activations (dense.h).
#include "dense.h"
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <cmath>
#pragma GCC target("avx2,fma,f16c")

namespace mc_lowbit {
namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 bfloat16 -> float32: the 16 bits become the upper half
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) {
  const uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int64_t kPrefetchBytes = 2048;  // software prefetch of the weights this far ahead, as the int8 kernels

template <int NB, typename T>
void rows(const T* w, int64_t r0, int64_t r1, int64_t k, const float* x, float* y, int64_t ldy) {
  const int64_t k16 = k / 16 * 16, k8 = k / 8 * 8;
  for (int64_t r = r0; r < r1; ++r) {
    const T* wr = w + r * k;
    __m256 acc[NB], acc2[NB];
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) acc[b] = _mm256_setzero_ps(), acc2[b] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i < k16; i += 16) {  // two independent chains per row of x
      _mm_prefetch(reinterpret_cast<const char*>(wr + i) + kPrefetchBytes, _MM_HINT_T0);  // rows are contiguous
      const __m256 a = load8(wr + i), c = load8(wr + i + 8);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) {
        acc[b] = _mm256_fmadd_ps(a, load8(x + b * k + i), acc[b]);
        acc2[b] = _mm256_fmadd_ps(c, load8(x + b * k + i + 8), acc2[b]);
      }
    }
    for (; i < k8; i += 8) {
      const __m256 a = load8(wr + i);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) acc[b] = _mm256_fmadd_ps(a, load8(x + b * k + i), acc[b]);
    }
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) {
      float s = hsum(_mm256_add_ps(acc[b], acc2[b]));
      for (int64_t j = i; j < k; ++j) s += load1(wr + j) * x[b * k + j];
      y[b * ldy + r] = s;
    }
  }
}

template <typename T>
void dispatch(const T* w, int64_t r0, int64_t r1, int64_t k, const float* x, int64_t B, float* y, int64_t ldy) {
  for (int64_t b0 = 0; b0 < B; b0 += 8) {  // B <= 8 in the step; larger B in chunks of 8
    const int64_t nb = B - b0 < 8 ? B - b0 : 8;
    const float* xb = x + b0 * k;
    float* yb = y + b0 * ldy;
    switch (nb) {
      case 1: rows<1>(w, r0, r1, k, xb, yb, ldy); break;
      case 2: rows<2>(w, r0, r1, k, xb, yb, ldy); break;
      case 3: rows<3>(w, r0, r1, k, xb, yb, ldy); break;
      case 4: rows<4>(w, r0, r1, k, xb, yb, ldy); break;
      case 5: rows<5>(w, r0, r1, k, xb, yb, ldy); break;
      case 6: rows<6>(w, r0, r1, k, xb, yb, ldy); break;
      case 7: rows<7>(w, r0, r1, k, xb, yb, ldy); break;
      default: rows<8>(w, r0, r1, k, xb, yb, ldy); break;
    }
  }
}

// exp(x) for 8 floats: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, degree-5 polynomial, * 2^n); x clamped to
// [-87.3, 88.3] (2^n stays finite; results below ~1e-38 come out ~1e-38, not 0: callers that need 0 mask it).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float exp1(float x) {
  float out[8];
  _mm256_storeu_ps(out, exp8(_mm256_set1_ps(x)));
  return out[0];
}

// The output of one chunk of C * 8 dims: sum_j e[j] * v[j, d0 ..], accumulators in registers.
template <int C>
void weighted_rows(const float* e, const float* v, int64_t n, int64_t D, int64_t d0, float inv, float* out) {
  __m256 acc[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 ej = _mm256_set1_ps(e[j]);
    const float* vj = v + j * D + d0;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(ej, _mm256_loadu_ps(vj + 8 * c), acc[c]);
  }
  const __m256 iv = _mm256_set1_ps(inv);
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + d0 + 8 * c, _mm256_mul_ps(acc[c], iv));
}

}  // namespace

void attend_avx2(const float* q, const float* k, const float* v, const uint8_t* mask, int64_t n, int64_t D,
                 float scaling, float* p, float* out) {
  // scores, four positions at a time (hadd folds their four sums into one vector)
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + (j + i) * D + d), a[i]);
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(p + j, _mm_mul_ps(s, _mm_set1_ps(scaling)));
  }
  for (; j < n; ++j) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + j * D + d), a);
    p[j] = hsum(a) * scaling;
  }
  float mx = -INFINITY;
  for (j = 0; j < n; ++j)
    if (mask[j]) mx = p[j] > mx ? p[j] : mx;
  // p <- exp(p - max), 0 where masked; their sum
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 sv = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m128i m8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask + j));
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(m8), _mm256_setzero_si256()));
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv)), keep);
    _mm256_storeu_ps(p + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = hsum(sv);
  for (; j < n; ++j) {
    p[j] = mask[j] ? exp1(p[j] - mx) : 0.f;
    sum += p[j];
  }
  const float inv = 1.f / sum;
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) weighted_rows<8>(p, v, n, D, d0, inv, out);
  switch ((D - d0) / 8) {
    case 1: weighted_rows<1>(p, v, n, D, d0, inv, out); break;
    case 2: weighted_rows<2>(p, v, n, D, d0, inv, out); break;
    case 3: weighted_rows<3>(p, v, n, D, d0, inv, out); break;
    case 4: weighted_rows<4>(p, v, n, D, d0, inv, out); break;
    case 5: weighted_rows<5>(p, v, n, D, d0, inv, out); break;
    case 6: weighted_rows<6>(p, v, n, D, d0, inv, out); break;
    case 7: weighted_rows<7>(p, v, n, D, d0, inv, out); break;
    default: break;
  }
}

void silu_mul_avx2(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) out[i] = g[i] / (1.f + exp1(-g[i])) * u[i];
}

float quantize_group_avx2(const float* src, int64_t group, const int* order, int8_t* dst, int32_t* isum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mv = _mm256_setzero_ps();
  for (int64_t i = 0; i < group; i += 8) mv = _mm256_max_ps(mv, _mm256_and_ps(_mm256_loadu_ps(src + i), abs_mask));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
  const __m256i unshuffle = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // packs' lane interleaving undone
  __m256i sum = _mm256_setzero_si256();
  alignas(32) int8_t natural[32];
  for (int64_t b = 0; b < group; b += 32) {
    __m256i v[4];
    for (int i = 0; i < 4; ++i) {  // round half to even (the default rounding mode, as std::nearbyint), clamp
      const __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + b + 8 * i), inv));
      v[i] = _mm256_max_epi32(lo, _mm256_min_epi32(hi, r));
      sum = _mm256_add_epi32(sum, v[i]);
    }
    const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_store_si256(reinterpret_cast<__m256i*>(natural), _mm256_permutevar8x32_epi32(w, unshuffle));
    for (int i = 0; i < 32; ++i) dst[b + order[i]] = natural[i];
  }
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
  *isum = _mm_cvtsi128_si32(s4);
  return amax / 127.f;
}

void gemv_f32_avx2(const float* w, int64_t r0, int64_t r1, int64_t k, const float* x, int64_t B, float* y,
                   int64_t ldy) {
  dispatch(w, r0, r1, k, x, B, y, ldy);
}
void gemv_bf16_avx2(const uint16_t* w, int64_t r0, int64_t r1, int64_t k, const float* x, int64_t B, float* y,
                    int64_t ldy) {
  dispatch(w, r0, r1, k, x, B, y, ldy);
}

}  // namespace mc_lowbit
#endif
