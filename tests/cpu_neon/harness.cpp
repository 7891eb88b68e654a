// Standalone check of the NEON + dotprod decode kernel (csrc/lowbit/isa_neon.cpp) against the portable kernel and a
// float64 reference, without torch: built with a cross compiler and run under qemu-user by tests/test_cpu_neon.py.
// Prints one line per case and exits non-zero on a mismatch.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
#include "lowbit.h"

using namespace mc_lowbit;

namespace {
uint16_t float_to_half(float f) {  // normal range only (the scales here): round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000, exp = ((u >> 23) & 0xFF) - 112, man = u & 0x7FFFFF;
  uint32_t h = sign | (exp << 10) | (man >> 13);
  const uint32_t rest = man & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
  return static_cast<uint16_t>(h);
}

struct Case {
  int bits, group;
  bool symmetric;
  int64_t n, k, rows;
};

int run(const Case& c, std::mt19937& rng) {
  const int64_t groups = c.k / c.group, row_bytes = c.k * c.bits / 8, N = 2;
  std::vector<uint8_t> q(N * c.n * c.k), packed(N * c.n * row_bytes, 0), zeros(N * c.n * groups);
  std::vector<uint16_t> scales(N * c.n * groups);
  for (auto& v : q) v = rng() % (1u << c.bits);
  for (auto& v : zeros) v = rng() % (1u << c.bits);
  for (auto& v : scales) v = float_to_half(0.005f + 0.1f * (rng() % 1000) / 1000.f);
  for (int64_t r = 0; r < N * c.n; ++r)  // format/pack.py: 8 values per `bits` bytes, little-endian
    for (int64_t blk = 0; blk < c.k / 8; ++blk) {
      uint64_t word = 0;
      for (int i = 0; i < 8; ++i) word |= static_cast<uint64_t>(q[r * c.k + blk * 8 + i]) << (i * c.bits);
      std::memcpy(&packed[r * row_bytes + blk * c.bits], &word, c.bits);
    }
  const Weights w{packed.data(), scales.data(), c.symmetric ? nullptr : zeros.data(), c.n, c.k, c.bits, c.group, groups,
                  row_bytes};
  // activations: int8 per group as cpu_lowbit.quantize_rows does; natural order (portable) and block order (NEON)
  std::normal_distribution<float> normal(0.f, 2.f);
  std::vector<float> x(c.rows * c.k), dx(c.rows * groups);
  std::vector<int8_t> xq(c.rows * c.k), xb(c.rows * c.k);
  std::vector<int32_t> isum(c.rows * groups);
  for (auto& v : x) v = normal(rng);
  for (int64_t u = 0; u < c.rows * groups; ++u) {
    float amax = 0.f;
    for (int i = 0; i < c.group; ++i) amax = std::max(amax, std::fabs(x[u * c.group + i]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t s = 0;
    for (int i = 0; i < c.group; ++i) {
      const int v = std::min(127, std::max(-127, static_cast<int>(std::nearbyint(x[u * c.group + i] * inv))));
      xq[u * c.group + i] = static_cast<int8_t>(v);
      xb[u * c.group + (i / 32) * 32 + block_order(c.bits, i % 32)] = static_cast<int8_t>(v);
      s += v;
    }
    dx[u] = amax / 127.f, isum[u] = s;
  }
  std::vector<float> y_port(c.rows * c.n), y_neon(c.rows * c.n);
  const int64_t slot = 1, x0 = 0;
  decode_portable(w, Acts{xq.data(), dx.data(), isum.data(), c.k, groups}, slot, 0, c.n, x0, c.rows, y_port.data());
  decode_neon_dotprod(w, Acts{xb.data(), dx.data(), isum.data(), c.k, groups}, slot, 0, c.n, x0, c.rows, y_neon.data());
  double worst = 0.0;
  for (int64_t m = 0; m < c.rows; ++m)
    for (int64_t r = 0; r < c.n; ++r) {
      double ref = 0.0, mag = 0.0;  // x_hat @ W^T in float64, and sum |x_hat| |W| for the float32 slack
      for (int64_t i = 0; i < c.k; ++i) {
        const int64_t g = i / c.group, gi = w.at(slot, r, g);
        const double wv = (q[(slot * c.n + r) * c.k + i] - w.zero(gi)) * static_cast<double>(half_to_float(scales[gi]));
        const double xv = xq[m * c.k + i] * static_cast<double>(dx[m * groups + g]);
        ref += xv * wv, mag += std::fabs(xv * wv);
      }
      const double tol = 1e-5 * mag + 1e-12;
      const double e1 = std::fabs(y_neon[m * c.n + r] - ref), e2 = std::fabs(y_port[m * c.n + r] - ref);
      if (e1 > tol || e2 > tol) {
        std::printf("FAIL bits=%d group=%d sym=%d rows=%lld r=%lld m=%lld: neon %g portable %g ref %g\n", c.bits, c.group,
                    c.symmetric, (long long)c.rows, (long long)r, (long long)m, y_neon[m * c.n + r], y_port[m * c.n + r], ref);
        return 1;
      }
      worst = std::max(worst, e1 / (mag + 1e-30));
    }
  std::printf("ok bits=%d group=%d sym=%d n=%lld k=%lld rows=%lld worst_rel=%.2e\n", c.bits, c.group, c.symmetric,
              (long long)c.n, (long long)c.k, (long long)c.rows, worst);
  return 0;
}
}  // namespace

int main() {
  std::mt19937 rng(0);
  int failures = 0;
  for (int bits : {2, 3, 4, 8})
    for (int group : {32, 64, 128})
      for (bool symmetric : {false, true})
        for (int64_t rows : {1, 3, 5}) failures += run(Case{bits, group, symmetric, 13, 2 * group, rows}, rng);
  std::printf("%s\n", failures ? "FAILED" : "PASSED");
  return failures ? 1 : 0;
}
