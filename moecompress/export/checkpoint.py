"""Write a moecompress checkpoint: the model's own tensors with experts and chosen linears replaced by packed groups.

All files are written into a temporary sibling directory that is renamed into place at the end, so an interrupted
export never leaves a directory that looks complete. Besides the model: the expert statistics for the runtime's
expert store (format/expert_stats.py) and, when the plan has copy_bits, the low-bit copies (format/copies.py).
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
from moecompress.format.copies import COPIES_FILE
from moecompress.format.expert_stats import ExpertStats, write_expert_stats
from moecompress.format.files import INDEX, atomic_dir, write_manifest
from moecompress.format.spec import ExpertsSpec, FormatSpec, copy_prefix, group_prefix


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
        experts[m.experts_path] = ExpertsSpec(num_experts=m.num_experts, groups=groups, copy_bits=plan.copy_bits)
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


def copy_state_dict(model: nn.Module, layout: ModelLayout, spec: FormatSpec, copies: QuantizedTensors,
                    dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Tensors of expert_copies.safetensors: per (experts path, proj) one group of every expert at copy_bits;
    `copies` holds a QuantizedWeight per expert_key(...) at those bits (the quantize stage's copies)."""
    bits, out = spec.copy_bits, {}
    for m in layout.moe_layers:
        experts_module = model.get_submodule(m.experts_path)
        for proj in spec.experts[m.experts_path].groups:
            keys = [expert_key(m.experts_path, proj, e) for e in range(m.num_experts)]
            missing = [k for k in keys if k not in copies.weights]
            if missing:
                raise MoecompressError(f"no {bits}-bit copy of {missing[0]}; re-run the quantize stage with copies")
            qws = [copies.weights[k] for k in keys]
            _check_bits(qws, bits, spec.group_size, f"{m.experts_path}.{proj} (copies)")
            prefix = copy_prefix(m.experts_path, proj, bits)
            out[f"{prefix}.qweight"] = torch.stack([q.packed() for q in qws])  # [E, out, in*bits/8]
            out[f"{prefix}.scales"] = torch.stack([q.scales for q in qws]).to(torch.float16)  # [E, out, in/g]
            if not spec.symmetric:
                out[f"{prefix}.zeros"] = torch.stack([q.zeros for q in qws])
            bias = proj_bias(experts_module, m, proj)
            if bias is not None:
                out[f"{prefix}.bias"] = bias.detach().to(dtype)  # [E, out]
    return {k: v.contiguous() for k, v in out.items()}


def _check_bits(qws, bits: int, group_size: int, where: str) -> None:
    for q in qws:
        if q.bits != bits or q.group_size != group_size:
            raise MoecompressError(
                f"{where}: quantized weights are {q.bits}-bit/group {q.group_size}, the plan says {bits}-bit/group "
                f"{group_size}; re-run the quantize stage"
            )


def _check_stats(stats: ExpertStats | None, spec: FormatSpec) -> None:
    """The expert stats describe the checkpoint's MoE layers, in its order, with its expert count."""
    if stats is None:
        return
    counts = {es.num_experts for es in spec.experts.values()}
    if (stats.num_layers != len(spec.experts) or counts != {stats.num_experts}
            or (stats.experts_paths and stats.experts_paths != tuple(spec.experts))):
        raise MoecompressError(f"expert stats of {stats.num_layers} MoE layers x {stats.num_experts} experts "
                               f"{list(stats.experts_paths)} do not describe this checkpoint's {len(spec.experts)} "
                               f"layers {list(spec.experts)} of {sorted(counts)} experts; calibrate this model")


def write_checkpoint(out_dir: str | Path, config, tensors: dict[str, torch.Tensor], spec: FormatSpec,
                     dtype: torch.dtype = torch.bfloat16, tokenizer=None, generation_config=None,
                     max_shard_size: int | str = "2GB", manifest: dict | None = None, overwrite: bool = False,
                     expert_stats: ExpertStats | None = None, copy_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Atomically write config.json (+quantization_config), safetensors shards, index, tokenizer, the expert
    statistics (`expert_stats.safetensors`, when given), the low-bit copies (`expert_copies.safetensors`, when the
    spec has copy_bits) and the manifest listing them all."""
    if (spec.copy_bits is None) != (copy_tensors is None):
        raise MoecompressError(f"the spec has copy_bits {spec.copy_bits}, the tensors of copies "
                               f"{'are missing' if copy_tensors is None else 'were given'}; both or neither")
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
        if expert_stats is not None:
            write_expert_stats(tmp, expert_stats)
        if copy_tensors is not None:
            save_file(copy_tensors, tmp / COPIES_FILE, metadata={"format": "pt"})
        write_manifest(tmp, {"format": "moecompress", **(manifest or {})})
    return Path(out_dir)


def export_checkpoint(model: nn.Module, layout: ModelLayout, plan: BitPlan, quantized: QuantizedTensors, out_dir: str | Path,
                      tokenizer=None, dtype: torch.dtype = torch.bfloat16, held: Mapping[str, set[int]] | None = None,
                      copies: QuantizedTensors | None = None, **write_kwargs) -> Path:
    """`copies`: the quantize stage's low-bit copies, required when plan.copy_bits is set."""
    spec = format_spec(plan, layout, held)
    _check_stats(write_kwargs.get("expert_stats"), spec)
    if (plan.copy_bits is None) != (copies is None):
        raise MoecompressError(f"the bit plan has copy_bits {plan.copy_bits}, but low-bit copies were "
                               f"{'not given' if copies is None else 'given'}; quantize with the plan's copy_bits")
    tensors = packed_state_dict(model, layout, spec, quantized, dtype)
    copy_tensors = None if copies is None else copy_state_dict(model, layout, spec, copies, dtype)
    return write_checkpoint(out_dir, model.config, tensors, spec, dtype, tokenizer,
                            getattr(model, "generation_config", None), copy_tensors=copy_tensors, **write_kwargs)
