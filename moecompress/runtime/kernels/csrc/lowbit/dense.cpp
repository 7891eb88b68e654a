// Portable dense GEMV of the decode step (dense.h), and the AVX2 entry points' stand-ins off x86 (never called there:
// the callers pass simd = false).
#include <cmath>
#include <cstring>
#include "dense.h"

namespace mc_lowbit {

float bf16_value(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void gemv_f32_portable(const float* w, int64_t r0, int64_t r1, int64_t k, const float* x, int64_t B, float* y,
                       int64_t ldy) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < B; ++b) {
      float s = 0.f;
      for (int64_t i = 0; i < k; ++i) s += w[r * k + i] * x[b * k + i];
      y[b * ldy + r] = s;
    }
}

void gemv_bf16_portable(const uint16_t* w, int64_t r0, int64_t r1, int64_t k, const float* x, int64_t B, float* y,
                        int64_t ldy) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < B; ++b) {
      float s = 0.f;
      for (int64_t i = 0; i < k; ++i) s += bf16_value(w[r * k + i]) * x[b * k + i];
      y[b * ldy + r] = s;
    }
}

void silu_mul_portable(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

#if !(defined(__x86_64__) || defined(_M_X64))  // never called off x86 (simd is false there): link stubs
float quantize_group(const float* src, int64_t group, const int* order, int8_t* dst, int32_t* isum);  // module.cpp
float quantize_group_avx2(const float* src, int64_t group, const int* order, int8_t* dst, int32_t* isum) {
  return quantize_group(src, group, order, dst, isum);
}
void silu_mul_avx2(const float* g, const float* u, float* out, int64_t n) { silu_mul_portable(g, u, out, n); }
void gemv_f32_avx2(const float* w, int64_t r0, int64_t r1, int64_t k, const float* x, int64_t B, float* y, int64_t ldy) {
  gemv_f32_portable(w, r0, r1, k, x, B, y, ldy);
}
void gemv_bf16_avx2(const uint16_t* w, int64_t r0, int64_t r1, int64_t k, const float* x, int64_t B, float* y,
                    int64_t ldy) {
  gemv_bf16_portable(w, r0, r1, k, x, B, y, ldy);
}
#endif

void attend_portable(const float* q, const float* k, const float* v, const uint8_t* mask, int64_t n, int64_t D,
                     float scaling, float* p, float* out) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    if (!mask[j]) continue;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // independent partial sums: no serial add chain
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      for (int i = 0; i < 8; ++i) acc[i] += q[d + i] * k[j * D + d + i];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; d < D; ++d) s += q[d] * k[j * D + d];
    p[j] = s * scaling;
    mx = p[j] > mx ? p[j] : mx;
  }
  float sum = 0.f;
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    if (!mask[j]) continue;
    const float e = std::exp(p[j] - mx);
    sum += e;
    for (int64_t d = 0; d < D; ++d) out[d] += e * v[j * D + d];
  }
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

#if !(defined(__x86_64__) || defined(_M_X64))
void attend_avx2(const float* q, const float* k, const float* v, const uint8_t* mask, int64_t n, int64_t D,
                 float scaling, float* p, float* out) {
  attend_portable(q, k, v, mask, n, D, scaling, p, out);
}
#endif

}  // namespace mc_lowbit
