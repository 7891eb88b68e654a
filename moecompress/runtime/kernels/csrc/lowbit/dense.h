// Dense GEMV of a decode step (step.cpp): y[b * ldy + r] = sum_k W[r, k] * x[b * k + k'] for rows r0 .. r1 of W
// [n, k] (float32, or bfloat16 read as its upper 16 bits of a float32) and b < B (B <= 8) rows of x (float32).
// The AVX2 versions (dense_avx2.cpp, x86-64 only) read each weight row once for all B rows of x.
#pragma once
#include <cstdint>

namespace mc_lowbit {

float bf16_value(uint16_t h);  // bfloat16 bits -> float32
void gemv_f32_portable(const float* w, int64_t r0, int64_t r1, int64_t k, const float* x, int64_t B, float* y,
                       int64_t ldy);
void gemv_bf16_portable(const uint16_t* w, int64_t r0, int64_t r1, int64_t k, const float* x, int64_t B, float* y,
                        int64_t ldy);
void gemv_f32_avx2(const float* w, int64_t r0, int64_t r1, int64_t k, const float* x, int64_t B, float* y,
                   int64_t ldy);
void gemv_bf16_avx2(const uint16_t* w, int64_t r0, int64_t r1, int64_t k, const float* x, int64_t B, float* y,
                    int64_t ldy);


// out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u, float32 (the experts' activation). AVX2: exp by a polynomial
// (Cephes' expf, within 2 ulp of std::exp); portable: std::exp.
void silu_mul_portable(const float* g, const float* u, float* out, int64_t n);
void silu_mul_avx2(const float* g, const float* u, float* out, int64_t n);

// quantize_group (ops.h) with AVX2: the same int8 rows, dx and isum bit for bit (round half to even, clamp +-127).
// group % 32 == 0.
float quantize_group_avx2(const float* src, int64_t group, const int* order, int8_t* dst, int32_t* isum);

// One query head against n cached positions (those with mask[j] set): out [D] = softmax(scaling * q . k_j) @ v_j,
// float32; k, v [n, D] rows of the cache, p scratch [n]. The AVX2 version needs D % 8 == 0 (scores four
// positions at a time, exp 8 at a time as silu_mul_avx2's, the output accumulated in registers 64 dims at a time).
void attend_portable(const float* q, const float* k, const float* v, const uint8_t* mask, int64_t n, int64_t D,
                     float scaling, float* p, float* out);
void attend_avx2(const float* q, const float* k, const float* v, const uint8_t* mask, int64_t n, int64_t D,
                 float scaling, float* p, float* out);

}  // namespace mc_lowbit
