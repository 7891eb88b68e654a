// The MoE layer of many tokens (prefill) in one call, with the int8-activation kernels of the decode path (on AVX2
// without VNNI they beat dequantized tiles + at::mm at every row count per expert, kernel_registry.Q8_PREFILL_ISAS).
//
// Same arguments and result as moe_decode (moe.cpp), for packed groups only (2/3/4/8-bit), but every step is split
// over the threads and nothing costs more than linear in the pairs: each token row is quantized once per lane
// order (the groups' bit-widths) and copied to its (token, k) pairs; the pairs sorted by (group, slot) run
// (expert, block of 64 weight rows) units across the threads, each by gemm.h's kernel (AVX2, many rows) or the
// decode kernel; silu(gate) * up and its quantization run per pair;
// the weighted sum per token, its experts in k order (deterministic whatever the thread count).
#include <ATen/Parallel.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>
#include "dense.h"
#include "gemm.h"
#include "ops.h"

namespace mc_lowbit {
namespace {

constexpr int64_t kUnitRows = 64;  // weight rows per work unit

struct Groups {
  std::vector<Weights> w;
  std::vector<std::array<int, 32>> order;  // each group's lane order
  std::vector<int> order_id;               // each group's index among the distinct lane orders
  std::vector<std::array<int, 32>> orders;  // the distinct lane orders
  const int64_t* map;  // [E, 2]
  int64_t experts;
};

Groups groups_of(const std::vector<torch::Tensor>& q, const std::vector<torch::Tensor>& s, const std::vector<torch::Tensor>& z,
                 const std::vector<int64_t>& bits, const torch::Tensor& map, int64_t group, int64_t isa) {
  TORCH_CHECK(q.size() == s.size() && q.size() == z.size() && q.size() == bits.size() && !q.empty(),
              "one qweight, scales, zeros and bits per group");
  TORCH_CHECK(map.scalar_type() == torch::kInt64 && map.is_contiguous() && map.dim() == 2 && map.size(1) == 2,
              "map: int64 [experts, 2] (group, slot)");
  Groups g{{}, {}, {}, {}, map.data_ptr<int64_t>(), map.size(0)};
  for (size_t i = 0; i < q.size(); ++i) {
    TORCH_CHECK(bits[i] != 16, "moe_prefill takes packed groups only (2/3/4/8-bit)");
    g.w.push_back(weights(q[i], s[i], z[i], bits[i], group));
    TORCH_CHECK(g.w[i].n == g.w[0].n && g.w[i].k == g.w[0].k, "groups of one projection: same shapes");
    std::array<int, 32> o;
    lane_order(bits[i], isa, o.data());
    g.order.push_back(o);
    const auto it = std::find(g.orders.begin(), g.orders.end(), o);
    g.order_id.push_back(static_cast<int>(it - g.orders.begin()));
    if (it == g.orders.end()) g.orders.push_back(o);
  }
  for (int64_t e = 0; e < g.experts; ++e) {
    const int64_t gi = g.map[2 * e], slot = g.map[2 * e + 1];
    TORCH_CHECK(gi < 0 || (gi < static_cast<int64_t>(q.size()) && slot >= 0 && slot < q[gi].size(0)), "map: slot out of range");
  }
  return g;
}

struct Quantized {  // int8 rows in block order, per group of `group` inputs: dx and the sum of the int8 values
  std::vector<int8_t> xq;
  std::vector<float> dx;
  std::vector<int32_t> isum;
  Quantized(int64_t rows, int64_t k, int64_t groups) : xq(rows * k), dx(rows * groups), isum(rows * groups) {}
};

void quantize_row(QuantizeFn quantize, const float* src, int64_t k, int64_t group, const int* order, Quantized& q,
                  int64_t row) {
  const int64_t groups = k / group;
  for (int64_t g = 0; g < groups; ++g)
    q.dx[row * groups + g] = quantize(src + g * group, group, order, q.xq.data() + row * k + g * group,
                                      q.isum.data() + row * groups + g);
}

// Pairs sorted by (group, slot) [P] (group[i], slot[i]), their quantized rows a; y [P, n].
void run_experts(const Groups& p, const std::vector<int64_t>& grp, const std::vector<int64_t>& slot, const Quantized& q,
                 int64_t group, int64_t isa, float* y) {
  const int64_t P = static_cast<int64_t>(grp.size()), k = p.w[0].k, n = p.w[0].n;
  const Acts a{q.xq.data(), q.dx.data(), q.isum.data(), k, k / group};
  std::vector<int64_t> starts{0};
  for (int64_t i = 1; i <= P; ++i)
    if (i == P || grp[i] != grp[i - 1] || slot[i] != slot[i - 1]) starts.push_back(i);
  const int64_t runs = static_cast<int64_t>(starts.size()) - 1, blocks = (n + kUnitRows - 1) / kUnitRows;
  at::parallel_for(0, runs * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / blocks, r0 = (u % blocks) * kUnitRows, first = starts[r], rows = starts[r + 1] - first;
      prefill_kernel(isa, rows)(p.w[grp[first]], a, slot[first], r0, std::min(n, r0 + kUnitRows), first, rows, y);
    }
  });
}

}  // namespace

torch::Tensor moe_prefill(torch::Tensor x, torch::Tensor topk_index, torch::Tensor topk_weights,
                          std::vector<torch::Tensor> gu_q, std::vector<torch::Tensor> gu_s, std::vector<torch::Tensor> gu_z,
                          std::vector<int64_t> gu_bits, torch::Tensor gu_map, std::vector<torch::Tensor> dn_q,
                          std::vector<torch::Tensor> dn_s, std::vector<torch::Tensor> dn_z, std::vector<int64_t> dn_bits,
                          torch::Tensor dn_map, int64_t group, int64_t isa) {
  decode_kernel(isa);  // checks the ISA
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat, "x: contiguous float32 [T, H]");
  TORCH_CHECK(topk_index.scalar_type() == torch::kInt64 && topk_index.is_contiguous() && topk_index.dim() == 2 &&
              topk_index.size(0) == x.size(0), "top_k_index: contiguous int64 [T, K]");
  TORCH_CHECK(topk_weights.scalar_type() == torch::kFloat && topk_weights.is_contiguous() &&
              topk_weights.sizes() == topk_index.sizes(), "top_k_weights: contiguous float32 [T, K]");
  const Groups gu = groups_of(gu_q, gu_s, gu_z, gu_bits, gu_map, group, isa);
  const Groups dn = groups_of(dn_q, dn_s, dn_z, dn_bits, dn_map, group, isa);
  const int64_t T = x.size(0), K = topk_index.size(1), H = x.size(1), N1 = gu.w[0].n, I = dn.w[0].k;
  TORCH_CHECK(gu.w[0].k == H && dn.w[0].n == H && N1 == 2 * I && gu.experts == dn.experts,
              "shapes: gate_up [2I, H], down [H, I], one map entry per expert in both");
  auto out = torch::zeros({T, H}, torch::kFloat);
  const int64_t* idx = topk_index.data_ptr<int64_t>();
  // the computed pairs t * K + k, sorted by gate_up's (group, slot) by a counting sort over the experts
  const int64_t E = gu.experts;
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t i = 0; i < T * K; ++i) {
    const int64_t e = idx[i];
    if (e >= 0 && e < E && gu.map[2 * e] >= 0 && dn.map[2 * e] >= 0) ++count[e + 1];
  }
  // experts in (group, slot) order of gate_up
  std::vector<int64_t> experts_order;
  for (int64_t e = 0; e < E; ++e)
    if (count[e + 1]) experts_order.push_back(e);
  std::sort(experts_order.begin(), experts_order.end(), [&](int64_t a, int64_t b) {
    return gu.map[2 * a] != gu.map[2 * b] ? gu.map[2 * a] < gu.map[2 * b] : gu.map[2 * a + 1] < gu.map[2 * b + 1];
  });
  std::vector<int64_t> offset(E, -1);
  int64_t P = 0;
  for (int64_t e : experts_order) offset[e] = P, P += count[e + 1];
  if (P == 0) return out;
  std::vector<int64_t> pair(P), grp(P), slot(P);  // pair[i] = t * K + k, in token order within an expert
  for (int64_t i = 0; i < T * K; ++i) {
    const int64_t e = idx[i];
    if (e >= 0 && e < E && offset[e] >= 0 && gu.map[2 * e] >= 0 && dn.map[2 * e] >= 0) {
      const int64_t j = offset[e]++;
      pair[j] = i, grp[j] = gu.map[2 * e], slot[j] = gu.map[2 * e + 1];
    }
  }
  // gate_up: each token quantized once per lane order, copied to its pairs
  const int64_t G1 = H / group, G2 = I / group;
  const int64_t NO = static_cast<int64_t>(gu.orders.size());
  Quantized tok(NO * T, H, G1), q1(P, H, G1);
  const float* xs = x.data_ptr<float>();
  const QuantizeFn quantize = quantize_fn(isa);
  const bool simd = simd_isa(isa);
  at::parallel_for(0, NO * T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) quantize_row(quantize, xs + (u % T) * H, H, group, gu.orders[u / T].data(), tok, u);
  });
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t src = gu.order_id[grp[i]] * T + pair[i] / K;
      std::memcpy(&q1.xq[i * H], &tok.xq[src * H], H);
      std::memcpy(&q1.dx[i * G1], &tok.dx[src * G1], G1 * sizeof(float));
      std::memcpy(&q1.isum[i * G1], &tok.isum[src * G1], G1 * sizeof(int32_t));
    }
  });
  std::vector<float> h(P * N1);
  run_experts(gu, grp, slot, q1, group, isa, h.data());
  // down: its own (group, slot) order when it groups the experts differently
  std::vector<int64_t> perm(P);  // down position j <- gate_up position perm[j]
  for (int64_t i = 0; i < P; ++i) perm[i] = i;
  std::vector<int64_t> dgrp(P), dslot(P);
  for (int64_t i = 0; i < P; ++i) {
    const int64_t e = idx[pair[i]];
    dgrp[i] = dn.map[2 * e], dslot[i] = dn.map[2 * e + 1];
  }
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
    return dgrp[a] != dgrp[b] ? dgrp[a] < dgrp[b] : dslot[a] < dslot[b];
  });
  std::vector<int64_t> g2(P), s2(P), row_of(T * K, -1);
  for (int64_t j = 0; j < P; ++j) g2[j] = dgrp[perm[j]], s2[j] = dslot[perm[j]], row_of[pair[perm[j]]] = j;
  Quantized q2(P, I, G2);
  at::parallel_for(0, P, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> act(I);
    for (int64_t j = begin; j < end; ++j) {
      const float* hi = &h[perm[j] * N1];
      (simd ? silu_mul_avx2 : silu_mul_portable)(hi, hi + I, act.data(), I);
      quantize_row(quantize, act.data(), I, group, dn.order[g2[j]].data(), q2, j);
    }
  });
  std::vector<float>().swap(h);
  std::vector<float> yd(P * H);
  run_experts(dn, g2, s2, q2, group, isa, yd.data());
  // the weighted sum per token, its experts in k order
  const float* w = topk_weights.data_ptr<float>();
  float* o = out.data_ptr<float>();
  weighted_sum(row_of.data(), w, yd.data(), o, T, K, H);
  return out;
}

void weighted_sum(const int64_t* row_of, const float* w, const float* rows, float* out, int64_t T, int64_t K,
                  int64_t H) {
  at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t j = row_of[t * K + k];
        if (j < 0) continue;
        const float wk = w[t * K + k];
        const float* src = rows + j * H;
        float* dst = out + t * H;
        for (int64_t c = 0; c < H; ++c) dst[c] += src[c] * wk;
      }
  });
}

}  // namespace mc_lowbit
