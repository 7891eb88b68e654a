"""Find the MoE structure of a transformers 5.x model and read/write its fused expert tensors.

Detection is generic: an *experts module* is any module whose class went through transformers'
`@use_experts_implementation` (it carries `has_gate`, `is_transposed`, `is_concatenated`) and holds a 3-D
`down_proj`; its parent is the MoE block, the router is the block's child named in `ArchSpec.router_names`.
What cannot be inferred from modules (where the decoder layers live, which block children are shared experts,
Phi-MoE's fixed top-2) sits in the small explicit registry `SUPPORTED`, keyed by `config.model_type`.

Only module types, parameter shapes and the config are read, so everything works on a meta-device model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moecompress.arch.layout import ModelLayout, MoELayer, ProjSpec
from moecompress.errors import MoecompressError


@dataclass(frozen=True)
class ArchSpec:
    """What `describe` must be told about one architecture."""

    layers_path: str = "model.layers"  # ModuleList of decoder layers (relative to the *ForCausalLM model)
    top_k_key: str = "num_experts_per_tok"  # config field, used when the router has no `top_k`
    fixed_top_k: int | None = None  # top-k hard-wired in the routing code, whatever the config says
    router_names: tuple[str, ...] = ("gate", "router")  # children of the MoE block that route tokens
    shared_expert_names: tuple[str, ...] = ()  # children of the MoE block that are always-on shared experts
    # Linears inside the MoE block that are neither experts nor shared experts (scalar gates): never listed.
    block_gate_names: tuple[str, ...] = ()
    attention_names: tuple[str, ...] = ("self_attn",)  # children of a decoder layer holding the attention


SUPPORTED: dict[str, ArchSpec] = {
    "mixtral": ArchSpec(),
    "qwen2_moe": ArchSpec(shared_expert_names=("shared_expert",), block_gate_names=("shared_expert_gate",)),
    "qwen3_moe": ArchSpec(),
    "olmoe": ArchSpec(),
    "deepseek_v2": ArchSpec(shared_expert_names=("shared_experts",)),
    "deepseek_v3": ArchSpec(shared_expert_names=("shared_experts",)),
    "gpt_oss": ArchSpec(),
    # sparsemixer() in modeling_phimoe always selects exactly two experts.
    "phimoe": ArchSpec(fixed_top_k=2),
    "granitemoe": ArchSpec(),
}


def supported_types() -> list[str]:
    return sorted(SUPPORTED)


def _unsupported(why: str) -> MoecompressError:
    return MoecompressError(f"{why}; supported MoE model types: {', '.join(supported_types())}")


def is_experts_module(module: nn.Module) -> bool:
    """True for a fused-experts module built through transformers' `@use_experts_implementation`."""
    if not all(hasattr(module, a) for a in ("has_gate", "is_transposed", "is_concatenated")):
        return False
    down = getattr(module, "down_proj", None)
    return isinstance(down, torch.Tensor) and down.dim() == 3


def experts_layout(experts: nn.Module) -> tuple[tuple[ProjSpec, ...], bool, bool]:
    """(projs in execution order, transposed, interleaved) of one experts module, from its flags and shapes."""
    if getattr(experts, "has_post_expert_norm", False):
        raise _unsupported(f"{type(experts).__name__} applies a post-expert norm, which moecompress does not handle")
    transposed = bool(experts.is_transposed)
    has_gate = bool(experts.has_gate)
    specs = []
    for name, attr in (("gate_up" if has_gate else "up", "gate_up_proj" if has_gate else "up_proj"),
                       ("down", "down_proj")):
        w = getattr(experts, attr, None)
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise _unsupported(f"{type(experts).__name__}.{attr} is not a 3-D expert tensor")
        _, a, b = w.shape
        out_f, in_f = (b, a) if transposed else (a, b)
        bias_attr = f"{attr}_bias"
        has_bias = bool(getattr(experts, "has_bias", False)) and isinstance(getattr(experts, bias_attr, None),
                                                                             torch.Tensor)
        specs.append(ProjSpec(name=name, attr=attr, in_features=int(in_f), out_features=int(out_f),
                              bias_attr=bias_attr if has_bias else None))
    first, down = specs
    if first.out_features != (2 if has_gate else 1) * down.in_features or first.in_features != down.out_features:
        raise _unsupported(f"{type(experts).__name__} has inconsistent expert shapes {first} / {down}")
    return tuple(specs), transposed, has_gate and not bool(experts.is_concatenated)


def _resolve_layers(model: nn.Module, spec: ArchSpec) -> tuple[str, nn.ModuleList]:
    candidates = [spec.layers_path]
    if spec.layers_path.startswith("model."):
        candidates.append(spec.layers_path[len("model."):])  # the bare base model (e.g. MixtralModel)
    for path in candidates:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path, layers
    raise _unsupported(f"no decoder layers at {' or '.join(candidates)} in {type(model).__name__}")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def describe(model: nn.Module) -> ModelLayout:
    """The MoE layout of a (causal-LM) transformers model; raises MoecompressError if it is not a supported MoE."""
    config = model.config
    model_type = getattr(config, "model_type", None) or type(model).__name__
    all_experts = [n for n, m in model.named_modules() if is_experts_module(m)]
    if not all_experts:
        raise _unsupported(f"model type {model_type!r} has no fused MoE experts (not a MoE model?)")
    spec = SUPPORTED.get(model_type)
    if spec is None:
        raise _unsupported(f"model type {model_type!r} is not supported")
    layers_path, layers = _resolve_layers(model, spec)

    moe_layers: list[MoELayer] = []
    attention: list[str] = []
    shared: list[str] = []
    dense: list[str] = []
    for i, layer in enumerate(layers):
        lp = f"{layers_path}.{i}"
        layer_modules = dict(layer.named_modules())
        blocks: list[tuple[str, list[str], list[str]]] = []  # (block rel path, router rel paths, shared rel paths)
        for rel, mod in layer_modules.items():
            if not is_experts_module(mod):
                continue
            block_rel = rel.rpartition(".")[0]
            block = layer.get_submodule(block_rel) if block_rel else layer
            pre = f"{block_rel}." if block_rel else ""
            children = dict(block.named_children())
            routers = [n for n in spec.router_names if n in children]
            if len(routers) != 1:
                raise _unsupported(f"{lp}.{pre}{rel} has no single router among {spec.router_names}")
            shared_rel = [pre + n for n in spec.shared_expert_names if n in children]
            projs, transposed, interleaved = experts_layout(mod)
            router = children[routers[0]]
            top_k = spec.fixed_top_k or getattr(router, "top_k", None) or getattr(config, spec.top_k_key)
            moe_layers.append(MoELayer(
                layer=len(moe_layers), decoder_layer=i,
                block_path=f"{lp}.{block_rel}" if block_rel else lp,
                experts_path=f"{lp}.{rel}", router_path=f"{lp}.{pre}{routers[0]}",
                num_experts=int(mod.down_proj.shape[0]),
                top_k=int(top_k), projs=projs, transposed=transposed, interleaved=interleaved,
                shared_expert_paths=tuple(f"{lp}.{s}" for s in shared_rel),
            ))
            blocks.append((block_rel, [pre + r for r in routers] + [pre + g for g in spec.block_gate_names],
                           shared_rel))

        for rel, mod in layer_modules.items():
            if not isinstance(mod, nn.Linear):
                continue
            path = f"{lp}.{rel}"
            block = next((b for b in blocks if _under(rel, b[0]) or not b[0]), None)
            if block is not None:
                if any(_under(rel, s) for s in block[2]):
                    shared.append(path)
                elif any(_under(rel, r) for r in block[1]):
                    continue  # router / scalar gate: never quantized
                else:
                    raise _unsupported(f"unexpected linear {path} inside the MoE block of {model_type!r}")
            elif any(_under(rel, a) for a in spec.attention_names):
                attention.append(path)
            elif not blocks:
                dense.append(path)
            else:
                raise _unsupported(f"unexpected linear {path} outside attention and MoE block of {model_type!r}")

    found = {m.experts_path for m in moe_layers}
    stray = [n for n in all_experts if n not in found]
    if stray:
        raise _unsupported(f"experts outside the decoder layers of {model_type!r}: {stray}")
    return ModelLayout(
        model_type=model_type, hidden_size=int(config.hidden_size), decoder_layers_path=layers_path,
        num_decoder_layers=len(layers), moe_layers=tuple(moe_layers), attention_linears=tuple(attention),
        shared_expert_linears=tuple(shared), dense_mlp_linears=tuple(dense),
    )


def _spec(moe_layer: MoELayer, proj: str | ProjSpec) -> ProjSpec:
    return proj if isinstance(proj, ProjSpec) else moe_layer.proj(proj)


def proj_weights(experts: nn.Module, moe_layer: MoELayer, proj: str | ProjSpec) -> torch.Tensor:
    """The fused weights of `proj`, `[E, out, in]`: the parameter itself or a transposed view of it (no copy).

    Rows keep the storage order: for `interleaved` gate_up they alternate gate/up (see `split_gate_up`)."""
    w = getattr(experts, _spec(moe_layer, proj).attr)
    return w.transpose(-2, -1) if moe_layer.transposed else w


@torch.no_grad()
def set_proj_weights(experts: nn.Module, moe_layer: MoELayer, proj: str | ProjSpec, w: torch.Tensor) -> None:
    """Write canonical `[E, out, in]` weights back into `proj`, in place, in the storage layout and dtype."""
    spec = _spec(moe_layer, proj)
    param = getattr(experts, spec.attr)
    want = (param.shape[0], spec.out_features, spec.in_features)
    if tuple(w.shape) != want:
        raise ValueError(f"{spec.attr}: expected canonical shape {want}, got {tuple(w.shape)}")
    param.copy_(w.transpose(-2, -1) if moe_layer.transposed else w)


def proj_bias(experts: nn.Module, moe_layer: MoELayer, proj: str | ProjSpec) -> torch.Tensor | None:
    """The `[E, out]` bias of `proj`, or None when the experts have none."""
    spec = _spec(moe_layer, proj)
    return getattr(experts, spec.bias_attr) if spec.bias_attr else None


def split_gate_up(t: torch.Tensor, moe_layer: MoELayer, dim: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (gate, up) of a canonical gate_up tensor along its out-feature `dim` (-2 for `[E, 2I, in]`
    weights, -1 for `[E, 2I]` biases), handling the interleaved (GPT-OSS) and concatenated layouts."""
    dim = dim % t.dim()
    lead = (slice(None),) * dim
    if moe_layer.interleaved:
        return t[lead + (slice(0, None, 2),)], t[lead + (slice(1, None, 2),)]
    half = t.shape[dim] // 2
    return t.narrow(dim, 0, half), t.narrow(dim, half, half)
