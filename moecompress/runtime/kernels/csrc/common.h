// Shared by the moecompress CPU kernels (compiled together by cpu_kernels.py).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define MC_AVX512_BF16 1
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512VBMI__)
#define MC_AMX 1
#endif
#endif

namespace mc {

// float -> bf16 bits, round to nearest even (finite inputs)
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float from_bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline const uint16_t* bf16_data(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<c10::BFloat16>());
}
inline uint16_t* bf16_data(torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<c10::BFloat16>()); }

// Whether the AMX kernels can run: compiled in, and the OS grants this process the AMX tile state (module.cpp).
bool amx_available();

// slots: contiguous int64 ids of rows of the stacked weights, each in [0, experts)
inline const int64_t* slot_ids(const torch::Tensor& slots, int64_t experts) {
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous(), "slots: contiguous int64");
  const int64_t* id = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.size(0); ++i) TORCH_CHECK(id[i] >= 0 && id[i] < experts, "slot out of range");
  return id;
}

// Rows of x per slot: slots int64 [S] (rows of the stacked weights), starts int64 [S + 1] (row offsets in x).
struct Slots {
  const int64_t* slot;
  const int64_t* start;
  int64_t S;
  Slots(const torch::Tensor& slots, const torch::Tensor& starts, int64_t experts, int64_t rows) {
    slot = slot_ids(slots, experts), S = slots.size(0);
    TORCH_CHECK(starts.scalar_type() == torch::kInt64 && starts.is_contiguous(), "starts: contiguous int64");
    start = starts.data_ptr<int64_t>();
    TORCH_CHECK(starts.size(0) == S + 1 && start[0] == 0 && start[S] == rows, "starts: row offsets from 0 to R");
    for (int64_t i = 0; i < S; ++i) TORCH_CHECK(start[i] <= start[i + 1], "starts: non-decreasing");
  }
};

#ifdef MC_AVX512_BF16
// 64 floats -> 64 bf16, round to nearest even
inline void store_bf16_64(uint16_t* dst, const float* src) {
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src)));
  _mm512_storeu_si512(dst + 32, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 48), _mm512_loadu_ps(src + 32)));
}
#endif

#ifdef MC_AMX
// All 8 tiles 16 rows x 64 bytes: C (float32 16 x 16), A (bf16 16 x 32), B (bf16 pairs 16 x 16 x 2).
inline void configure_tiles() {
  alignas(64) uint8_t cfg[64] = {};  // palette 1; bytes per row of each tile at 16 + 2t; rows at 48 + t
  cfg[0] = 1;
  for (int t = 0; t < 8; ++t) cfg[16 + 2 * t] = 64, cfg[48 + t] = 16;
  asm volatile("" : : "r"(cfg) : "memory");  // GCC may drop stores that only ldtilecfg reads (seen with -O3)
  _tile_loadconfig(cfg);
}
#endif

}  // namespace mc
