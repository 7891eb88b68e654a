// The whole decode step of a MoE transformer in one C++ call (runtime/cpu_step/): for B tokens (one per sequence, at
// one cache slot, each at its own RoPE position) embedding -> per layer RMSNorm, q/k/v, q/k norm, RoPE, the KV cache
// write, grouped-query attention over the cached slots the mask allows, o_proj + residual, RMSNorm, router (softmax,
// top-k, optional renormalisation), the experts (moe_decode, moe.cpp) and an optional sigmoid-gated shared expert,
// residual -> final norm -> lm_head. Everything in float32, no Python between the ops.
//
// Linears are packed (2/3/4/8-bit, one slot: the q8 decode kernels of the low-bit module, int8 activations) or dense
// (float32 / bfloat16 weights: dense.h's GEMV), with an optional float32 bias. Work is threaded with at::parallel_for
// where it is large enough to pay for the threads (kMinParallelWork multiply-adds).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>
#include "dense.h"
#include "ops.h"

namespace mc_lowbit {
namespace {

constexpr int64_t kRowsPerUnit = 64;         // output rows per work unit of a linear
constexpr int64_t kMinParallelWork = 1 << 16;  // multiply-adds below which a loop stays on the calling thread

template <typename F>
void maybe_parallel(int64_t units, int64_t work_per_unit, const F& f) {
  if (units * work_per_unit < kMinParallelWork || units < 2) {
    f(0, units);
  } else {
    at::parallel_for(0, units, 1, f);
  }
}

torch::Tensor float_vector(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.numel() == n, what, ": float32 [", n, "]");
  return t;
}

}  // namespace

// What a scratch of int8 rows holds: the float rows it came from, and how (lane order, group, ISA).
struct QuantizedRows {
  const float* src = nullptr;
  int64_t rows = 0, lanes = -1, group = 0, isa = -1;
  bool operator==(const QuantizedRows& o) const {
    return src == o.src && rows == o.rows && lanes == o.lanes && group == o.group && isa == o.isa;
  }
};

// Bit-widths with the same lane order of a block share quantized rows (the portable kernels: natural order).
int64_t lane_bits(int64_t bits, int64_t isa) {
  int order[32];
  lane_order(bits, isa, order);
  int64_t key = 0;
  for (int i = 0; i < 32; ++i) key = key * 31 + order[i];
  return key;
}

// One linear of the step: packed (qweight uint8 [1, n, k*bits/8], scales float16 / zeros uint8 [1, n, k/group]) or
// dense (float32 / bfloat16 [n, k]); bias float32 [n] or empty.
struct StepLinear {
  torch::Tensor qweight, scales, zeros, dense, bias;
  Weights w{};
  DecodeFn fn = nullptr;
  int64_t isa = 0, n = 0, k = 0, lanes = -1;
  bool packed = false, simd = false;

  StepLinear(torch::Tensor qweight_, torch::Tensor scales_, torch::Tensor zeros_, int64_t bits, int64_t group,
             int64_t isa_, torch::Tensor dense_, torch::Tensor bias_, bool simd_)
      : qweight(qweight_), scales(scales_), zeros(zeros_), dense(dense_), bias(bias_), isa(isa_), simd(simd_) {
    packed = qweight.numel() > 0;
    if (packed) {
      w = weights(qweight, scales, zeros, bits, group);
      TORCH_CHECK(qweight.size(0) == 1, "a packed linear is one slot: qweight [1, n, k*bits/8]");
      fn = decode_kernel(isa);
      n = w.n, k = w.k, lanes = lane_bits(w.bits, isa);
    } else {
      TORCH_CHECK(dense.dim() == 2 && dense.is_contiguous() &&
                  (dense.scalar_type() == torch::kFloat || dense.scalar_type() == torch::kBFloat16),
                  "a dense linear: contiguous float32 or bfloat16 [n, k]");
      n = dense.size(0), k = dense.size(1);
    }
    if (bias.numel()) float_vector(bias, n, "bias");
#if !(defined(__x86_64__) || defined(_M_X64))
    simd = false;
#endif
  }

  // y [B, n] = x [B, k] @ W^T (+ bias). xq / dx / isum: scratch of at least B * k, B * k / 32, B * k / 32.
  // reuse: what the scratch holds (x's int8 rows, for a bit-width / group / ISA), kept when they match (q, k, v
  // read the same rows) and updated otherwise; nullptr: quantize.
  void apply(const float* x, int64_t B, float* y, std::vector<int8_t>& xq, std::vector<float>& dx,
             std::vector<int32_t>& isum, QuantizedRows* reuse = nullptr) const {
    const int64_t blocks = (n + kRowsPerUnit - 1) / kRowsPerUnit;
    if (packed) {
      const QuantizedRows now{x, B, lanes, w.group, isa};
      if (!(reuse && *reuse == now)) {
        int order[32];
        lane_order(w.bits, isa, order);
        for (int64_t r = 0; r < B; ++r)
          for (int64_t g = 0; g < w.groups; ++g)
            dx[r * w.groups + g] = quantize_group(x + r * k + g * w.group, w.group, order,
                                                  xq.data() + r * k + g * w.group, isum.data() + r * w.groups + g);
        if (reuse) *reuse = now;
      }
      const Acts a{xq.data(), dx.data(), isum.data(), k, w.groups};
      maybe_parallel(blocks, kRowsPerUnit * k * B, [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) fn(w, a, 0, u * kRowsPerUnit, std::min(n, (u + 1) * kRowsPerUnit), 0, B, y);
      });
    } else {
      const bool bf16 = dense.scalar_type() == torch::kBFloat16;
      const void* wp = dense.data_ptr();
      maybe_parallel(blocks, kRowsPerUnit * k * B, [&](int64_t begin, int64_t end) {
        const int64_t r0 = begin * kRowsPerUnit, r1 = std::min(n, end * kRowsPerUnit);
        if (bf16) {
          const auto* p = static_cast<const uint16_t*>(wp);
          (simd ? gemv_bf16_avx2 : gemv_bf16_portable)(p, r0, r1, k, x, B, y, n);
        } else {
          const auto* p = static_cast<const float*>(wp);
          (simd ? gemv_f32_avx2 : gemv_f32_portable)(p, r0, r1, k, x, B, y, n);
        }
      });
    }
    if (bias.numel()) {
      const float* b = bias.data_ptr<float>();
      for (int64_t r = 0; r < B; ++r)
        for (int64_t c = 0; c < n; ++c) y[r * n + c] += b[c];
    }
  }
};

using LinearPtr = std::shared_ptr<StepLinear>;

struct StepLayer {
  LinearPtr q, k, v, o, router;
  torch::Tensor in_norm, post_norm, q_norm, k_norm;  // float32; q_norm / k_norm empty: none
  std::vector<torch::Tensor> gu_q, gu_s, gu_z, dn_q, dn_s, dn_z;
  std::vector<int64_t> gu_bits, dn_bits;
  torch::Tensor gu_map, dn_map;
  int64_t group = 0, isa = 0;
  LinearPtr sh_gate, sh_up, sh_down, sh_scalar;  // shared expert (all or none); sh_scalar [1, H]: sigmoid gate
};

class DecodeStep {
 public:
  // embed [V, H] float32 / bfloat16; final_norm float32 [H]; head: lm_head; cos / sin float32 [positions, D];
  // k_cache / v_cache float32 [layers, B, kv_heads, S, D]; mask uint8 [B, S] (1: the slot is attended to).
  // qk_norm: 0 none, 1 per head (Qwen3), 2 over the whole projection (OLMoE). clip_qkv <= 0: none.
  DecodeStep(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t top_k, bool norm_topk, double eps,
             double scaling, double clip_qkv, int64_t qk_norm, torch::Tensor embed, torch::Tensor final_norm,
             LinearPtr head, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
             torch::Tensor mask)
      : NH(heads), NKV(kv_heads), D(head_dim), K(top_k), norm_topk(norm_topk), eps(static_cast<float>(eps)),
        scaling(static_cast<float>(scaling)), clip(static_cast<float>(clip_qkv)), qk_norm(qk_norm), embed(embed),
        final_norm(final_norm), head(head), cos(cos), sin(sin), k_cache(k_cache), v_cache(v_cache), mask(mask) {
    TORCH_CHECK(embed.dim() == 2 && embed.is_contiguous() &&
                (embed.scalar_type() == torch::kFloat || embed.scalar_type() == torch::kBFloat16),
                "embed: contiguous float32 / bfloat16 [V, H]");
    H = embed.size(1);
    float_vector(final_norm, H, "final_norm");
    TORCH_CHECK(head->k == H, "lm_head: in_features == hidden");
    TORCH_CHECK(NH % NKV == 0 && D % 2 == 0, "heads a multiple of kv_heads, head_dim even");
    TORCH_CHECK(cos.scalar_type() == torch::kFloat && cos.is_contiguous() && cos.dim() == 2 && cos.size(1) == D &&
                sin.sizes() == cos.sizes() && sin.is_contiguous() && sin.scalar_type() == torch::kFloat,
                "cos / sin: contiguous float32 [positions, head_dim]");
    TORCH_CHECK(k_cache.scalar_type() == torch::kFloat && k_cache.is_contiguous() && k_cache.dim() == 5 &&
                k_cache.size(2) == NKV && k_cache.size(4) == D && v_cache.sizes() == k_cache.sizes() &&
                v_cache.is_contiguous() && v_cache.scalar_type() == torch::kFloat,
                "k_cache / v_cache: contiguous float32 [layers, B, kv_heads, S, head_dim]");
    B = k_cache.size(1), S = k_cache.size(3);
    TORCH_CHECK(B >= 1 && B <= 8, "batch: 1 to 8 sequences");
    TORCH_CHECK(mask.scalar_type() == torch::kUInt8 && mask.is_contiguous() && mask.dim() == 2 && mask.size(0) == B &&
                mask.size(1) == S, "mask: contiguous uint8 [B, S]");
  }

  void add_layer(LinearPtr q, LinearPtr k, LinearPtr v, LinearPtr o, LinearPtr router, torch::Tensor in_norm,
                 torch::Tensor post_norm, torch::Tensor q_norm, torch::Tensor k_norm, std::vector<torch::Tensor> gu_q,
                 std::vector<torch::Tensor> gu_s, std::vector<torch::Tensor> gu_z, std::vector<int64_t> gu_bits,
                 torch::Tensor gu_map, std::vector<torch::Tensor> dn_q, std::vector<torch::Tensor> dn_s,
                 std::vector<torch::Tensor> dn_z, std::vector<int64_t> dn_bits, torch::Tensor dn_map, int64_t group,
                 int64_t isa, std::vector<LinearPtr> shared) {
    TORCH_CHECK(static_cast<int64_t>(layers.size()) < k_cache.size(0), "more layers than the KV cache holds");
    TORCH_CHECK(q->k == H && k->k == H && v->k == H && router->k == H && o->n == H, "linears: hidden in / out");
    TORCH_CHECK(q->n == NH * D && k->n == NKV * D && v->n == NKV * D && o->k == NH * D, "q/k/v/o: head shapes");
    TORCH_CHECK(router->n == gu_map.size(0) && K <= router->n, "router: one output per expert, top_k <= experts");
    float_vector(in_norm, H, "input norm");
    float_vector(post_norm, H, "post-attention norm");
    if (qk_norm == 1) float_vector(q_norm, D, "q_norm"), float_vector(k_norm, D, "k_norm");
    if (qk_norm == 2) float_vector(q_norm, NH * D, "q_norm"), float_vector(k_norm, NKV * D, "k_norm");
    TORCH_CHECK(shared.empty() || shared.size() == 4, "shared expert: gate, up, down, sigmoid gate");
    StepLayer L{q, k, v, o, router, in_norm, post_norm, q_norm, k_norm, gu_q, gu_s, gu_z, dn_q, dn_s, dn_z,
                gu_bits, dn_bits, gu_map, dn_map, group, isa};
    if (!shared.empty()) {
      L.sh_gate = shared[0], L.sh_up = shared[1], L.sh_down = shared[2], L.sh_scalar = shared[3];
      TORCH_CHECK(L.sh_gate->k == H && L.sh_up->k == H && L.sh_up->n == L.sh_gate->n && L.sh_down->k == L.sh_gate->n &&
                  L.sh_down->n == H && L.sh_scalar->k == H && L.sh_scalar->n == 1, "shared expert shapes");
    }
    layers.push_back(std::move(L));
  }

  // ids int64 [B], positions int64 [B] (RoPE), the cache slot written and attended up to -> logits float32 [B, V].
  torch::Tensor forward(torch::Tensor ids, torch::Tensor positions, int64_t slot) {
    TORCH_CHECK(static_cast<int64_t>(layers.size()) == k_cache.size(0), "the step has ", layers.size(), " of ",
                k_cache.size(0), " layers");
    TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.is_contiguous() && ids.numel() == B, "ids: int64 [B]");
    TORCH_CHECK(positions.scalar_type() == torch::kLong && positions.is_contiguous() && positions.numel() == B,
                "positions: int64 [B]");
    TORCH_CHECK(slot >= 0 && slot < S, "slot ", slot, " outside the cache of ", S);
    const int64_t* id = ids.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t V = embed.size(0);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(id[b] >= 0 && id[b] < V, "token id out of range");
      TORCH_CHECK(pos[b] >= 0 && pos[b] < cos.size(0), "position outside the RoPE table");
    }
    size_t widest = static_cast<size_t>(std::max({H, NH * D, head->n}));
    for (const auto& L : layers) {
      widest = std::max(widest, static_cast<size_t>(L.router->n));
      if (L.sh_gate) widest = std::max(widest, static_cast<size_t>(L.sh_gate->n));
    }
    x.assign(B * H, 0.f), h.resize(B * widest), q.resize(B * NH * D), kk.resize(B * NKV * D), vv.resize(B * NKV * D);
    att.resize(B * NH * D), tmp.resize(B * widest), tmp2.resize(B * widest), xq.resize(B * widest);
    dx.resize(B * widest / 32 + B), isum.resize(B * widest / 32 + B);
    for (int64_t b = 0; b < B; ++b) {  // embedding rows
      if (embed.scalar_type() == torch::kFloat) {
        std::memcpy(&x[b * H], embed.data_ptr<float>() + id[b] * H, H * sizeof(float));
      } else {
        const auto* e = reinterpret_cast<const uint16_t*>(embed.data_ptr<at::BFloat16>()) + id[b] * H;
        for (int64_t c = 0; c < H; ++c) x[b * H + c] = bf16_value(e[c]);
      }
    }
    uint8_t* m = mask.data_ptr<uint8_t>();
    for (int64_t b = 0; b < B; ++b) m[b * S + slot] = 1;
    for (int64_t l = 0; l < static_cast<int64_t>(layers.size()); ++l) layer(l, layers[l], pos, slot);
    for (int64_t b = 0; b < B; ++b) rms_norm(&x[b * H], H, final_norm.data_ptr<float>(), &h[b * H]);
    auto logits = torch::empty({B, head->n}, torch::kFloat);
    head->apply(h.data(), B, logits.data_ptr<float>(), xq, dx, isum);
    return logits;
  }

 private:
  int64_t NH, NKV, D, K;
  bool norm_topk;
  float eps, scaling, clip;
  int64_t qk_norm;
  torch::Tensor embed, final_norm;
  LinearPtr head;
  torch::Tensor cos, sin, k_cache, v_cache, mask;
  int64_t H = 0, B = 0, S = 0;
  std::vector<StepLayer> layers;
  std::vector<float> x, h, q, kk, vv, att, tmp, tmp2, dx;
  std::vector<int8_t> xq;
  std::vector<int32_t> isum;

  void rms_norm(const float* src, int64_t n, const float* weight, float* dst) const {
    float ss = 0.f;
    for (int64_t i = 0; i < n; ++i) ss += src[i] * src[i];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) dst[i] = weight[i] * (src[i] * r);
  }

  void rope(float* v, const float* c, const float* s) const {  // x * cos + rotate_half(x) * sin, one head
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * c[i] - b * s[i];
      v[i + half] = b * c[i + half] + a * s[i + half];
    }
  }

  void layer(int64_t l, const StepLayer& L, const int64_t* pos, int64_t slot) {
    for (int64_t b = 0; b < B; ++b) rms_norm(&x[b * H], H, L.in_norm.data_ptr<float>(), &h[b * H]);
    QuantizedRows held;  // q, k and v read the same rows: quantized once where their kernels agree
    L.q->apply(h.data(), B, q.data(), xq, dx, isum, &held);
    L.k->apply(h.data(), B, kk.data(), xq, dx, isum, &held);
    L.v->apply(h.data(), B, vv.data(), xq, dx, isum, &held);
    if (clip > 0.f) {
      for (auto* vec : {&q, &kk, &vv})
        for (auto& e : *vec) e = std::min(clip, std::max(-clip, e));
    }
    if (qk_norm == 1) {
      for (int64_t i = 0; i < B * NH; ++i) rms_norm(&q[i * D], D, L.q_norm.data_ptr<float>(), &q[i * D]);
      for (int64_t i = 0; i < B * NKV; ++i) rms_norm(&kk[i * D], D, L.k_norm.data_ptr<float>(), &kk[i * D]);
    } else if (qk_norm == 2) {
      for (int64_t b = 0; b < B; ++b) {
        rms_norm(&q[b * NH * D], NH * D, L.q_norm.data_ptr<float>(), &q[b * NH * D]);
        rms_norm(&kk[b * NKV * D], NKV * D, L.k_norm.data_ptr<float>(), &kk[b * NKV * D]);
      }
    }
    float* kc = k_cache.data_ptr<float>() + l * B * NKV * S * D;
    float* vc = v_cache.data_ptr<float>() + l * B * NKV * S * D;
    for (int64_t b = 0; b < B; ++b) {
      const float* c = cos.data_ptr<float>() + pos[b] * D;
      const float* s = sin.data_ptr<float>() + pos[b] * D;
      for (int64_t hh = 0; hh < NH; ++hh) rope(&q[(b * NH + hh) * D], c, s);
      for (int64_t g = 0; g < NKV; ++g) {
        rope(&kk[(b * NKV + g) * D], c, s);
        std::memcpy(kc + ((b * NKV + g) * S + slot) * D, &kk[(b * NKV + g) * D], D * sizeof(float));
        std::memcpy(vc + ((b * NKV + g) * S + slot) * D, &vv[(b * NKV + g) * D], D * sizeof(float));
      }
    }
    attention(kc, vc, slot);
    L.o->apply(att.data(), B, tmp.data(), xq, dx, isum);
    for (int64_t i = 0; i < B * H; ++i) x[i] += tmp[i];
    for (int64_t b = 0; b < B; ++b) rms_norm(&x[b * H], H, L.post_norm.data_ptr<float>(), &h[b * H]);
    moe(L);
    if (L.sh_gate) shared(L);
  }

  void attention(const float* kc, const float* vc, int64_t slot) {
    const uint8_t* m = mask.data_ptr<uint8_t>();
    const int64_t groups = NH / NKV, n = slot + 1;
    const bool simd = head->simd && D % 8 == 0;
    maybe_parallel(B * NH, 2 * n * D, [&](int64_t begin, int64_t end) {
      std::vector<float> p(n);
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / NH, hh = u % NH, g = hh / groups;
        const float* kb = kc + (b * NKV + g) * S * D;
        const float* vb = vc + (b * NKV + g) * S * D;
        (simd ? attend_avx2 : attend_portable)(&q[(b * NH + hh) * D], kb, vb, m + b * S, n, D, scaling, p.data(),
                                               &att[(b * NH + hh) * D]);
      }
    });
  }

  void moe(const StepLayer& L) {
    const int64_t E = L.router->n;
    L.router->apply(h.data(), B, tmp.data(), xq, dx, isum);  // router logits [B, E]
    auto idx = torch::empty({B, K}, torch::kLong);
    auto wts = torch::empty({B, K}, torch::kFloat);
    int64_t* ip = idx.data_ptr<int64_t>();
    float* wp = wts.data_ptr<float>();
    std::vector<int64_t> order(E);
    for (int64_t b = 0; b < B; ++b) {
      float* p = &tmp[b * E];
      const float mx = *std::max_element(p, p + E);
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(p[e] - mx));
      for (int64_t e = 0; e < E; ++e) p[e] /= sum;
      for (int64_t e = 0; e < E; ++e) order[e] = e;
      std::partial_sort(order.begin(), order.begin() + K, order.end(),
                        [&](int64_t a, int64_t c) { return p[a] > p[c] || (p[a] == p[c] && a < c); });
      float top = 0.f;
      for (int64_t j = 0; j < K; ++j) top += p[order[j]];
      for (int64_t j = 0; j < K; ++j) ip[b * K + j] = order[j], wp[b * K + j] = norm_topk ? p[order[j]] / top : p[order[j]];
    }
    auto hin = torch::from_blob(h.data(), {B, H}, torch::kFloat);
    auto y = moe_decode(hin, idx, wts, L.gu_q, L.gu_s, L.gu_z, L.gu_bits, L.gu_map, L.dn_q, L.dn_s, L.dn_z,
                        L.dn_bits, L.dn_map, L.group, L.isa);
    const float* yp = y.data_ptr<float>();
    for (int64_t i = 0; i < B * H; ++i) x[i] += yp[i];
  }

  void shared(const StepLayer& L) {  // Qwen2-MoE: sigmoid(h @ g^T) * down(silu(gate(h)) * up(h))
    const int64_t I = L.sh_gate->n;
    std::vector<float> up(B * I), act(B * H), gate(B);
    L.sh_gate->apply(h.data(), B, tmp.data(), xq, dx, isum);
    L.sh_up->apply(h.data(), B, up.data(), xq, dx, isum);
    for (int64_t i = 0; i < B * I; ++i) tmp[i] = tmp[i] / (1.f + std::exp(-tmp[i])) * up[i];
    L.sh_down->apply(tmp.data(), B, act.data(), xq, dx, isum);
    L.sh_scalar->apply(h.data(), B, gate.data(), xq, dx, isum);
    for (int64_t b = 0; b < B; ++b) {
      const float g = 1.f / (1.f + std::exp(-gate[b]));
      for (int64_t c = 0; c < H; ++c) x[b * H + c] += g * act[b * H + c];
    }
  }
};

void bind_step(py::module& m) {
  // module_local: two builds of this module (other sources, other names) can live in one process
  py::class_<StepLinear, LinearPtr>(m, "StepLinear", py::module_local())
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t, int64_t, torch::Tensor, torch::Tensor,
                    bool>())
      .def_readonly("n", &StepLinear::n)
      .def_readonly("k", &StepLinear::k)
      .def_readonly("packed", &StepLinear::packed)
      .def("__call__", [](const StepLinear& lin, torch::Tensor x) {  // x float32 [B, k] -> [B, n] (tests)
        TORCH_CHECK(x.dim() == 2 && x.size(1) == lin.k && x.scalar_type() == torch::kFloat, "x: float32 [B, k]");
        auto xc = x.contiguous();
        const int64_t B = x.size(0);
        auto y = torch::empty({B, lin.n}, torch::kFloat);
        std::vector<int8_t> xq(B * lin.k);
        std::vector<float> dx(B * lin.k / 32 + 1);
        std::vector<int32_t> isum(B * lin.k / 32 + 1);
        lin.apply(xc.data_ptr<float>(), B, y.data_ptr<float>(), xq, dx, isum);
        return y;
      }, py::call_guard<py::gil_scoped_release>());
  py::class_<DecodeStep>(m, "DecodeStep", py::module_local())
      .def(py::init<int64_t, int64_t, int64_t, int64_t, bool, double, double, double, int64_t, torch::Tensor,
                    torch::Tensor, LinearPtr, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>())
      .def("add_layer", &DecodeStep::add_layer)
      .def("forward", &DecodeStep::forward, py::call_guard<py::gil_scoped_release>());
}

}  // namespace mc_lowbit
