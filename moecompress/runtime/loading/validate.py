"""Strict structural validation of a checkpoint against the model it builds, before any weight is allocated.

On the meta-device skeleton (no memory): every experts module and linear the quantization_config names exists,
with the model's own expert count and in-features divisible by group_size; after the packed modules replace them,
every tensor the skeleton expects is in the safetensors headers with exactly its shape (and dtype, for packed
integers and float16 scales), and no file holds a tensor the skeleton does not expect. A mismatch is a
MoecompressError naming the tensor, never a transformers LOAD REPORT.

The same checks run whichever way a checkpoint is loaded: `moecompress.from_pretrained`, transformers'
`from_pretrained` after `import moecompress` (the registered quantizer calls `check_load`), and `moecompress verify`.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.format.files import INDEX, NO_VERIFY_ENV, read_json_object, refuse_partial, verify_files, weight_files
from moecompress.format.headers import TensorHeader, read_header
from moecompress.format.spec import FormatSpec
from moecompress.runtime.experts.packed_experts import PackedExperts
from moecompress.runtime.experts.packed_linear import PackedLinear

FLOAT_DTYPES = {"F16", "BF16", "F32"}
EXACT_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}

# The directory whose files moecompress.from_pretrained has just checked (or was told not to): the quantizer's hook
# skips hashing it a second time. A ContextVar, so concurrent loads in other threads are not affected.
_CHECKED: ContextVar[str | None] = ContextVar("moecompress_checked_dir", default=None)


@contextmanager
def files_checked(directory: str | Path) -> Iterator[None]:
    token = _CHECKED.set(str(Path(directory).resolve()))
    try:
        yield
    finally:
        _CHECKED.reset(token)


def check_files_once(directory: Path) -> None:
    """The manifest check for a load that did not come through moecompress.from_pretrained."""
    refuse_partial(directory)
    if _CHECKED.get() == str(directory.resolve()):
        return
    if os.environ.get(NO_VERIFY_ENV) == "1":
        return
    verify_files(directory)


def experts_count(module: nn.Module, proj: str) -> tuple[int, int, int]:
    """(experts, in_features, out_features) of a fused experts module's projection, canonical [out, in]."""
    param = getattr(module, f"{proj}_proj", None)
    if not isinstance(param, torch.Tensor) or param.dim() != 3:
        raise MoecompressError(f"{type(module).__name__} has no fused 3-D `{proj}_proj`; is this the right model?")
    n, a, b = param.shape
    return (n, a, b) if getattr(module, "is_transposed", False) else (n, b, a)


def check_against_model(spec: FormatSpec, model: nn.Module) -> None:
    """Every module the spec names exists with matching expert counts, projections and divisible in-features."""
    for path, es in spec.experts.items():
        module = _submodule(model, path)
        names = ["gate_up" if getattr(module, "has_gate", True) else "up", "down"]
        if sorted(es.groups) != sorted(names):
            raise MoecompressError(f"{path}: checkpoint projections {sorted(es.groups)} do not match the model's {names}")
        for proj in names:
            n, in_f, _ = experts_count(module, proj)
            if es.num_experts != n:
                raise MoecompressError(f"{path}: quantization_config says num_experts {es.num_experts}, the model "
                                       f"config has {n}")
            if any(b != 16 for b in es.groups[proj]) and in_f % spec.group_size:
                raise MoecompressError(f"{path}.{proj}: group_size {spec.group_size} does not divide in_features {in_f}")
    for path in spec.linears:
        linear = _submodule(model, path)
        if not isinstance(linear, nn.Linear):
            raise MoecompressError(f"linears.{path} is a {type(linear).__name__}, not an nn.Linear")
        if linear.in_features % spec.group_size:
            raise MoecompressError(f"linears.{path}: group_size {spec.group_size} does not divide in_features "
                                   f"{linear.in_features}")


def _submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise MoecompressError(f"quantization_config names module {path!r}, which this model does not have") from None


def stored_tensors(directory: Path) -> dict[str, TensorHeader]:
    """Every tensor of the checkpoint's weight files, from their headers; the index must agree with the files."""
    names = weight_files(directory)
    index = read_json_object(directory / INDEX, "shard index")["weight_map"] if (directory / INDEX).exists() else None
    out: dict[str, TensorHeader] = {}
    for name in names:
        for key, header in read_header(directory / name).items():
            if key in out:
                raise MoecompressError(f"{directory}: tensor {key} is stored twice")
            if index is not None and index.get(key) != name:
                raise MoecompressError(f"{directory}/{INDEX}: tensor {key} is in {name}, the index says {index.get(key)}")
            out[key] = header
    if index is not None and len(index) != len(out):
        missing = sorted(set(index) - set(out))[0]
        raise MoecompressError(f"{directory}/{INDEX} lists tensor {missing}, which no weight file holds")
    return out


def check_tensors(model: nn.Module, stored: dict[str, TensorHeader], where: str, partial: bool = False) -> None:
    """The stored tensors are exactly those the (packed, meta) model expects, with their shapes and dtypes.

    `partial`: a server bundle that holds experts only; the dense tensors may be absent, the packed ones may not.
    """
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    expected = model.state_dict()
    packed = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, (PackedExperts, PackedLinear)))
    missing = sorted(k for k in expected if k not in stored and k not in tied and not (partial and not k.startswith(packed)))
    if missing:
        raise MoecompressError(f"{where}: tensor {missing[0]} is missing from the weight files"
                               f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; re-export the checkpoint")
    extra = sorted(k for k in stored if k not in expected)
    if extra:
        raise MoecompressError(f"{where}: unexpected tensor {extra[0]} in the weight files (quantization_config does "
                               "not imply it); re-export the checkpoint")
    for key, header in stored.items():
        t = expected[key]
        if tuple(t.shape) != header.shape:
            raise MoecompressError(f"{where}: tensor {key} has shape {list(header.shape)}, the model and "
                                   f"quantization_config imply {list(t.shape)}")
        want = ("F16",) if key.endswith(".scales") else (EXACT_DTYPES[t.dtype],) if t.dtype in EXACT_DTYPES else \
            tuple(sorted(FLOAT_DTYPES))
        if header.dtype not in want:
            raise MoecompressError(f"{where}: tensor {key} is {header.dtype}, expected {' or '.join(want)}")


def check_load(model: nn.Module, spec: FormatSpec, directory: Path, replace) -> None:
    """The quantizer's hook: files (once), the spec against the skeleton, swap in packed modules, the tensors."""
    check_files_once(directory)
    check_against_model(spec, model)
    replace()
    check_tensors(model, stored_tensors(directory), str(directory))
