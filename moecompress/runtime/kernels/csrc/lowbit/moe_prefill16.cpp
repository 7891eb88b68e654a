// The MoE layer of many tokens (prefill) in one call for 16-bit experts: transformers' fused tensors gate_up
// [E, 2I, H] and down [E, H, I] (bfloat16 / float16, read in place), through gemm16.h's GEMM, for CPUs without native
// bf16 compute (runtime/experts/cpu_prefill16.py decides where).
//
// As moe_prefill.cpp: the (token, k) pairs sorted by expert (counting sort, tokens in order within an expert), the
// tokens' float32 rows gathered per pair; (expert, block of kUnit16 weight rows) units across the threads for
// gate_up, silu(gate) * up per pair, the same units for down; the weighted sum per token, its experts in k order
// (deterministic whatever the thread count). Float32 throughout.
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>
#include "dense.h"
#include "gemm.h"
#include "gemm16.h"
#include "ops.h"

namespace mc_lowbit {
namespace {

// Pairs [P] sorted by expert, starts[e] .. starts[e + 1] those of expert e; x [P, k] -> y [P, n] per expert.
void run16(Gemm16Fn fn, const uint16_t* w, int64_t type, int64_t n, int64_t k, const std::vector<int64_t>& starts,
           const float* x, float* y) {
  const int64_t E = static_cast<int64_t>(starts.size()) - 1, blocks = (n + kUnit16 - 1) / kUnit16;
  std::vector<int64_t> used;  // experts with pairs
  for (int64_t e = 0; e < E; ++e)
    if (starts[e + 1] > starts[e]) used.push_back(e);
  at::parallel_for(0, static_cast<int64_t>(used.size()) * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t e = used[u / blocks], r0 = (u % blocks) * kUnit16, first = starts[e];
      fn(x + first * k, k, starts[e + 1] - first, w + e * n * k, type, k, r0, std::min(n, r0 + kUnit16),
         y + first * n, n);
    }
  });
}

}  // namespace

torch::Tensor moe_prefill16(torch::Tensor x, torch::Tensor topk_index, torch::Tensor topk_weights,
                            torch::Tensor gate_up, torch::Tensor down, int64_t isa) {
  const Gemm16Fn fn = gemm16_kernel(isa);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat, "x: contiguous float32 [T, H]");
  TORCH_CHECK(topk_index.scalar_type() == torch::kInt64 && topk_index.is_contiguous() && topk_index.dim() == 2 &&
              topk_index.size(0) == x.size(0), "top_k_index: contiguous int64 [T, K]");
  TORCH_CHECK(topk_weights.scalar_type() == torch::kFloat && topk_weights.is_contiguous() &&
              topk_weights.sizes() == topk_index.sizes(), "top_k_weights: contiguous float32 [T, K]");
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3 && gate_up.is_contiguous() && down.is_contiguous(),
              "gate_up [E, 2I, H], down [E, H, I]: contiguous");
  const int64_t type = type16(gate_up);
  TORCH_CHECK(down.scalar_type() == gate_up.scalar_type(), "gate_up and down: one dtype");
  const int64_t T = x.size(0), K = topk_index.size(1), H = x.size(1), E = gate_up.size(0), N1 = gate_up.size(1),
                I = down.size(2);
  TORCH_CHECK(gate_up.size(2) == H && N1 == 2 * I && down.size(0) == E && down.size(1) == H,
              "shapes: gate_up [E, 2I, H], down [E, H, I]");
  auto out = torch::zeros({T, H}, torch::kFloat);
  const int64_t* idx = topk_index.data_ptr<int64_t>();
  std::vector<int64_t> starts(E + 1, 0);  // counting sort of the pairs by expert (ids outside [0, E): skipped)
  for (int64_t i = 0; i < T * K; ++i)
    if (idx[i] >= 0 && idx[i] < E) ++starts[idx[i] + 1];
  for (int64_t e = 0; e < E; ++e) starts[e + 1] += starts[e];
  const int64_t P = starts[E];
  if (P == 0) return out;
  std::vector<int64_t> pair(P), row_of(T * K, -1), fill(starts.begin(), starts.end() - 1);
  for (int64_t i = 0; i < T * K; ++i)
    if (idx[i] >= 0 && idx[i] < E) {
      const int64_t j = fill[idx[i]]++;
      pair[j] = i, row_of[i] = j;
    }
  const float* xs = x.data_ptr<float>();
  std::vector<float> xg(P * H);
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) std::memcpy(&xg[j * H], xs + (pair[j] / K) * H, H * sizeof(float));
  });
  std::vector<float> h(P * N1);
  run16(fn, bits16(gate_up), type, N1, H, starts, xg.data(), h.data());
  std::vector<float>().swap(xg);
  std::vector<float> act(P * I);
  const bool simd = simd_isa(isa);
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j)
      (simd ? silu_mul_avx2 : silu_mul_portable)(&h[j * N1], &h[j * N1 + I], &act[j * I], I);
  });
  std::vector<float>().swap(h);
  std::vector<float> yd(P * H);
  run16(fn, bits16(down), type, H, I, starts, act.data(), yd.data());
  const float* w = topk_weights.data_ptr<float>();
  float* o = out.data_ptr<float>();
  weighted_sum(row_of.data(), w, yd.data(), o, T, K, H);
  return out;
}

}  // namespace mc_lowbit
