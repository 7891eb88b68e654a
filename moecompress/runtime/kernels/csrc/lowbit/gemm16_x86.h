// What the x86 GEMMs of 16-bit weights share (gemm16.h): the conversion of a panel of weight rows to float32 and
// the blocking over kKc16 inputs. Included by gemm16_avx2.cpp and gemm16_avx512.cpp after their target pragma and
// inside their anonymous namespace, so that each compiles it for its own ISA; needs <immintrin.h>, <algorithm>,
// <vector> and dense.h (bf16_value).
#include "transpose_x86.h"

inline __m256 cvt8(const uint16_t* p, int64_t type) {  // 8 bfloat16 / float16 -> float32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return type == kBf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

inline float cvt1(uint16_t h, int64_t type) { return type == kF16 ? _cvtsh_ss(h) : bf16_value(h); }

// Rows r .. r + rows (rows <= 16; the panel's other rows 0) of W, inputs k0 .. k0 + kc -> dst[kk * 16 + i].
void pack_panel(const uint16_t* w, int64_t type, int64_t k, int64_t r, int64_t rows, int64_t k0, int64_t kc,
                float* dst) {
  const int64_t kc8 = kc / 8 * 8;
  for (int half = 0; half < 2; ++half) {
    const int64_t base = half * 8, n = std::min<int64_t>(8, std::max<int64_t>(0, rows - base));
    if (n == 0) {
      for (int64_t kk = 0; kk < kc; ++kk) _mm256_storeu_ps(dst + kk * 16 + base, _mm256_setzero_ps());
      continue;
    }
    for (int64_t kk = 0; kk < kc8; kk += 8) {
      __m256i v[8];  // float32 bits
      for (int i = 0; i < 8; ++i)
        v[i] = i < n ? _mm256_castps_si256(cvt8(w + (r + base + i) * k + k0 + kk, type)) : _mm256_setzero_si256();
      transpose8(v);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (kk + j) * 16 + base, _mm256_castsi256_ps(v[j]));
    }
    for (int64_t kk = kc8; kk < kc; ++kk)
      for (int i = 0; i < 8; ++i) dst[kk * 16 + base + i] = i < n ? cvt1(w[(r + base + i) * k + k0 + kk], type) : 0.f;
  }
}

// MR x rows against every step of the unit's panels: Kernel::tile<MR>(x, ldx, step's first panel, kc, y's columns,
// ldy, columns stored, accumulate).
template <class Kernel, int MR>
void unit_rows(const float* x, int64_t ldx, const float* buf, int64_t panels, int64_t kc, int64_t r0, int64_t r1,
               float* y, int64_t ldy, bool accumulate) {
  for (int64_t p = 0; p < panels; p += Kernel::kPanelsPerStep) {
    const int64_t r = r0 + p * kNr16;
    Kernel::template tile<MR>(x, ldx, buf + p * kKc16 * kNr16, kc, y + r, ldy,
                              std::min<int64_t>(Kernel::kPanelsPerStep * kNr16, r1 - r), accumulate);
  }
}

// The blocking (gemm16.h's GEMM contract): for each block of kKc16 inputs, the next block prefetched into L2, the
// unit's panels packed into a per-thread buffer (rounded up to Kernel::kPanelsPerStep with zero panels), then
// Kernel::tile<MR> on each step of kPanelsPerStep panels, over x's rows 6 at a time and the 1-5 left.
template <class Kernel>
void gemm16_blocked(const float* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t type, int64_t k, int64_t r0,
                    int64_t r1, float* y, int64_t ldy) {
  thread_local std::vector<float> buf;  // the unit's panels: kUnit16 / 16 x [kKc16][16] float32 (64 KB)
  buf.resize(kUnit16 * kKc16);
  const int64_t panels = (r1 - r0 + kNr16 - 1) / kNr16;
  if (k == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(y + m * ldy + r0, y + m * ldy + r1, 0.f);
    return;
  }
  const int64_t elem = 2;  // bytes per weight
  for (int64_t k0 = 0; k0 < k; k0 += kKc16) {
    const int64_t kc = std::min(kKc16, k - k0);
    if (k0 + kc < k)  // the next block of the unit's rows into L2 while this one computes (cold experts' weights)
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t b = 0; b < std::min(kKc16, k - k0 - kc) * elem; b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(w + r * k + k0 + kc) + b, _MM_HINT_T1);
    const int64_t step = Kernel::kPanelsPerStep, packed = (panels + step - 1) / step * step;
    for (int64_t p = 0; p < packed; ++p)  // a step's panels past the unit's rows: zeros
      pack_panel(w, type, k, r0 + p * kNr16, std::max<int64_t>(0, std::min<int64_t>(kNr16, r1 - r0 - p * kNr16)), k0,
                 kc, buf.data() + p * kKc16 * kNr16);
    const bool acc = k0 > 0;
    int64_t m = 0;
    for (; m + 6 <= M; m += 6)
      unit_rows<Kernel, 6>(x + m * ldx + k0, ldx, buf.data(), panels, kc, r0, r1, y + m * ldy, ldy, acc);
    const float* xm = x + m * ldx + k0;
    float* ym = y + m * ldy;
    switch (M - m) {
      case 5: unit_rows<Kernel, 5>(xm, ldx, buf.data(), panels, kc, r0, r1, ym, ldy, acc); break;
      case 4: unit_rows<Kernel, 4>(xm, ldx, buf.data(), panels, kc, r0, r1, ym, ldy, acc); break;
      case 3: unit_rows<Kernel, 3>(xm, ldx, buf.data(), panels, kc, r0, r1, ym, ldy, acc); break;
      case 2: unit_rows<Kernel, 2>(xm, ldx, buf.data(), panels, kc, r0, r1, ym, ldy, acc); break;
      case 1: unit_rows<Kernel, 1>(xm, ldx, buf.data(), panels, kc, r0, r1, ym, ldy, acc); break;
      default: break;
    }
  }
}
