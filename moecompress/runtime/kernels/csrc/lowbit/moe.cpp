// The MoE layer of a few tokens (decode) in one call: every routed expert's gate_up projection, silu(gate) * up,
// the down projection and the routing-weighted sum, with the decode kernels (int8 activations x packed weights).
//
// Each projection comes as its groups (one per bit-width: qweight, scales, zeros, bits) and a map expert ->
// (group, slot), group -1 where the expert is not computed here. The (token, k) pairs whose expert both projections
// hold are sorted by (group, slot, token, k); each pair's row is quantized to int8 once, per group of `group` inputs,
// in the lane order of its group's bit-width, and the experts' rows are computed together with at::parallel_for
// over (expert, block of output rows). The activation and the weighted sum are in float32.
//
// The step (step.cpp) builds each layer's MoeLayer once and calls moe_decode_into with its own buffers; the per-call
// scratch lives in thread-local vectors (no allocation per call once warm). Below kMinParallelWork multiply-adds a
// projection stays on the calling thread (fork / join costs more than it saves there).
//
// A group of bits 16 is dense: its qweight is the experts' float32 / bfloat16 weights [N, n, k] (scales and zeros
// empty), computed in float32 by dense.h's GEMV (AVX2 where isa is an x86 SIMD one) on the rows of each expert.
#include <ATen/Parallel.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <vector>
#include "dense.h"
#include "ops.h"

namespace mc_lowbit {
namespace {

constexpr int64_t kRowsPerUnit = 64;  // weight rows per work unit, as the per-group decode
constexpr int64_t kMinParallelWork = 1 << 17;  // multiply-adds of a projection below which it stays on one thread

using Proj = MoeProj;

}  // namespace

MoeProj moe_proj(const std::vector<torch::Tensor>& q, const std::vector<torch::Tensor>& s, const std::vector<torch::Tensor>& z,
          const std::vector<int64_t>& bits, const torch::Tensor& map, int64_t group, int64_t isa) {
  TORCH_CHECK(q.size() == s.size() && q.size() == z.size() && q.size() == bits.size() && !q.empty(),
              "one qweight, scales, zeros and bits per group");
  TORCH_CHECK(map.scalar_type() == torch::kInt64 && map.is_contiguous() && map.dim() == 2 && map.size(1) == 2,
              "map: int64 [experts, 2] (group, slot)");
  Proj p{{}, {}, map.data_ptr<int64_t>(), map.size(0)};
  for (size_t i = 0; i < q.size(); ++i) {
    if (bits[i] == 16) {
      TORCH_CHECK(q[i].dim() == 3 && q[i].is_contiguous() &&
                  (q[i].scalar_type() == torch::kFloat || q[i].scalar_type() == torch::kBFloat16),
                  "a 16-bit group's weights: contiguous float32 / bfloat16 [N, n, k]");
      Weights w{};
      w.n = q[i].size(1), w.k = q[i].size(2), w.bits = 16;
      p.groups.push_back(w);
      p.dense.push_back(q[i]);
    } else {
      p.groups.push_back(weights(q[i], s[i], z[i], bits[i], group));
      p.dense.emplace_back();
    }
    TORCH_CHECK(p.groups[i].n == p.groups[0].n && p.groups[i].k == p.groups[0].k, "groups of one projection: same shapes");
  }
  for (int64_t e = 0; e < p.experts; ++e) {
    const int64_t g = p.map[2 * e], slot = p.map[2 * e + 1];
    TORCH_CHECK(g < 0 || (g < static_cast<int64_t>(q.size()) && slot >= 0 && slot < q[g].size(0)), "map: slot out of range");
  }
  for (size_t g = 0; g < p.groups.size(); ++g) {
    std::array<int, 32> o{};
    if (!p.dense[g].defined()) lane_order(p.groups[g].bits, isa, o.data());
    p.orders.push_back(o);
  }
  return p;
}

namespace {

struct Pair {
  int64_t t, k, group, slot;  // token, its k-th expert; where the projection holds it
};

// What one call needs besides its inputs, kept per thread across calls.
struct Scratch {
  std::vector<int8_t> xq;
  std::vector<float> dx, h, act, yd, xs;
  std::vector<int32_t> isum;
  std::vector<Pair> pairs, first, second, down_pairs;
  std::vector<int64_t> rows, order, down_rows, row_of, starts;
};

// Rows `src` [P, k] (float32; row i of the result is src row rows[i]) quantized into acts: row i in the lane order
// of pairs[i]'s group's bit-width. Then every expert (run of equal group, slot) against its rows, into y [P, n].
void project(const Proj& p, const std::vector<Pair>& pairs, const float* src, const std::vector<int64_t>& rows,
             int64_t group, int64_t isa, float* y, Scratch& sc) {
  const int64_t P = static_cast<int64_t>(pairs.size()), k = p.groups[0].k, groups = k / group, n = p.groups[0].n;
  std::vector<int8_t>& xq = sc.xq;
  std::vector<float>& dx = sc.dx;
  std::vector<int32_t>& isum = sc.isum;
  xq.resize(P * k), dx.resize(P * groups), isum.resize(P * groups);
  const std::vector<std::array<int, 32>>& orders = p.orders;  // each group's lane order (dense groups: unused)
#if defined(__x86_64__) || defined(_M_X64)
  const bool simd = isa == kAvx2 || isa == kAvx512Vnni;
#else
  const bool simd = false;
#endif
  const auto quantize = simd ? quantize_group_avx2 : quantize_group;
  for (int64_t i = 0; i < P; ++i) {
    const int64_t gi = pairs[i].group;
    if (p.dense[gi].defined()) continue;  // dense rows are read as float32
    const int* order = orders[gi].data();
    int64_t same = -1;  // an earlier pair of the same row in the same lane order: a copy of its int8 row
    for (int64_t j = i - 1; j >= 0 && same < 0; --j)
      if (rows[j] == rows[i] && !p.dense[pairs[j].group].defined() && orders[pairs[j].group] == orders[gi]) same = j;
    if (same >= 0) {
      std::copy(&xq[same * k], &xq[same * k] + k, &xq[i * k]);
      std::copy(&dx[same * groups], &dx[same * groups] + groups, &dx[i * groups]);
      std::copy(&isum[same * groups], &isum[same * groups] + groups, &isum[i * groups]);
      continue;
    }
    for (int64_t g = 0; g < groups; ++g)
      dx[i * groups + g] = quantize(src + rows[i] * k + g * group, group, order, xq.data() + i * k + g * group,
                                          isum.data() + i * groups + g);
  }
  const Acts a{xq.data(), dx.data(), isum.data(), k, groups};
  std::vector<int64_t>& starts = sc.starts;  // runs of one expert
  starts.assign(1, 0);
  for (int64_t i = 1; i <= P; ++i)
    if (i == P || pairs[i].group != pairs[i - 1].group || pairs[i].slot != pairs[i - 1].slot) starts.push_back(i);
  const int64_t runs = static_cast<int64_t>(starts.size()) - 1, blocks = (n + kRowsPerUnit - 1) / kRowsPerUnit;
  const DecodeFn fn = decode_kernel(isa);
  auto body = [&](int64_t begin, int64_t end, std::vector<float>& xs) {  // xs: a dense expert's rows of src, gathered
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / blocks, r0 = (u % blocks) * kRowsPerUnit, first = starts[r], m = starts[r + 1] - first;
      const int64_t r1 = std::min(n, r0 + kRowsPerUnit);
      const Pair& pr = pairs[first];
      const torch::Tensor& d = p.dense[pr.group];
      if (!d.defined()) {
        fn(p.groups[pr.group], a, pr.slot, r0, r1, first, m, y);
        continue;
      }
      xs.resize(m * k);
      for (int64_t i = 0; i < m; ++i) std::copy(src + rows[first + i] * k, src + rows[first + i] * k + k, &xs[i * k]);
      if (d.scalar_type() == torch::kFloat) {
        const float* w = d.data_ptr<float>() + pr.slot * n * k;
        (simd ? gemv_f32_avx2 : gemv_f32_portable)(w, r0, r1, k, xs.data(), m, y + first * n, n);
      } else {
        const auto* w = reinterpret_cast<const uint16_t*>(d.data_ptr<at::BFloat16>()) + pr.slot * n * k;
        (simd ? gemv_bf16_avx2 : gemv_bf16_portable)(w, r0, r1, k, xs.data(), m, y + first * n, n);
      }
    }
  };
  if (P * n * k < kMinParallelWork) {
    body(0, runs * blocks, sc.xs);
  } else {
    at::parallel_for(0, runs * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> xs;
      body(begin, end, xs);
    });
  }
}

}  // namespace

MoeLayer moe_layer(const std::vector<torch::Tensor>& gu_q, const std::vector<torch::Tensor>& gu_s,
                   const std::vector<torch::Tensor>& gu_z, const std::vector<int64_t>& gu_bits, const torch::Tensor& gu_map,
                   const std::vector<torch::Tensor>& dn_q, const std::vector<torch::Tensor>& dn_s,
                   const std::vector<torch::Tensor>& dn_z, const std::vector<int64_t>& dn_bits, const torch::Tensor& dn_map,
                   int64_t group, int64_t isa) {
  decode_kernel(isa);  // checks the ISA
  MoeLayer L{moe_proj(gu_q, gu_s, gu_z, gu_bits, gu_map, group, isa), moe_proj(dn_q, dn_s, dn_z, dn_bits, dn_map, group, isa),
             group, isa};
  TORCH_CHECK(L.gu.groups[0].n == 2 * L.dn.groups[0].k && L.gu.experts == L.dn.experts && L.dn.groups[0].n == L.gu.groups[0].k,
              "shapes: gate_up [2I, H], down [H, I], one map entry per expert in both");
  return L;
}

void moe_decode_into(const MoeLayer& L, const float* x, int64_t T, const int64_t* idx, const float* w, int64_t K,
                     float* o) {
  thread_local Scratch sc;
  const Proj &gu = L.gu, &dn = L.dn;
  const int64_t group = L.group, isa = L.isa, H = gu.groups[0].k, N1 = gu.groups[0].n, I = dn.groups[0].k;
  std::fill(o, o + T * H, 0.f);
  std::vector<Pair>& pairs = sc.pairs;
  pairs.clear();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = idx[t * K + k];
      if (e >= 0 && e < gu.experts && gu.map[2 * e] >= 0 && dn.map[2 * e] >= 0)
        pairs.push_back({t, k, gu.map[2 * e], gu.map[2 * e + 1]});
    }
  if (pairs.empty()) return;
  const int64_t P = static_cast<int64_t>(pairs.size());
  // gate_up: x's token rows, by gate_up's (group, slot)
  std::vector<Pair>& first = sc.first;
  first = pairs;
  std::stable_sort(first.begin(), first.end(), [](const Pair& a, const Pair& b) {
    return a.group != b.group ? a.group < b.group : a.slot < b.slot;
  });
  std::vector<int64_t>& rows = sc.rows;
  rows.resize(P);
  for (int64_t i = 0; i < P; ++i) rows[i] = first[i].t;
  std::vector<float>&h = sc.h, &act = sc.act, &yd = sc.yd;
  h.resize(P * N1), act.resize(P * I), yd.resize(P * H);
  project(gu, first, x, rows, group, isa, h.data(), sc);
#if defined(__x86_64__) || defined(_M_X64)
  const bool simd = isa == kAvx2 || isa == kAvx512Vnni;
#else
  const bool simd = false;
#endif
  for (int64_t i = 0; i < P; ++i)
    (simd ? silu_mul_avx2 : silu_mul_portable)(&h[i * N1], &h[i * N1 + I], &act[i * I], I);
  // down: the activations' rows, by down's (group, slot)
  std::vector<Pair>& second = sc.second;
  second = first;
  for (int64_t i = 0; i < P; ++i) {
    const int64_t e = idx[first[i].t * K + first[i].k];
    second[i].group = dn.map[2 * e], second[i].slot = dn.map[2 * e + 1], rows[i] = i;  // rows[i]: act row of pair i
  }
  std::vector<int64_t>& order = sc.order;
  order.resize(P);
  for (int64_t i = 0; i < P; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return second[a].group != second[b].group ? second[a].group < second[b].group : second[a].slot < second[b].slot;
  });
  std::vector<Pair>& down_pairs = sc.down_pairs;
  std::vector<int64_t>& down_rows = sc.down_rows;
  down_pairs.resize(P), down_rows.resize(P);
  for (int64_t i = 0; i < P; ++i) down_pairs[i] = second[order[i]], down_rows[i] = order[i];
  project(dn, down_pairs, act.data(), down_rows, group, isa, yd.data(), sc);
  // the weighted sum per token, its experts in k order
  std::vector<int64_t>& row_of = sc.row_of;
  row_of.assign(T * K, -1);
  for (int64_t i = 0; i < P; ++i) row_of[down_pairs[i].t * K + down_pairs[i].k] = i;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = row_of[t * K + k];
      if (i < 0) continue;
      const float wk = w[t * K + k];
      for (int64_t c = 0; c < H; ++c) o[t * H + c] += yd[i * H + c] * wk;
    }
}

torch::Tensor moe_decode(torch::Tensor x, torch::Tensor topk_index, torch::Tensor topk_weights,
                         std::vector<torch::Tensor> gu_q, std::vector<torch::Tensor> gu_s, std::vector<torch::Tensor> gu_z,
                         std::vector<int64_t> gu_bits, torch::Tensor gu_map, std::vector<torch::Tensor> dn_q,
                         std::vector<torch::Tensor> dn_s, std::vector<torch::Tensor> dn_z, std::vector<int64_t> dn_bits,
                         torch::Tensor dn_map, int64_t group, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat, "x: contiguous float32 [T, H]");
  TORCH_CHECK(topk_index.scalar_type() == torch::kInt64 && topk_index.is_contiguous() && topk_index.dim() == 2 &&
              topk_index.size(0) == x.size(0), "top_k_index: contiguous int64 [T, K]");
  TORCH_CHECK(topk_weights.scalar_type() == torch::kFloat && topk_weights.is_contiguous() &&
              topk_weights.sizes() == topk_index.sizes(), "top_k_weights: contiguous float32 [T, K]");
  const MoeLayer L = moe_layer(gu_q, gu_s, gu_z, gu_bits, gu_map, dn_q, dn_s, dn_z, dn_bits, dn_map, group, isa);
  TORCH_CHECK(L.gu.groups[0].k == x.size(1), "x: [T, hidden] with gate_up's in_features");
  auto out = torch::empty({x.size(0), x.size(1)}, torch::kFloat);
  moe_decode_into(L, x.data_ptr<float>(), x.size(0), topk_index.data_ptr<int64_t>(), topk_weights.data_ptr<float>(),
                  topk_index.size(1), out.data_ptr<float>());
  return out;
}

}  // namespace mc_lowbit
