"""Write a moecompress checkpoint: the model's own tensors with experts and chosen linears replaced by packed groups.

All files are written into a temporary sibling directory that is renamed into place at the end, so an interrupted
export never leaves a directory that looks complete.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn

from moecompress.arch.adapters import proj_bias, proj_weights
from moecompress.arch.layout import ModelLayout
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.artifacts.quantized import QuantizedTensors, expert_key
from moecompress.errors import MoecompressError
from moecompress.format.files import INDEX, atomic_dir, write_manifest
from moecompress.format.spec import ExpertsSpec, FormatSpec, group_prefix


def format_spec(plan: BitPlan, layout: ModelLayout, held: Mapping[str, set[int]] | None = None) -> FormatSpec:
    """The checkpoint's FormatSpec for a bit plan; `held` restricts each layer to some experts (a server bundle)."""
    experts = {}
    for m in layout.moe_layers:
        keep = set(range(m.num_experts)) if held is None else set(held.get(m.experts_path, ()))
        groups = {}
        for proj, bits in plan.experts[m.experts_path].items():
            by_bits: dict[int, list[int]] = {}
            for e, b in enumerate(bits):
                if e in keep:
                    by_bits.setdefault(b, []).append(e)
            groups[proj] = {b: tuple(ids) for b, ids in by_bits.items()}
        experts[m.experts_path] = ExpertsSpec(num_experts=m.num_experts, groups=groups)
    linears = {path: b for path, b in plan.linears.items() if b != 16}
    return FormatSpec(group_size=plan.group_size, symmetric=plan.symmetric, experts=experts, linears=linears)


def packed_state_dict(model: nn.Module, layout: ModelLayout, spec: FormatSpec, quantized: QuantizedTensors,
                      dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Tensors of the checkpoint; `quantized` holds a QuantizedWeight per expert_key(...) / linear path."""
    def need(key):
        if key not in quantized.weights:
            raise MoecompressError(f"no quantized weights for {key}; run the quantize stage for this bit plan")
        return quantized.weights[key]

    out: dict[str, torch.Tensor] = {}
    replaced = list(spec.experts) + list(spec.linears)
    seen_storage: set[int] = set()
    for name, t in model.state_dict().items():
        if any(name.startswith(p + ".") for p in replaced):
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage:  # tied weights (e.g. lm_head = embeddings) are stored once
            continue
        seen_storage.add(ptr)
        out[name] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
    for m in layout.moe_layers:
        experts_module = model.get_submodule(m.experts_path)
        out[f"{m.experts_path}.{m.projs[0].attr}"] = torch.empty(0, dtype=torch.uint8)  # marker, see format/spec.py
        for proj, by_bits in spec.experts[m.experts_path].groups.items():
            bias = proj_bias(experts_module, m, proj)
            for bits, ids in by_bits.items():
                prefix, idx = group_prefix(m.experts_path, proj, bits), list(ids)
                if bits == 16:
                    out[f"{prefix}.weight"] = proj_weights(experts_module, m, proj)[idx].detach().to(dtype).contiguous()
                else:
                    qws = [need(expert_key(m.experts_path, proj, e)) for e in ids]
                    _check_bits(qws, bits, spec.group_size, f"{m.experts_path}.{proj}")
                    out[f"{prefix}.qweight"] = torch.stack([q.packed() for q in qws])
                    out[f"{prefix}.scales"] = torch.stack([q.scales for q in qws]).to(torch.float16)
                    if not spec.symmetric:
                        out[f"{prefix}.zeros"] = torch.stack([q.zeros for q in qws])
                if bias is not None:
                    out[f"{prefix}.bias"] = bias[idx].detach().to(dtype).contiguous()
    for path, bits in spec.linears.items():
        linear = model.get_submodule(path)
        q = need(path)
        _check_bits([q], bits, spec.group_size, path)
        out[f"{path}.qweight"] = q.packed().unsqueeze(0)
        out[f"{path}.scales"] = q.scales.to(torch.float16).unsqueeze(0)
        if not spec.symmetric:
            out[f"{path}.zeros"] = q.zeros.unsqueeze(0)
        if linear.bias is not None:
            out[f"{path}.bias"] = linear.bias.detach().to(dtype).unsqueeze(0)
    return {k: v.contiguous() for k, v in out.items()}


def _check_bits(qws, bits: int, group_size: int, where: str) -> None:
    for q in qws:
        if q.bits != bits or q.group_size != group_size:
            raise MoecompressError(
                f"{where}: quantized weights are {q.bits}-bit/group {q.group_size}, the plan says {bits}-bit/group "
                f"{group_size}; re-run the quantize stage"
            )


def write_checkpoint(out_dir: str | Path, config, tensors: dict[str, torch.Tensor], spec: FormatSpec,
                     dtype: torch.dtype = torch.bfloat16, tokenizer=None, generation_config=None,
                     max_shard_size: int | str = "2GB", manifest: dict | None = None, overwrite: bool = False) -> Path:
    """Atomically write config.json (+quantization_config), safetensors shards, index, manifest, tokenizer."""
    with atomic_dir(out_dir, overwrite) as tmp:
        config = copy.deepcopy(config)
        config.quantization_config = spec.to_dict()
        config.dtype = str(dtype).removeprefix("torch.")
        config.save_pretrained(tmp)
        split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
        for filename, names in split.filename_to_tensors.items():
            save_file({n: tensors[n] for n in names}, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        write_manifest(tmp, {"format": "moecompress", **(manifest or {})})
    return Path(out_dir)


def export_checkpoint(model: nn.Module, layout: ModelLayout, plan: BitPlan, quantized: QuantizedTensors, out_dir: str | Path,
                      tokenizer=None, dtype: torch.dtype = torch.bfloat16, held: Mapping[str, set[int]] | None = None,
                      **write_kwargs) -> Path:
    spec = format_spec(plan, layout, held)
    tensors = packed_state_dict(model, layout, spec, quantized, dtype)
    return write_checkpoint(out_dir, model.config, tensors, spec, dtype, tokenizer,
                            getattr(model, "generation_config", None), **write_kwargs)
