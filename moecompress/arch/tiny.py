"""Tiny random models of every supported MoE architecture, for tests and the demo (CPU, seconds).

Shapes are chosen so that every quantizable in-feature is a multiple of 64 (so of 32 too): hidden 64, expert /
dense / shared intermediate 64, attention q/k/v/o in-features 64 (DeepSeek MLA: q/kv LoRA ranks 64 too).
8 routed experts, top-2, vocab 128, 3 decoder layers (DeepSeek: the first one dense).
"""
from __future__ import annotations

import torch
from torch import nn

from moecompress.errors import MoecompressError

HIDDEN = 64
INTERMEDIATE = 64
NUM_EXPERTS = 8
TOP_K = 2
VOCAB = 128
NUM_LAYERS = 3

# Fields shared by every tiny config (attention: 4 heads of 16 = 64, GQA with 2 kv heads).
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.02,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    use_cache=False,
)

# Per-architecture fields (on top of _COMMON). Names follow each transformers config class.
_TINY: dict[str, dict] = {
    "mixtral": dict(intermediate_size=INTERMEDIATE, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
                    head_dim=16),
    "qwen2_moe": dict(intermediate_size=INTERMEDIATE, moe_intermediate_size=INTERMEDIATE,
                      shared_expert_intermediate_size=INTERMEDIATE, num_experts=NUM_EXPERTS,
                      num_experts_per_tok=TOP_K, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(intermediate_size=INTERMEDIATE, moe_intermediate_size=INTERMEDIATE,
                      num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=True, head_dim=16,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": dict(intermediate_size=INTERMEDIATE, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K),
    # MLA: q_a in 64, q_b in q_lora_rank 64, kv_a in 64, kv_b in kv_lora_rank 64, o in 4 heads x v_head_dim 16.
    "deepseek_v2": dict(intermediate_size=INTERMEDIATE, moe_intermediate_size=INTERMEDIATE, n_routed_experts=NUM_EXPERTS,
                        num_experts_per_tok=TOP_K, n_shared_experts=1, first_k_dense_replace=1,
                        num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=16,
                        qk_rope_head_dim=16, v_head_dim=16, head_dim=16, topk_method="group_limited_greedy",
                        n_group=4, topk_group=2, routed_scaling_factor=1.0),
    "deepseek_v3": dict(intermediate_size=INTERMEDIATE, moe_intermediate_size=INTERMEDIATE, n_routed_experts=NUM_EXPERTS,
                        num_experts_per_tok=TOP_K, n_shared_experts=1, first_k_dense_replace=1,
                        num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=16,
                        qk_rope_head_dim=16, v_head_dim=16, head_dim=16, n_group=4, topk_group=2,
                        norm_topk_prob=True, routed_scaling_factor=1.0),
    "gpt_oss": dict(intermediate_size=INTERMEDIATE, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
                    head_dim=16, sliding_window=8,
                    # GPT-OSS ships YaRN; keep it, with a factor consistent with the tiny context.
                    rope_parameters=dict(rope_type="yarn", factor=2.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                         original_max_position_embeddings=128, rope_theta=150000.0),
                    layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(NUM_LAYERS)]),
    "phimoe": dict(intermediate_size=INTERMEDIATE, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
                   router_jitter_noise=0.01, input_jitter_noise=0.0),
    "granitemoe": dict(intermediate_size=INTERMEDIATE, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K),
}

TINY_TYPES: tuple[str, ...] = tuple(_TINY)


def tiny_config(model_type: str, **overrides):
    """A small config of `model_type` (see module docstring); `overrides` replace any field."""
    from transformers import AutoConfig

    if model_type not in _TINY:
        raise MoecompressError(
            f"no tiny config for model_type {model_type!r}; available: {', '.join(sorted(_TINY))}"
        )
    kwargs = {**_COMMON, **_TINY[model_type], **overrides}
    if "num_hidden_layers" in overrides and "layer_types" in _TINY[model_type] and "layer_types" not in overrides:
        n = overrides["num_hidden_layers"]
        kwargs["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return AutoConfig.for_model(model_type, **kwargs)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


@torch.no_grad()
def reinit_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Re-initialise every floating parameter from a seeded generator: normal(0, std), except the scales of
    normalisation layers, which get 1 + normal(0, std). Some architectures leave expert tensors `torch.empty` or
    zero (routers, biases); this makes forwards non-trivial and routing token-dependent, deterministically."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.is_floating_point() or p.device.type == "meta":
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            if _is_norm(module) and p_name == "weight":
                noise += 1.0
            p.copy_(noise.to(p.dtype))
    return model


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    """A random `AutoModelForCausalLM` of `tiny_config(model_type, **overrides)`, eval mode, eager attention,
    deterministic for a given seed."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    reinit_(model, seed=seed)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()
