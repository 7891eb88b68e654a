// The whole decode step of a MoE transformer in one C++ call (runtime/cpu_step/): for B tokens (one per sequence, at
// one cache slot, each at its own RoPE position) embedding -> per layer RMSNorm, q/k/v, q/k norm, RoPE, the KV cache
// write, grouped-query attention over the cached slots the mask allows, o_proj + residual, RMSNorm, router (softmax,
// top-k, optional renormalisation), the experts (moe_decode, moe.cpp) and an optional sigmoid-gated shared expert,
// residual -> final norm -> lm_head. Everything in float32, no Python between the ops.
//
// Linears are packed (2/3/4/8-bit, one slot: the q8 decode kernels of the low-bit module, int8 activations) or dense
// (float32 / bfloat16 weights: dense.h's GEMV), with an optional float32 bias. Work is threaded with at::parallel_for
// where it is large enough to pay for the threads (kMinParallelWork multiply-adds); q, k and v share one parallel
// loop (and one int8 quantization of their input where their kernels read the same lane order).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <cstring>
#include <memory>
#include <vector>
#include "dense.h"
#include "ops.h"

namespace mc_lowbit {
namespace {

constexpr int64_t kRowsPerUnit = 64;         // output rows per work unit of a linear
constexpr int64_t kMinParallelWork = 1 << 17;  // multiply-adds below which a loop stays on the calling thread

template <typename F>
void maybe_parallel(int64_t units, int64_t work_per_unit, const F& f, int64_t min_work = kMinParallelWork) {
  if (units * work_per_unit < min_work || units < 2) {
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

// Where a step's time goes (profiling, off by default): DecodeStep.set_profile(1: wall time, 2: the calling thread's
// CPU time), then .profile() -> {part: (seconds, bytes of weights / cache read)}. Each lap charges the time since the
// previous one to a part.
enum Part : int { kEmbed, kNorm, kQkv, kRope, kAttention, kOproj, kRouter, kExperts, kShared, kHead, kParts };
constexpr const char* kPartNames[kParts] = {"embed", "norms", "qkv", "qk_norm_rope_cache", "attention", "o_proj",
                                            "router", "experts", "shared", "lm_head"};

struct PartClock {
  int mode = 0;  // 0 off, 1 wall, 2 thread CPU time
  int64_t steps = 0;
  double sec[kParts] = {}, bytes[kParts] = {}, last = 0.;
  double now() const {
    if (mode == 1) return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  }
  void start() {
    if (mode) last = now(), ++steps;
  }
  void lap(Part p, double read = 0.) {
    if (!mode) return;
    const double t = now();
    sec[p] += t - last, bytes[p] += read, last = t;
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

// Room for x's int8 rows (a packed linear's Acts point into it).
struct Scratch {
  std::vector<int8_t> xq;
  std::vector<float> dx;
  std::vector<int32_t> isum;
};

// One linear of the step: packed (qweight uint8 [1, n, k*bits/8], scales float16 / zeros uint8 [1, n, k/group]) or
// dense (float32 / bfloat16 [n, k]); bias float32 [n] or empty.
struct StepLinear {
  torch::Tensor qweight, scales, zeros, dense, bias;
  Weights w{};
  DecodeFn fn = nullptr;
  int64_t isa = 0, n = 0, k = 0, lanes = -1;
  bool packed = false, simd = false;
  double bytes = 0.;  // of the weights read per call (profiling)

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
    bytes = static_cast<double>(packed ? qweight.nbytes() + scales.nbytes() + zeros.nbytes() : dense.nbytes());
#if !(defined(__x86_64__) || defined(_M_X64))
    simd = false;
#endif
  }

  bool same_rows(const StepLinear& o) const {  // their int8 rows of one x are the same
    return packed && o.packed && lanes == o.lanes && w.group == o.w.group && isa == o.isa;
  }

  // x [B, k]'s int8 rows in this linear's lane order, into s (packed linears).
  Acts quantize(const float* x, int64_t B, Scratch& s) const {
    s.xq.resize(B * k), s.dx.resize(B * w.groups), s.isum.resize(B * w.groups);
    int order[32];
    lane_order(w.bits, isa, order);
    const auto fn_q = simd ? quantize_group_avx2 : quantize_group;
    for (int64_t r = 0; r < B; ++r)
      for (int64_t g = 0; g < w.groups; ++g)
        s.dx[r * w.groups + g] = fn_q(x + r * k + g * w.group, w.group, order, s.xq.data() + r * k + g * w.group,
                                      s.isum.data() + r * w.groups + g);
    return Acts{s.xq.data(), s.dx.data(), s.isum.data(), k, w.groups};
  }

  int64_t units() const { return (n + kRowsPerUnit - 1) / kRowsPerUnit; }

  // Output rows of work unit u: y [B, n] (packed: from a, x's int8 rows; dense: from x), no bias.
  void unit(int64_t u, const float* x, const Acts& a, int64_t B, float* y) const {
    const int64_t r0 = u * kRowsPerUnit, r1 = std::min(n, r0 + kRowsPerUnit);
    if (packed) {
      fn(w, a, 0, r0, r1, 0, B, y);
    } else if (dense.scalar_type() == torch::kBFloat16) {
      const auto* p = static_cast<const uint16_t*>(dense.data_ptr());
      (simd ? gemv_bf16_avx2 : gemv_bf16_portable)(p, r0, r1, k, x, B, y, n);
    } else {
      const auto* p = static_cast<const float*>(dense.data_ptr());
      (simd ? gemv_f32_avx2 : gemv_f32_portable)(p, r0, r1, k, x, B, y, n);
    }
  }

  void add_bias(int64_t B, float* y) const {
    if (!bias.numel()) return;
    const float* b = bias.data_ptr<float>();
    for (int64_t r = 0; r < B; ++r)
      for (int64_t c = 0; c < n; ++c) y[r * n + c] += b[c];
  }

  // y [B, n] = x [B, k] @ W^T (+ bias); s: scratch for x's int8 rows.
  void apply(const float* x, int64_t B, float* y, Scratch& s) const {
    const Acts a = packed ? quantize(x, B, s) : Acts{};
    maybe_parallel(units(), kRowsPerUnit * k * B, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) unit(u, x, a, B, y);
    });
    add_bias(B, y);
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
  MoeLayer moe;  // the tensors above, read once
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
    L.moe = moe_layer(L.gu_q, L.gu_s, L.gu_z, L.gu_bits, L.gu_map, L.dn_q, L.dn_s, L.dn_z, L.dn_bits, L.dn_map, group, isa);
    TORCH_CHECK(L.moe.gu.groups[0].k == H, "experts: gate_up's in_features == hidden");
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
    auto logits = torch::empty({B, head->n}, torch::kFloat);
    run(ids.data_ptr<int64_t>(), positions.data_ptr<int64_t>(), slot, logits.data_ptr<float>());
    return logits;
  }

  // Greedy decoding without Python between the steps: `steps` steps, step s reading ids (then the previous step's
  // argmax) at positions + s, written at cache slot `slot` + s. Stops early once every row has produced one of `eos`
  // (its input id counts).
  // -> int64 [B, steps taken]: each step's argmax (the first maximal logit, as torch.argmax). ids / positions:
  // unchanged.
  torch::Tensor greedy(torch::Tensor ids, torch::Tensor positions, int64_t slot, int64_t steps, std::vector<int64_t> eos) {
    TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.is_contiguous() && ids.numel() == B, "ids: int64 [B]");
    TORCH_CHECK(positions.scalar_type() == torch::kLong && positions.is_contiguous() && positions.numel() == B,
                "positions: int64 [B]");
    TORCH_CHECK(steps >= 0 && slot >= 0 && slot + steps <= S, "slots ", slot, " + ", steps, " outside the cache of ", S);
    std::vector<int64_t> id(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + B);
    std::vector<int64_t> pos(positions.data_ptr<int64_t>(), positions.data_ptr<int64_t>() + B);
    std::vector<uint8_t> done(B, 0);
    for (int64_t b = 0; b < B; ++b) done[b] = std::find(eos.begin(), eos.end(), id[b]) != eos.end();
    auto out = torch::empty({B, steps}, torch::kLong);
    int64_t* o = out.data_ptr<int64_t>();
    logits_buf.resize(B * head->n);
    int64_t s = 0;
    while (s < steps) {
      run(id.data(), pos.data(), slot + s, logits_buf.data());
      bool all = !eos.empty();
      for (int64_t b = 0; b < B; ++b) {
        const float* row = &logits_buf[b * head->n];
        id[b] = std::max_element(row, row + head->n) - row;  // the first maximum
        o[b * steps + s] = id[b], ++pos[b];
        if (std::find(eos.begin(), eos.end(), id[b]) != eos.end()) done[b] = 1;
        all = all && done[b];
      }
      ++s;
      if (all) break;
    }
    return out.narrow(1, 0, s).contiguous();
  }

  void set_profile(int64_t mode) {
    TORCH_CHECK(mode >= 0 && mode <= 2, "profile mode: 0 off, 1 wall time, 2 thread CPU time");
    clock = PartClock{}, clock.mode = static_cast<int>(mode);
  }

  // {part: (seconds, bytes read), "steps": (steps, 0)} since set_profile
  py::dict profile() const {
    py::dict d;
    for (int p = 0; p < kParts; ++p) d[kPartNames[p]] = py::make_tuple(clock.sec[p], clock.bytes[p]);
    d["steps"] = py::make_tuple(clock.steps, 0);
    return d;
  }

 private:
  // One step of every row: id / pos [B] -> logits [B, V].
  void run(const int64_t* id, const int64_t* pos, int64_t slot, float* logits) {
    const int64_t V = embed.size(0);
    clock.start();
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
    att.resize(B * NH * D), tmp.resize(B * widest), tmp2.resize(B * widest);
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
    clock.lap(kEmbed);
    for (int64_t l = 0; l < static_cast<int64_t>(layers.size()); ++l) layer(l, layers[l], pos, slot);
    for (int64_t b = 0; b < B; ++b) rms_norm(&x[b * H], H, final_norm.data_ptr<float>(), &h[b * H]);
    clock.lap(kNorm);
    head->apply(h.data(), B, logits, scratch[0]);
    clock.lap(kHead, head->bytes);
  }

  int64_t NH, NKV, D, K;
  bool norm_topk;
  float eps, scaling, clip;
  int64_t qk_norm;
  torch::Tensor embed, final_norm;
  LinearPtr head;
  torch::Tensor cos, sin, k_cache, v_cache, mask;
  int64_t H = 0, B = 0, S = 0;
  std::vector<StepLayer> layers;
  PartClock clock;
  std::vector<float> x, h, q, kk, vv, att, tmp, tmp2, logits_buf;
  Scratch scratch[3];
  std::vector<int64_t> top_idx;
  std::vector<float> top_w, probs;
  std::vector<int64_t> order;

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
    clock.lap(kNorm);
    qkv(L);
    clock.lap(kQkv, L.q->bytes + L.k->bytes + L.v->bytes);
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
    clock.lap(kRope);
    attention(kc, vc, slot);
    clock.lap(kAttention, 2. * B * NKV * (slot + 1) * D * sizeof(float));
    L.o->apply(att.data(), B, tmp.data(), scratch[0]);
    for (int64_t i = 0; i < B * H; ++i) x[i] += tmp[i];
    clock.lap(kOproj, L.o->bytes);
    for (int64_t b = 0; b < B; ++b) rms_norm(&x[b * H], H, L.post_norm.data_ptr<float>(), &h[b * H]);
    clock.lap(kNorm);
    moe(L);
    if (L.sh_gate) shared(L);
    clock.lap(kShared, L.sh_gate ? L.sh_gate->bytes + L.sh_up->bytes + L.sh_down->bytes + L.sh_scalar->bytes : 0.);
  }

  // q, k and v of h in one parallel loop over their units; x's int8 rows quantized once per lane order.
  void qkv(const StepLayer& L) {
    const StepLinear* lin[3] = {L.q.get(), L.k.get(), L.v.get()};
    float* out[3] = {q.data(), kk.data(), vv.data()};
    Acts acts[3] = {};
    int64_t start[4] = {0, 0, 0, 0};
    for (int i = 0; i < 3; ++i) {
      if (lin[i]->packed) {
        int same = -1;
        for (int j = 0; j < i && same < 0; ++j)
          if (lin[i]->same_rows(*lin[j])) same = j;
        acts[i] = same >= 0 ? acts[same] : lin[i]->quantize(h.data(), B, scratch[i]);
      }
      start[i + 1] = start[i] + lin[i]->units();
    }
    maybe_parallel(start[3], kRowsPerUnit * H * B, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int i = u < start[1] ? 0 : u < start[2] ? 1 : 2;
        lin[i]->unit(u - start[i], h.data(), acts[i], B, out[i]);
      }
    });
    for (int i = 0; i < 3; ++i) lin[i]->add_bias(B, out[i]);
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
    }, 1 << 15);  // the softmax's exps cost more than their count of multiply-adds
  }

  void moe(const StepLayer& L) {
    const int64_t E = L.router->n;
    L.router->apply(h.data(), B, tmp.data(), scratch[0]);  // router logits [B, E]
    top_idx.resize(B * K), top_w.resize(B * K), order.resize(E);
    int64_t* ip = top_idx.data();
    float* wp = top_w.data();
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
    clock.lap(kRouter, L.router->bytes);
    moe_decode_into(L.moe, h.data(), B, ip, wp, K, tmp2.data());
    for (int64_t i = 0; i < B * H; ++i) x[i] += tmp2[i];
    if (clock.mode) clock.lap(kExperts, expert_bytes(L, ip));
  }

  // Bytes of the distinct experts the B * K pairs route to (profiling).
  double expert_bytes(const StepLayer& L, const int64_t* ip) const {
    const int64_t* gm = L.gu_map.data_ptr<int64_t>();
    const int64_t* dm = L.dn_map.data_ptr<int64_t>();
    std::vector<int64_t> seen(ip, ip + B * K);
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    auto slot_bytes = [](const std::vector<torch::Tensor>& q, const std::vector<torch::Tensor>& s,
                         const std::vector<torch::Tensor>& z, int64_t g) {
      const double n = static_cast<double>(q[g].size(0));
      return (q[g].nbytes() + s[g].nbytes() + z[g].nbytes()) / n;
    };
    double total = 0.;
    for (int64_t e : seen) {
      if (gm[2 * e] >= 0) total += slot_bytes(L.gu_q, L.gu_s, L.gu_z, gm[2 * e]);
      if (dm[2 * e] >= 0) total += slot_bytes(L.dn_q, L.dn_s, L.dn_z, dm[2 * e]);
    }
    return total;
  }

  void shared(const StepLayer& L) {  // Qwen2-MoE: sigmoid(h @ g^T) * down(silu(gate(h)) * up(h))
    const int64_t I = L.sh_gate->n;
    std::vector<float> up(B * I), act(B * H), gate(B);
    L.sh_gate->apply(h.data(), B, tmp.data(), scratch[0]);
    L.sh_up->apply(h.data(), B, up.data(), scratch[0]);
    (L.sh_gate->simd ? silu_mul_avx2 : silu_mul_portable)(tmp.data(), up.data(), tmp.data(), B * I);
    L.sh_down->apply(tmp.data(), B, act.data(), scratch[0]);
    L.sh_scalar->apply(h.data(), B, gate.data(), scratch[0]);
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
        Scratch s;
        lin.apply(xc.data_ptr<float>(), B, y.data_ptr<float>(), s);
        return y;
      }, py::call_guard<py::gil_scoped_release>());
  py::class_<DecodeStep>(m, "DecodeStep", py::module_local())
      .def(py::init<int64_t, int64_t, int64_t, int64_t, bool, double, double, double, int64_t, torch::Tensor,
                    torch::Tensor, LinearPtr, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>())
      .def("add_layer", &DecodeStep::add_layer)
      .def("forward", &DecodeStep::forward, py::call_guard<py::gil_scoped_release>())
      .def("greedy", &DecodeStep::greedy, py::call_guard<py::gil_scoped_release>())
      .def("set_profile", &DecodeStep::set_profile)
      .def("profile", &DecodeStep::profile);
}

}  // namespace mc_lowbit
