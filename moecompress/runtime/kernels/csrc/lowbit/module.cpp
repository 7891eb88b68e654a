// The Python module of the low-bit kernels without AMX (built by runtime/kernels/cpu_lowbit.py): activation quantization,
// the decode kernels (int8 dot products) and the prefill path (dequantized tiles + GEMM), each ISA by its id.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include "ops.h"

namespace {
using namespace mc_lowbit;

using DequantFn = void (*)(const Weights&, int64_t, int64_t, int64_t, float*);
// By Isa id. The VNNI kernels dequantize tiles as AVX2 does (same block order).
#if defined(__x86_64__) || defined(_M_X64)
constexpr DecodeFn kDecode[] = {decode_portable, decode_avx2, decode_avx512_vnni};
constexpr DequantFn kDequant[] = {dequant_portable, dequant_avx2, dequant_avx2};
constexpr int64_t kIsas = 3;
#elif defined(__aarch64__)  // NEON + dotprod decode; its prefill tiles are the portable ones (block order: isa 0)
constexpr DecodeFn kDecode[] = {decode_portable, nullptr, nullptr, decode_neon_dotprod};
constexpr DequantFn kDequant[] = {dequant_portable, nullptr, nullptr, nullptr};
constexpr int64_t kIsas = 4;
#else  // other CPUs: the portable kernels only
constexpr DecodeFn kDecode[] = {decode_portable};
constexpr DequantFn kDequant[] = {dequant_portable};
constexpr int64_t kIsas = 1;
#endif
constexpr int64_t kDecodeRows = 64;  // weight rows per work unit of the decode kernels

struct SlotRows {  // slots int64 [S] (rows of the stacked weights), starts int64 [S + 1] (row offsets in x)
  const int64_t* slot;
  const int64_t* start;
  int64_t S;
  SlotRows(const torch::Tensor& slots, const torch::Tensor& starts, int64_t experts, int64_t rows) {
    TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.dim() == 1, "slots: int64 [S]");
    TORCH_CHECK(starts.scalar_type() == torch::kInt64 && starts.is_contiguous(), "starts: int64 [S + 1]");
    slot = slots.data_ptr<int64_t>(), start = starts.data_ptr<int64_t>(), S = slots.size(0);
    TORCH_CHECK(starts.numel() == S + 1 && start[0] == 0 && start[S] == rows, "starts: row offsets from 0 to R");
    for (int64_t i = 0; i < S; ++i) {
      TORCH_CHECK(slot[i] >= 0 && slot[i] < experts, "slot out of range");
      TORCH_CHECK(start[i] <= start[i + 1], "starts: non-decreasing");
    }
  }
};

void check_isa(int64_t isa, bool dequant = false) {
  TORCH_CHECK(isa >= 0 && isa < kIsas && (dequant ? kDequant[isa] != nullptr : kDecode[isa] != nullptr), "isa ", isa,
              " has no ", dequant ? "dequantization" : "decode", " kernel built here (0 portable, 1 avx2, 2 avx512_vnni on",
              " x86-64, 3 neon_dotprod decode on aarch64)");
}

}  // namespace

namespace mc_lowbit {

Weights weights(const torch::Tensor& qweight, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t bits,
                int64_t group) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits: 2, 3, 4 or 8");
  TORCH_CHECK(qweight.dim() == 3 && qweight.is_contiguous() && qweight.scalar_type() == torch::kUInt8,
              "qweight: contiguous uint8 [N, n, k*bits/8]");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == torch::kHalf, "scales: contiguous float16");
  const int64_t n = qweight.size(1), k = qweight.size(2) * 8 / bits;
  TORCH_CHECK(group % 32 == 0 && k % group == 0, "shapes: group a multiple of 32 dividing in_features");
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == qweight.size(0) && scales.size(1) == n && scales.size(2) == k / group,
              "scales: [N, n, k/group]");
  const bool symmetric = zeros.numel() == 0;
  TORCH_CHECK(symmetric || (zeros.is_contiguous() && zeros.scalar_type() == torch::kUInt8 && zeros.sizes() == scales.sizes()),
              "zeros: empty, or contiguous uint8 shaped like scales");
  return Weights{qweight.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                 symmetric ? nullptr : zeros.data_ptr<uint8_t>(), n, k, bits, group, k / group, qweight.size(2)};
}

DecodeFn decode_kernel(int64_t isa) {
  check_isa(isa);
  return kDecode[isa];
}

void lane_order(int64_t bits, int64_t isa, int order[32]) {
  for (int i = 0; i < 32; ++i) order[i] = isa == kPortable ? i : block_order(bits, i);
}

float quantize_group(const float* src, int64_t group, const int* order, int8_t* dst, int32_t* isum) {
  float amax = 0.f;
  for (int64_t i = 0; i < group; ++i) amax = std::max(amax, std::fabs(src[i]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t s = 0;
  for (int64_t i = 0; i < group; ++i) {
    const int v = static_cast<int>(std::nearbyint(src[i] * inv));
    const int c = std::min(127, std::max(-127, v));
    dst[(i / 32) * 32 + order[i % 32]] = static_cast<int8_t>(c);
    s += c;
  }
  *isum = s;
  return amax / 127.f;
}

}  // namespace mc_lowbit

// x float32 [R, k] -> (xq int8 [R, k] in the ISA's block order, dx float32 [R, k/group], isum int32 [R, k/group]):
// per row and group, dx = max|x| / 127, xq = round(x / dx) (half to even), isum = sum(xq).
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, int64_t group, int64_t bits, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat, "x: contiguous float32 [R, k]");
  const int64_t R = x.size(0), k = x.size(1);
  TORCH_CHECK(group % 32 == 0 && k % group == 0, "group: a multiple of 32 dividing k");
  const int64_t groups = k / group;
  auto xq = torch::empty({R, k}, torch::kChar);
  auto dx = torch::empty({R, groups}, torch::kFloat);
  auto isum = torch::empty({R, groups}, torch::kInt);
  int order[32];
  lane_order(bits, isa, order);
  const float* xs = x.data_ptr<float>();
  int8_t* q = xq.data_ptr<int8_t>();
  float* d = dx.data_ptr<float>();
  int32_t* sum = isum.data_ptr<int32_t>();
  at::parallel_for(0, R * groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u)  // row u / groups, group u % groups: contiguous in x
      d[u] = quantize_group(xs + u * group, group, order, q + u * group, sum + u);
  });
  return {xq, dx, isum};
}

// x float32 [R, k], rows sorted by slot -> float32 [R, n]: int8 x low-bit dot products per slot (decode).
torch::Tensor decode(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                     int64_t group, torch::Tensor slots, torch::Tensor starts, int64_t isa) {
  check_isa(isa);
  const Weights w = weights(qweight, scales, zeros, bits, group);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.k, "x: [R, in_features]");
  const SlotRows sl(slots, starts, qweight.size(0), x.size(0));
  auto y = torch::empty({x.size(0), w.n}, torch::kFloat);
  if (x.size(0) == 0) return y;
  const auto q = quantize_rows(x.contiguous(), group, bits, isa);
  const Acts a{q[0].data_ptr<int8_t>(), q[1].data_ptr<float>(), q[2].data_ptr<int32_t>(), w.k, w.groups};
  const int64_t blocks = (w.n + kDecodeRows - 1) / kDecodeRows;
  float* out = y.data_ptr<float>();
  const DecodeFn fn = kDecode[isa];
  at::parallel_for(0, sl.S * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t s = u / blocks, r0 = (u % blocks) * kDecodeRows, rows = sl.start[s + 1] - sl.start[s];
      if (rows) fn(w, a, sl.slot[s], r0, std::min(w.n, r0 + kDecodeRows), sl.start[s], rows, out);
    }
  });
  return y;
}

// Rows r0 .. r1 of slot `slot` dequantized, float32 [r1 - r0, k], in the ISA's block order (for the tests).
torch::Tensor dequant_tile(torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t bits, int64_t group,
                           int64_t slot, int64_t r0, int64_t r1, int64_t isa) {
  check_isa(isa, true);
  const Weights w = weights(qweight, scales, zeros, bits, group);
  TORCH_CHECK(slot >= 0 && slot < qweight.size(0) && 0 <= r0 && r0 <= r1 && r1 <= w.n, "slot / rows out of range");
  auto tile = torch::empty({r1 - r0, w.k}, torch::kFloat);
  kDequant[isa](w, slot, r0, r1, tile.data_ptr<float>());
  return tile;
}

// x [R, k] (float32 or bfloat16; its columns in the ISA's block order), rows sorted by slot -> [R, n] in x's dtype:
// per slot and strip of `tile_rows` weight rows, the strip is dequantized into a per-thread tile (float32, then x's
// dtype) and multiplied with at::mm (prefill). Each thread owns whole strips: the tile stays in its core's caches.
torch::Tensor tile_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                          int64_t group, torch::Tensor slots, torch::Tensor starts, int64_t isa, int64_t tile_rows) {
  check_isa(isa, true);
  const Weights w = weights(qweight, scales, zeros, bits, group);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == w.k, "x: contiguous [R, in_features]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, "x: float32 or bfloat16");
  TORCH_CHECK(tile_rows > 0, "tile_rows > 0");
  const SlotRows sl(slots, starts, qweight.size(0), x.size(0));
  auto y = torch::empty({x.size(0), w.n}, x.options());
  const int64_t strips = (w.n + tile_rows - 1) / tile_rows;
  const DequantFn fn = kDequant[isa];
  // Worker threads do not inherit inference mode; y may be an inference tensor, so carry the caller's mode over.
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, sl.S * strips, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard(inference);
    std::vector<float> buf(tile_rows * w.k);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t s = u / strips, r0 = (u % strips) * tile_rows, r1 = std::min(w.n, r0 + tile_rows);
      if (sl.start[s] == sl.start[s + 1]) continue;
      fn(w, sl.slot[s], r0, r1, buf.data());
      auto tile = torch::from_blob(buf.data(), {r1 - r0, w.k}, torch::kFloat);  // [strip, k]
      auto xs = x.narrow(0, sl.start[s], sl.start[s + 1] - sl.start[s]);
      auto part = torch::mm(xs, x.scalar_type() == torch::kFloat ? tile.t() : tile.to(x.scalar_type()).t());
      y.narrow(0, sl.start[s], xs.size(0)).narrow(1, r0, r1 - r0).copy_(part);
    }
  });
  return y;
}

// The order of a 32-input block's inputs in the SIMD kernels: lane of input i, int64 [32].
torch::Tensor block_order_tensor(int64_t bits) {
  auto t = torch::empty({32}, torch::kLong);
  for (int i = 0; i < 32; ++i) t[i] = block_order(bits, i);
  return t;
}

namespace mc_lowbit {  // the MoE layer of many tokens (moe_prefill.cpp): moe_decode's arguments and result
torch::Tensor moe_prefill(torch::Tensor x, torch::Tensor topk_index, torch::Tensor topk_weights,
                          std::vector<torch::Tensor> gu_q, std::vector<torch::Tensor> gu_s, std::vector<torch::Tensor> gu_z,
                          std::vector<int64_t> gu_bits, torch::Tensor gu_map, std::vector<torch::Tensor> dn_q,
                          std::vector<torch::Tensor> dn_s, std::vector<torch::Tensor> dn_z, std::vector<int64_t> dn_bits,
                          torch::Tensor dn_map, int64_t group, int64_t isa);
// the prefill GEMM (gemm.cpp): decode's arguments, gemm.h's kernel for slots of many rows
torch::Tensor prefill_q8(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                         int64_t group, torch::Tensor slots, torch::Tensor starts, int64_t isa);
int64_t prefill_gemm_min_rows(int64_t rows);
// 16-bit weights x float32 activations (gemm16.cpp, moe_prefill16.cpp): the prefill of bf16 / float16 models on CPUs
// without native bf16
torch::Tensor linear16(torch::Tensor x, torch::Tensor w, int64_t isa);
torch::Tensor moe_prefill16(torch::Tensor x, torch::Tensor topk_index, torch::Tensor topk_weights,
                            torch::Tensor gate_up, torch::Tensor down, int64_t isa);
}  // namespace mc_lowbit

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &quantize_rows, "x float32 [R, k] -> int8 per group (xq, dx, isum)");
  m.def("decode", &decode, "x @ W^T per slot with int8 activations (few rows per slot)");
  m.def("dequant_tile", &dequant_tile, "rows of one slot dequantized, float32, in the ISA's block order");
  m.def("tile_linear", &tile_linear, "x @ W^T per slot through dequantized tiles and at::mm (many rows per slot)");
  // without the GIL: the expert store's reading threads (runtime/store/) run Python while the layer computes
  m.def("moe_decode", &mc_lowbit::moe_decode, "a MoE layer of a few tokens: gate_up, silu(gate) * up, down, weighted sum",
        py::call_guard<py::gil_scoped_release>());
  m.def("moe_prefill", &mc_lowbit::moe_prefill, "a MoE layer of many tokens: moe_decode's work, every step threaded",
        py::call_guard<py::gil_scoped_release>());
  m.def("prefill_q8", &mc_lowbit::prefill_q8, "x @ W^T per slot with int8 activations, the GEMM for many rows",
        py::call_guard<py::gil_scoped_release>());
  m.def("prefill_gemm_min_rows", &mc_lowbit::prefill_gemm_min_rows,
        "rows from which the prefill GEMM runs (sets it; < 0 reads it); returns the value before");
  m.def("linear16", &mc_lowbit::linear16, "x float32 @ W^T, W bfloat16 / float16 [n, k]: the packed-panel FMA GEMM",
        py::call_guard<py::gil_scoped_release>());
  m.def("moe_prefill16", &mc_lowbit::moe_prefill16,
        "a MoE layer of many tokens, 16-bit fused experts gate_up [E, 2I, H] / down [E, H, I], float32 compute",
        py::call_guard<py::gil_scoped_release>());
  m.def("block_order", &block_order_tensor, "lane of each input of a 32-input block in the SIMD kernels");
  mc_lowbit::bind_step(m);  // the whole-model decode step (step.cpp)
}
