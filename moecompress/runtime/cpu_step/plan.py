"""StepPlan: what the whole-model CPU decode step (csrc/lowbit/step.cpp) needs from a loaded model, read once.

`StepPlan.of(model)` walks a loaded moecompress model (or a plain transformers one) of a supported architecture and
keeps its tensors as they are (no copies of packed or bf16 weights; norms and biases as float32 vectors) with the
config numbers. What the step does not implement is refused with the reason (`UnsupportedModel`): another
architecture, MLA attention, sliding windows shorter than the cache, dense MLP layers, experts in a tiered store or
on another device, a gate other than SiLU, packed weights without an int8-activation (q8_*) decode kernel here.
Experts come packed (PackedExperts, 16-bit groups included) or as transformers' own fused 3-D tensors (a bf16 /
float32 checkpoint or a plain HF model: `_unpacked_experts`, views of gate_up_proj / down_proj, computed by moe.cpp's
dense GEMV).

Supported (ARCHS): Qwen3-MoE (q/k RMSNorm per head), OLMoE (q/k RMSNorm over the whole projection, optional
clip_qkv), Mixtral, Qwen2-MoE (q/k/v biases, sigmoid-gated shared expert). All four: pre-norm decoder layers,
softmax router -> top-k -> renormalisation where the config says (Mixtral always; top-k then softmax is the same).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.runtime.kernels import cpu_lowbit
from moecompress.runtime.experts import cpu_moe
from moecompress.runtime.experts.packed_experts import PackedExperts
from moecompress.runtime.experts.packed_group import PackedGroup

MAX_BATCH = 8  # sequences per step (the step's buffers and the GEMV's register blocking)

# model_type -> (q/k norm: "none" | "head" | "whole", router renormalises always, has a shared expert)
ARCHS: dict[str, tuple[str, bool, bool]] = {
    "qwen3_moe": ("head", False, False),
    "olmoe": ("whole", False, False),
    "mixtral": ("none", True, False),
    "qwen2_moe": ("none", False, True),
}
QK_NORM_ID = {"none": 0, "head": 1, "whole": 2}  # step.cpp's qk_norm


class UnsupportedModel(MoecompressError):
    """The step cannot run this model; the message says why (callers fall back to transformers' generate)."""


@dataclass(frozen=True)
class LinearSpec:
    """One linear as the step reads it: packed (qweight [1, n, k*bits/8], scales, zeros or empty, bits, group_size,
    isa) or dense (weight [n, k] float32 / bfloat16); bias float32 [n] or None."""
    qweight: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    isa: str
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def build(self, simd: bool):
        """The C++ StepLinear."""
        empty = torch.empty(0)
        return cpu_lowbit._module().StepLinear(
            self.qweight if self.qweight is not None else torch.empty(0, dtype=torch.uint8),
            self.scales if self.scales is not None else torch.empty(0, dtype=torch.float16),
            self.zeros if self.zeros is not None else torch.empty(0, dtype=torch.uint8),
            self.bits, self.group_size, cpu_lowbit.ISA_ID[self.isa],
            self.weight if self.weight is not None else empty, self.bias if self.bias is not None else empty, simd)


@dataclass(frozen=True)
class LayerSpec:
    q: LinearSpec
    k: LinearSpec
    v: LinearSpec
    o: LinearSpec
    router: LinearSpec
    input_norm: torch.Tensor  # float32 [H]
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    experts: cpu_moe.FusedLayer  # moe_decode's arguments (16-bit groups included)
    shared: tuple[LinearSpec, ...]  # (gate, up, down, sigmoid gate) or ()


@dataclass(frozen=True)
class StepPlan:
    model_type: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    top_k: int
    renormalize: bool
    eps: float
    scaling: float
    clip_qkv: float  # 0: none
    qk_norm: str
    sliding_window: int | None
    embed: torch.Tensor  # [V, H] float32 / bfloat16
    final_norm: torch.Tensor
    head: LinearSpec
    layers: tuple[LayerSpec, ...]
    rotary: nn.Module  # the model's own rotary embedding (its rope type and scaling)
    isa: str  # the decode kernels' ISA (q8_*), or of the dense GEMV where nothing is packed
    simd: bool  # the AVX2 dense GEMV

    @staticmethod
    def of(model) -> StepPlan:
        return build_plan(model)

    def streamed(self) -> list[torch.Tensor]:
        """The weights a step reads whole every token (packed or dense linears, lm_head, experts; not the embedding,
        of which it reads one row)."""
        specs = [self.head] + [s for L in self.layers for s in (L.q, L.k, L.v, L.o, L.router, *L.shared)]
        out = [t for s in specs for t in (s.qweight, s.scales, s.zeros, s.weight) if t is not None]
        for L in self.layers:
            gu_q, gu_s, gu_z, _, _, dn_q, dn_s, dn_z, _, _ = L.experts.args
            out += [t for ts in (gu_q, gu_s, gu_z, dn_q, dn_s, dn_z) for t in ts]
        return out

    def rope_tables(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin float32 [positions, head_dim] from the model's rotary embedding (attention scaling included)."""
        ids = torch.arange(positions)[None]
        with torch.no_grad():
            cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32), ids)
        return cos[0].float().contiguous(), sin[0].float().contiguous()


def _refuse(reason: str):
    raise UnsupportedModel(f"the CPU decode step does not run this model: {reason}")


def _vector(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


def _linear(module, name: str, isa: str) -> LinearSpec:
    """A PackedLinear (packed or 16-bit) or nn.Linear as a LinearSpec."""
    bias = module._buffers.get("bias") if isinstance(module, PackedGroup) else getattr(module, "bias", None)
    bias = None if bias is None else _vector(bias).reshape(-1)
    if isinstance(module, PackedGroup):
        if len(module.experts) != 1:
            _refuse(f"{name}: a packed group of {len(module.experts)} experts where a linear is expected")
        if module.bits == 16:
            return _dense(module.weight[0], name, bias)
        if module._int4 is not None or module.qweight.device.type != "cpu":
            _refuse(f"{name}: its weights are in PyTorch's int4 layout or not on the CPU")
        kernel_isa = cpu_moe.decode_isa(module, torch.bfloat16)
        if kernel_isa is None:
            _refuse(f"{name}: no int8-activation decode kernel for it here (MOECOMPRESS_INT8_ACTIVATIONS=never, "
                    "or the C++ kernels are not built)")
        if kernel_isa != isa:
            _refuse(f"{name}: its decode kernel is {kernel_isa}, other linears' {isa}")
        zeros = None if module.symmetric else module.zeros
        return LinearSpec(module.qweight, module.scales, zeros, module.bits, module.group_size, isa, None, bias)
    if isinstance(module, nn.Linear):
        return _dense(module.weight, name, bias)
    if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2:  # routers
        return _dense(module.weight, name, bias)
    _refuse(f"{name}: a {type(module).__name__}, not a linear the step reads")


def _dense(weight: torch.Tensor, name: str, bias) -> LinearSpec:
    if weight.device.type != "cpu":
        _refuse(f"{name}: on {weight.device}, not the CPU")
    w = weight.detach()
    if w.dtype not in (torch.float32, torch.bfloat16):
        w = w.float()  # float16: one float32 copy (the step reads float32 or bfloat16)
    return LinearSpec(None, None, None, 16, 0, "cpu:portable", w.contiguous(), bias)


def _unpacked_experts(experts, mlp, i: int, isa: str) -> cpu_moe.FusedLayer:
    """transformers' own fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I], bfloat16 / float32) as one
    16-bit group per projection of the fused MoE call: views of the model's tensors, no copies (float16: one float32
    copy each, as _dense does); moe.cpp computes them with the dense GEMV."""
    gate_up, down = (getattr(experts, n, None) for n in ("gate_up_proj", "down_proj"))
    if not all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in (gate_up, down)):
        _refuse(f"layer {i}: its MLP is not a MoE layer the step reads ({type(experts or mlp).__name__}: dense MLP "
                "layers, and experts without 3-D gate_up_proj / down_proj, are not read by the step)")
    if not cpu_moe.plain_fused_experts(experts):
        _refuse(f"layer {i}: experts other than [gate; up] -> SiLU(gate) * up -> down without biases "
                "(transposed, interleaved, biased or post-normed experts, or another activation)")
    if gate_up.device.type != "cpu" or down.device.type != "cpu":
        _refuse(f"layer {i}: experts on {gate_up.device}, not the CPU")
    n = gate_up.shape[0]
    if gate_up.shape[1] != 2 * down.shape[2] or gate_up.shape[2] != down.shape[1] or down.shape[0] != n:
        _refuse(f"layer {i}: expert shapes {tuple(gate_up.shape)} / {tuple(down.shape)}, expected [E, 2I, H] / "
                "[E, H, I]")
    where = torch.stack([torch.zeros(n, dtype=torch.int64), torch.arange(n)], 1)  # expert -> (group 0, slot e)
    args = []
    for w in (gate_up, down):
        w = w.detach()
        if w.dtype not in (torch.float32, torch.bfloat16):
            w = w.float()  # float16: one float32 copy (moe.cpp's dense GEMV reads float32 or bfloat16)
        args += [[w.contiguous()], [torch.empty(0, dtype=torch.float16)], [torch.empty(0, dtype=torch.uint8)], [16],
                 where.clone()]
    return cpu_moe.FusedLayer(tuple(args), 32, isa)


def _decode_isa() -> str:
    isa = cpu_moe.dense_isa()
    if isa is None or not cpu_lowbit.available():
        _refuse("the low-bit C++ kernels are not built here (no compiler, or MOECOMPRESS_NO_CPP)")
    return isa


def _window(config) -> int | None:
    """The attention window of some layer, or None (0 and None both mean none; layer_types may leave it unused)."""
    window = getattr(config, "sliding_window", None) or None
    types = getattr(config, "layer_types", None)
    return None if types is not None and "sliding_attention" not in types else window


def build_plan(model) -> StepPlan:
    config = model.config
    arch = ARCHS.get(config.model_type)
    if arch is None:
        _refuse(f"model_type {config.model_type!r}; supported: {', '.join(sorted(ARCHS))}")
    qk_norm, always_renorm, has_shared = arch
    if getattr(config, "hidden_act", "silu") != "silu":
        _refuse(f"hidden_act {config.hidden_act!r} (the experts' gate is SiLU)")
    base = model.model
    isa = _decode_isa()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = []
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(attn, "q_proj") or getattr(attn, "head_dim", head_dim) != head_dim:
            _refuse(f"layer {i}: attention without q_proj/k_proj/v_proj (MLA or another form)")
        experts = getattr(mlp, "experts", None)
        if isinstance(experts, PackedExperts):
            if experts.expert_store is not None:
                _refuse(f"layer {i}: experts in a tiered expert store (read on use)")
            fused = cpu_moe.dense_layer(experts)
            if fused is None:
                _refuse(f"layer {i}: experts the fused MoE call does not take (gate other than SiLU, biases, int4 "
                        "layout, another device, or no q8 decode kernel)")
        else:
            fused = _unpacked_experts(experts, mlp, i, isa)
        if fused.isa != isa:
            _refuse(f"layer {i}: experts' decode kernels are {fused.isa}, the CPU's {isa}")
        name = f"model.layers.{i}"
        norms = (None, None)
        if qk_norm != "none":
            norms = (_vector(attn.q_norm.weight), _vector(attn.k_norm.weight))
            want = (head_dim, head_dim) if qk_norm == "head" else (heads * head_dim, kv_heads * head_dim)
            if (norms[0].numel(), norms[1].numel()) != want:
                _refuse(f"layer {i}: q/k norm sizes {norms[0].numel()}/{norms[1].numel()}, expected {want}")
        shared = ()
        if has_shared:
            se = mlp.shared_expert
            shared = tuple(_linear(getattr(se, n), f"{name}.mlp.shared_expert.{n}", isa)
                           for n in ("gate_proj", "up_proj", "down_proj"))
            shared += (_linear(mlp.shared_expert_gate, f"{name}.mlp.shared_expert_gate", isa),)
        router = mlp.gate
        if type(router).__name__ not in (f"{p}TopKRouter" for p in ("Qwen3Moe", "Olmoe", "Mixtral", "Qwen2Moe")):
            _refuse(f"layer {i}: router {type(router).__name__} (softmax top-k routers only)")
        layers.append(LayerSpec(
            *(_linear(getattr(attn, p), f"{name}.self_attn.{p}", isa) for p in ("q_proj", "k_proj", "v_proj",
                                                                                 "o_proj")),
            _linear(router, f"{name}.mlp.gate", isa), _vector(layer.input_layernorm.weight),
            _vector(layer.post_attention_layernorm.weight), *norms, fused, shared))
    renorm = always_renorm or bool(getattr(config, "norm_topk_prob", False))
    embed = base.embed_tokens.weight.detach()
    if embed.dtype not in (torch.float32, torch.bfloat16):
        embed = embed.float()
    return StepPlan(
        model_type=config.model_type, hidden=config.hidden_size, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        top_k=config.num_experts_per_tok, renormalize=renorm, eps=float(config.rms_norm_eps),
        scaling=float(base.layers[0].self_attn.scaling), clip_qkv=float(getattr(config, "clip_qkv", None) or 0.0),
        qk_norm=qk_norm, sliding_window=_window(config), embed=embed.contiguous(),
        final_norm=_vector(base.norm.weight), head=_linear(model.lm_head, "lm_head", isa), layers=tuple(layers),
        rotary=base.rotary_emb, isa=isa, simd=isa in ("cpu:avx2", "cpu:avx512_vnni"))
