// Portable kernels (plain C++, any CPU): the same arithmetic as the SIMD kernels, inputs in their natural order.
// They run where no SIMD kernel applies and, forced, in the tests, so that the other ISAs' logic is covered anywhere.
#include <cstring>
#include <vector>
#include "lowbit.h"

namespace mc_lowbit {

int block_order(int64_t bits, int i) {
  switch (bits) {
    case 2: return 8 * (i % 4) + i / 4;                   // input 4j + t -> lane 8t + j
    case 3: return i;                                       // natural order
    case 4: return 16 * (i % 2) + i / 2;                  // input 2j + h -> lane 16h + j
    default: return i;
  }
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else {  // zero or subnormal: man * 2^-24, exact in float32
    float f = static_cast<float>(man) * 5.9604644775390625e-08f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

namespace {
// One row of k inputs -> uint8 values in natural order.
void unpack_row(const uint8_t* src, int64_t bits, int64_t k, uint8_t* out) {
  if (bits == 8) {
    std::memcpy(out, src, k);
    return;
  }
  const uint64_t mask = (1u << bits) - 1;
  for (int64_t c = 0; c < k / 8; ++c) {
    uint64_t v = 0;
    std::memcpy(&v, src + c * bits, bits);  // little-endian: value i at bits [i*bits, (i+1)*bits)
    for (int i = 0; i < 8; ++i) out[8 * c + i] = static_cast<uint8_t>((v >> (i * bits)) & mask);
  }
}
}  // namespace

void decode_portable(const Weights& w, const Acts& a, int64_t e, int64_t r0, int64_t r1, int64_t x0, int64_t rows, float* y) {
  std::vector<uint8_t> q(w.k);
  for (int64_t r = r0; r < r1; ++r) {
    unpack_row(w.row(e, r), w.bits, w.k, q.data());
    for (int64_t m = x0; m < x0 + rows; ++m) {
      const int8_t* xq = a.xq + m * a.k;
      float acc = 0.f;
      for (int64_t g = 0; g < w.groups; ++g) {
        int32_t dot = 0;
        for (int64_t i = g * w.group; i < (g + 1) * w.group; ++i) dot += static_cast<int32_t>(q[i]) * xq[i];
        const int64_t gi = w.at(e, r, g);
        dot -= w.zero(gi) * a.isum[m * a.groups + g];
        acc += static_cast<float>(dot) * (half_to_float(w.s[gi]) * a.dx[m * a.groups + g]);
      }
      y[m * w.n + r] = acc;
    }
  }
}

void dequant_portable(const Weights& w, int64_t e, int64_t r0, int64_t r1, float* tile) {
  std::vector<uint8_t> q(w.k);
  for (int64_t r = r0; r < r1; ++r) {
    unpack_row(w.row(e, r), w.bits, w.k, q.data());
    float* dst = tile + (r - r0) * w.k;
    for (int64_t g = 0; g < w.groups; ++g) {
      const int64_t gi = w.at(e, r, g);
      const float s = half_to_float(w.s[gi]), z = static_cast<float>(w.zero(gi));
      for (int64_t i = g * w.group; i < (g + 1) * w.group; ++i) dst[i] = (static_cast<float>(q[i]) - z) * s;
    }
  }
}

}  // namespace mc_lowbit
