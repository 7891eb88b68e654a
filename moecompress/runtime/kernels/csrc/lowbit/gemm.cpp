// The prefill GEMM's dispatch and its torch op for PackedGroup (kernel_registry's q8 prefill kernel on AVX2): x @ W^T
// per slot with int8 activations, as module.cpp's `decode` but with gemm.h's kernel for slots of many rows.
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <vector>
#include "dense.h"
#include "gemm.h"
#include "ops.h"

namespace mc_lowbit {
namespace {
std::atomic<int64_t> min_rows{kGemmMinRows};
constexpr int64_t kUnitRows = 64;  // weight rows per work unit
}  // namespace

int64_t gemm_min_rows() { return min_rows.load(std::memory_order_relaxed); }

RowsFn prefill_kernel(int64_t isa, int64_t rows) {
  const DecodeFn fn = decode_kernel(isa);
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == kAvx2 && rows >= gemm_min_rows()) return gemm_avx2;
#endif
  return fn;
}

bool simd_isa(int64_t isa) {
#if defined(__x86_64__) || defined(_M_X64)
  return isa == kAvx2 || isa == kAvx512Vnni;
#else
  return false;
#endif
}

QuantizeFn quantize_fn(int64_t isa) { return simd_isa(isa) ? quantize_group_avx2 : quantize_group; }

// Sets the x rows from which prefill_kernel takes the GEMM (a negative value only reads it); returns the old value.
int64_t prefill_gemm_min_rows(int64_t rows) {
  return rows < 0 ? gemm_min_rows() : min_rows.exchange(rows);
}

torch::Tensor prefill_q8(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                         int64_t group, torch::Tensor slots, torch::Tensor starts, int64_t isa) {
  decode_kernel(isa);  // checks the ISA
  const Weights w = weights(qweight, scales, zeros, bits, group);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.k && x.scalar_type() == torch::kFloat, "x: float32 [R, in_features]");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.dim() == 1 &&
              starts.scalar_type() == torch::kInt64 && starts.is_contiguous() && starts.numel() == slots.numel() + 1,
              "slots: int64 [S], starts: int64 [S + 1]");
  const int64_t S = slots.size(0), R = x.size(0);
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  TORCH_CHECK(start[0] == 0 && start[S] == R, "starts: row offsets from 0 to R");
  for (int64_t i = 0; i < S; ++i)
    TORCH_CHECK(slot[i] >= 0 && slot[i] < qweight.size(0) && start[i] <= start[i + 1], "slot out of range or starts decreasing");
  auto y = torch::empty({R, w.n}, torch::kFloat);
  if (R == 0) return y;
  // x quantized per group, in the lane order of the ISA's kernels (as module.cpp's quantize_rows, with AVX2)
  std::vector<int8_t> xq(R * w.k);
  std::vector<float> dx(R * w.groups);
  std::vector<int32_t> isum(R * w.groups);
  int order[32];
  lane_order(bits, isa, order);
  const QuantizeFn quantize = quantize_fn(isa);
  const auto xc = x.contiguous();
  const float* xs = xc.data_ptr<float>();
  at::parallel_for(0, R * w.groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u)  // row u / groups, group u % groups: contiguous in x
      dx[u] = quantize(xs + u * group, group, order, xq.data() + u * group, isum.data() + u);
  });
  const Acts a{xq.data(), dx.data(), isum.data(), w.k, w.groups};
  const int64_t blocks = (w.n + kUnitRows - 1) / kUnitRows;
  float* out = y.data_ptr<float>();
  at::parallel_for(0, S * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t s = u / blocks, r0 = (u % blocks) * kUnitRows, rows = start[s + 1] - start[s];
      if (rows) prefill_kernel(isa, rows)(w, a, slot[s], r0, std::min(w.n, r0 + kUnitRows), start[s], rows, out);
    }
  });
  return y;
}

}  // namespace mc_lowbit
