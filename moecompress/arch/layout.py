"""What the adapters report about a loaded model: plain frozen dataclasses, no torch state.

Vocabulary: a *MoE layer* is one sparse block (router + routed experts). `layer` always means the ordinal of the
MoE layer among the model's MoE layers (0..L-1); `decoder_layer` is the index of the transformer block holding it.
Experts are stored by transformers 5.x as fused 3-D tensors; a *projection* (`proj`) is one of them:
`gate_up` (gate and up fused), `up` (ungated experts) or `down`. Weights are always handed out in the canonical
orientation `[out_features, in_features]`, whatever the storage layout (`transposed`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProjSpec:
    """One fused expert projection of a MoE layer."""

    name: str  # canonical: "gate_up" | "up" | "down"
    attr: str  # attribute on the experts module: "gate_up_proj" | "up_proj" | "down_proj"
    in_features: int
    out_features: int
    bias_attr: str | None = None  # e.g. "gate_up_proj_bias" (GPT-OSS), None when the experts have no bias


@dataclass(frozen=True)
class MoELayer:
    layer: int  # ordinal among MoE layers, 0..L-1
    decoder_layer: int  # index of the decoder block that holds it
    block_path: str  # e.g. "model.layers.3.mlp"
    experts_path: str  # e.g. "model.layers.3.mlp.experts"
    router_path: str  # e.g. "model.layers.3.mlp.gate"
    num_experts: int
    top_k: int
    projs: tuple[ProjSpec, ...]  # in execution order: (gate_up, down) or (up, down)
    transposed: bool  # storage is [E, in, out] (GPT-OSS) instead of [E, out, in]
    interleaved: bool  # gate/up rows interleaved (GPT-OSS) instead of concatenated [gate; up]
    shared_expert_paths: tuple[str, ...] = ()  # modules of always-on shared experts in this block

    def proj(self, name: str) -> ProjSpec:
        for p in self.projs:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass(frozen=True)
class ModelLayout:
    model_type: str  # config.model_type, e.g. "qwen3_moe"
    hidden_size: int
    decoder_layers_path: str  # e.g. "model.layers"
    num_decoder_layers: int
    moe_layers: tuple[MoELayer, ...]
    # nn.Linear modules outside the routed experts, by kind; routers and lm_head are never listed here.
    attention_linears: tuple[str, ...] = ()
    shared_expert_linears: tuple[str, ...] = ()
    dense_mlp_linears: tuple[str, ...] = ()  # MLPs of dense (non-MoE) decoder layers

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)
