// AVX2 + FMA dense GEMV of the decode step (dense.h): float32 or bfloat16 weights, float32 x, B <= 8 rows of x
// sharing each weight row's loads (one accumulator per row of x, kept in registers by the template on B).
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

}  // namespace

void attend_avx2(const float* q, const float* k, const float* v, const uint8_t* mask, int64_t n, int64_t D,
                 float scaling, float* p, float* out) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    if (!mask[j]) continue;
    const float* kj = k + j * D;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kj + d), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), _mm256_loadu_ps(kj + d + 8), a1);
    }
    for (; d < D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kj + d), a0);
    p[j] = hsum(_mm256_add_ps(a0, a1)) * scaling;
    mx = p[j] > mx ? p[j] : mx;
  }
  for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(out + d, _mm256_setzero_ps());
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    if (!mask[j]) continue;
    const float e = std::exp(p[j] - mx);
    sum += e;
    const __m256 ev = _mm256_set1_ps(e);
    const float* vj = v + j * D;
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(out + d, _mm256_fmadd_ps(ev, _mm256_loadu_ps(vj + d), _mm256_loadu_ps(out + d)));
  }
  const __m256 inv = _mm256_set1_ps(1.f / sum);
  for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_loadu_ps(out + d), inv));
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
