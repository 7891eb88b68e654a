// What the x86 GEMMs of 16-bit weights share (gemm16.h): the conversion of a panel of weight rows to float32 and
// the blocking over kKc16 inputs. Included by gemm16_avx2.cpp and gemm16_avx512.cpp after their target pragma and
// inside their anonymous namespace, so that each compiles it for its own ISA; needs <immintrin.h>, <algorithm>,
// <cstring>, <vector>.

inline __m256 cvt8(const uint16_t* p, int64_t type) {  // 8 bfloat16 / float16 -> float32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return type == kBf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

inline float cvt1(uint16_t h, int64_t type) {
  if (type == kF16) return _cvtsh_ss(h);
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// v[i]: 8 floats of row i -> v[j]: element j of rows 0..7
inline void transpose8(__m256 v[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
    v[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
  }
}

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
      __m256 v[8];
      for (int i = 0; i < 8; ++i) v[i] = i < n ? cvt8(w + (r + base + i) * k + k0 + kk, type) : _mm256_setzero_ps();
      transpose8(v);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (kk + j) * 16 + base, v[j]);
    }
    for (int64_t kk = kc8; kk < kc; ++kk)
      for (int i = 0; i < 8; ++i) dst[kk * 16 + base + i] = i < n ? cvt1(w[(r + base + i) * k + k0 + kk], type) : 0.f;
  }
}

// The blocking (gemm16.h's GEMM contract): for each block of kKc16 inputs, the next block prefetched into L2, the
// unit's panels packed into a per-thread buffer (rounded up to Kernel::kPanelsPerStep with zero panels), then
// Kernel::rows<MR> over x's rows 6 at a time and the 1-5 left.
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
      Kernel::template rows<6>(x + m * ldx + k0, ldx, buf.data(), panels, kc, r0, r1, y + m * ldy, ldy, acc);
    const float* xm = x + m * ldx + k0;
    float* ym = y + m * ldy;
    switch (M - m) {
      case 5: Kernel::template rows<5>(xm, ldx, buf.data(), panels, kc, r0, r1, ym, ldy, acc); break;
      case 4: Kernel::template rows<4>(xm, ldx, buf.data(), panels, kc, r0, r1, ym, ldy, acc); break;
      case 3: Kernel::template rows<3>(xm, ldx, buf.data(), panels, kc, r0, r1, ym, ldy, acc); break;
      case 2: Kernel::template rows<2>(xm, ldx, buf.data(), panels, kc, r0, r1, ym, ldy, acc); break;
      case 1: Kernel::template rows<1>(xm, ldx, buf.data(), panels, kc, r0, r1, ym, ldy, acc); break;
      default: break;
    }
  }
}
