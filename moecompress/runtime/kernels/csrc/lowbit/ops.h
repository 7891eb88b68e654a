// What the torch-facing files of the low-bit module share (module.cpp defines these; moe.cpp uses them).
#pragma once
#include <torch/extension.h>
#include <array>
#include <vector>
#include "lowbit.h"

namespace mc_lowbit {

using DecodeFn = void (*)(const Weights&, const Acts&, int64_t, int64_t, int64_t, int64_t, int64_t, float*);

// The decode kernel of an Isa id (checked: one is built here).
DecodeFn decode_kernel(int64_t isa);

// One packed group's tensors as Weights (checked: dtypes, contiguity, shapes).
Weights weights(const torch::Tensor& qweight, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t bits,
                int64_t group);

// The lane of each input of a 32-input block for `bits` on `isa` (natural order on the portable kernels).
void lane_order(int64_t bits, int64_t isa, int order[32]);

// One group of `group` float inputs -> int8 at lanes `order` of each block; returns dx (= max|x| / 127), sets *isum.
float quantize_group(const float* src, int64_t group, const int* order, int8_t* dst, int32_t* isum);

// The MoE layer of a few tokens in one call (moe.cpp): x float32 [T, H] -> float32 [T, H].
torch::Tensor moe_decode(torch::Tensor x, torch::Tensor topk_index, torch::Tensor topk_weights,
                         std::vector<torch::Tensor> gu_q, std::vector<torch::Tensor> gu_s, std::vector<torch::Tensor> gu_z,
                         std::vector<int64_t> gu_bits, torch::Tensor gu_map, std::vector<torch::Tensor> dn_q,
                         std::vector<torch::Tensor> dn_s, std::vector<torch::Tensor> dn_z, std::vector<int64_t> dn_bits,
                         torch::Tensor dn_map, int64_t group, int64_t isa);

// One projection of a MoE layer as moe.cpp reads it: its groups (dense ones: only n, k and bits 16 set, their
// weights in `dense`), the map expert -> (group, slot) [E, 2] and each group's lane order.
struct MoeProj {
  std::vector<Weights> groups;
  std::vector<torch::Tensor> dense;
  const int64_t* map;
  int64_t experts;
  std::vector<std::array<int, 32>> orders;
};

struct MoeLayer {
  MoeProj gu, dn;
  int64_t group, isa;
};

// moe_decode's arguments, checked, read once (the tensors must outlive the MoeLayer).
MoeLayer moe_layer(const std::vector<torch::Tensor>& gu_q, const std::vector<torch::Tensor>& gu_s,
                   const std::vector<torch::Tensor>& gu_z, const std::vector<int64_t>& gu_bits, const torch::Tensor& gu_map,
                   const std::vector<torch::Tensor>& dn_q, const std::vector<torch::Tensor>& dn_s,
                   const std::vector<torch::Tensor>& dn_z, const std::vector<int64_t>& dn_bits, const torch::Tensor& dn_map,
                   int64_t group, int64_t isa);

// moe_decode on raw buffers: x [T, H], idx / w [T, K] -> out [T, H] (overwritten).
void moe_decode_into(const MoeLayer& L, const float* x, int64_t T, const int64_t* idx, const float* w, int64_t K,
                     float* out);

// The decode step of a whole model (step.cpp): its Python classes StepLinear and DecodeStep.
void bind_step(py::module& m);

// A 16-bit weight tensor's WType16 (checked: bfloat16 or float16) and its bits (gemm16.cpp).
int64_t type16(const torch::Tensor& w);
const uint16_t* bits16(const torch::Tensor& w);

// out[t] += sum over k of w[t, k] * rows[row_of[t, k]] (rows [P, H]; row_of -1: skipped), tokens in parallel, each
// token's experts in k order (moe_prefill.cpp; the packed and the 16-bit prefill calls share it).
void weighted_sum(const int64_t* row_of, const float* w, const float* rows, float* out, int64_t T, int64_t K,
                  int64_t H);

}  // namespace mc_lowbit
