"""Swap a model's experts modules and dense linears for their packed forms, as a FormatSpec describes.

Used before weights are loaded (the model may live on the meta device): shapes come from the model's own modules.
"""
from __future__ import annotations

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.format.spec import FormatSpec
from moecompress.runtime.loading.file_pages import release_unused
from moecompress.runtime.experts.packed_experts import PackedExperts
from moecompress.runtime.experts.packed_group import PackedGroup
from moecompress.runtime.experts.packed_linear import PackedLinear


def proj_shapes(experts: nn.Module, names) -> list[tuple[str, int, int]]:
    """(proj, in_features, out_features) of a fused experts module, canonical orientation [out, in]."""
    transposed = bool(getattr(experts, "is_transposed", False))
    shapes = []
    for name in names:
        param = getattr(experts, f"{name}_proj", None)
        if not isinstance(param, torch.Tensor) or param.dim() != 3:
            raise MoecompressError(f"{type(experts).__name__} has no fused 3-D `{name}_proj`; is this the right model?")
        a, b = param.shape[1:]
        shapes.append((name, a, b) if transposed else (name, b, a))
    return shapes


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _get(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise MoecompressError(f"checkpoint names module {path!r}, which this model does not have") from exc


def replace_modules(model: nn.Module, spec: FormatSpec, dtype: torch.dtype, device=None) -> nn.Module:
    for path, experts_spec in spec.experts.items():
        template = _get(model, path)
        first = "gate_up" if getattr(template, "has_gate", True) else "up"
        names = [first, "down"]
        if set(experts_spec.groups) - set(names):
            raise MoecompressError(f"{path}: checkpoint projections {sorted(experts_spec.groups)} do not match {names}")
        packed = PackedExperts(template, proj_shapes(template, names), experts_spec, spec.group_size, spec.symmetric,
                               dtype=dtype, device=device)
        _set_module(model, path, packed)
    for path, bits in spec.linears.items():
        linear = _get(model, path)
        if not isinstance(linear, nn.Linear):
            raise MoecompressError(f"{path} is a {type(linear).__name__}, not an nn.Linear; cannot hold packed weights")
        _set_module(model, path, PackedLinear(linear.in_features, linear.out_features, bits, spec.group_size,
                                              spec.symmetric, linear.bias is not None, dtype=dtype, device=device))
    return model


def prepare_kernels(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Convert packed groups to the fastest kernel layout of their device (after weights are loaded), dropping the
    file pages that only converted tensors read (file_pages.py) as soon as each group is converted: RSS holds each
    weight once, and the peak exceeds that by one group."""
    release_unused(model)  # tensors transformers converted while loading (dtype changes, fused experts)
    for module in model.modules():
        if isinstance(module, PackedGroup):
            before = {t.data_ptr() for t in module.buffers()}
            module.prepare(compute_dtype)
            if {t.data_ptr() for t in module.buffers()} != before:
                release_unused(model)
