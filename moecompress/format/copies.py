"""Low-bit copies of the experts: `expert_copies.safetensors`, beside a checkpoint's weight files.

When `quantization_config.experts[P].copy_bits` is set, every expert of P has a second copy at that bit-width, made
with the run's quantizer (same group_size and symmetry as the main groups). For each projection one group holds
the E experts the main groups of that projection hold, in id order, under copy_prefix(P, proj, bits)
(format/spec.py): in a checkpoint all num_experts (slot e == expert e), in one server's bundle (`moecompress shard`)
that server's experts (`copy_experts`; `bundle_copies` slices them from the checkpoint's):
    <prefix>.qweight  uint8   [E, out, in*bits/8]
    <prefix>.scales   float16 [E, out, in/group_size]
    <prefix>.zeros    uint8   [E, out, in/group_size]   (asymmetric only)
    <prefix>.bias     dtype   [E, out]                  (experts with biases only; the same values as the main bias)
The copies live in their own file, listed in the manifest but not in the weight files: loading the model as a
whole (transformers' from_pretrained and the strict tensor check) never reads them; the runtime's expert store
reads them with `read_copy_group`.

Imports only torch, safetensors, the format and our exception type: the runtime depends on this file.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.format.files import weight_files
from moecompress.format.headers import TensorHeader, read_header
from moecompress.format.sizes import DTYPE_BYTES
from moecompress.format.spec import FormatSpec, copy_prefix, group_prefix

COPIES_FILE = "expert_copies.safetensors"
PARTS = ("qweight", "scales", "zeros", "bias")


def copies_file(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / COPIES_FILE


def copy_experts(spec: FormatSpec, experts_path: str, proj: str) -> tuple[int, ...]:
    """The expert ids of the copy group's rows, in order: the experts the projection's main groups hold."""
    return spec.experts[experts_path].held(proj)


def bundle_copies(checkpoint_dir: str | Path, spec: FormatSpec, sub: FormatSpec) -> dict[str, torch.Tensor]:
    """The tensors of a bundle's expert_copies.safetensors: for every experts module and projection of `sub` (the
    bundle's spec, with copy_bits), the rows of the checkpoint's copy group (spec) for the experts `sub` holds."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    path = copies_file(checkpoint_dir)
    with safe_open(str(path), framework="pt") as f:
        for experts_path, es in sub.experts.items():
            if es.copy_bits is None:
                continue
            for proj in es.groups:
                rows = copy_experts(spec, experts_path, proj)
                at = {e: i for i, e in enumerate(rows)}
                keep = torch.tensor([at[e] for e in copy_experts(sub, experts_path, proj)], dtype=torch.int64)
                prefix = copy_prefix(experts_path, proj, es.copy_bits)
                for part, t in _group(f, prefix, str(path)).items():
                    out[f"{prefix}.{part}"] = t[keep].contiguous()
    return out


def copy_bytes(directory: str | Path, spec: FormatSpec) -> dict[tuple[str, int], int]:
    """(experts path, expert id) -> stored bytes of its low-bit copy (all projections), from the copies file's header;
    empty without copies."""
    if spec.copy_bits is None:
        return {}
    header = read_header(copies_file(directory))
    out: dict[tuple[str, int], int] = {}
    for path, es in spec.experts.items():
        if es.copy_bits is None:
            continue
        for proj in es.groups:
            rows = copy_experts(spec, path, proj)
            prefix = copy_prefix(path, proj, es.copy_bits)
            for part in PARTS:
                h = header.get(f"{prefix}.{part}")
                if h is not None and rows:
                    per_row = math.prod(h.shape) * DTYPE_BYTES[h.dtype] // len(rows)
                    for e in rows:
                        out[(path, e)] = out.get((path, e), 0) + per_row
    return out


def read_copy_group(source, experts_path: str, proj: str, bits: int) -> dict[str, torch.Tensor]:
    """{"qweight", "scales"[, "zeros"][, "bias"]} of the copy group of one projection: the rows of `copy_experts`.

    `source`: an open `safetensors.safe_open` handle of expert_copies.safetensors, that file's path, or the
    checkpoint directory."""
    prefix = copy_prefix(experts_path, proj, bits)
    if hasattr(source, "get_tensor") and hasattr(source, "keys"):
        return _group(source, prefix, str(source))
    from safetensors import SafetensorError, safe_open

    path = Path(source)
    path = copies_file(path) if path.is_dir() else path
    if not path.is_file():
        raise MoecompressError(f"{path} is missing: this checkpoint has no low-bit copies (re-export with "
                               "`store: {copy_bits: 2}` in the recipe)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return _group(f, prefix, str(path))
    except SafetensorError as exc:
        raise MoecompressError(f"{path}: unreadable ({exc}); re-export the checkpoint") from exc


def _group(f, prefix: str, where: str) -> dict[str, torch.Tensor]:
    keys = set(f.keys())
    if f"{prefix}.qweight" not in keys:
        raise MoecompressError(f"{where}: no copy group {prefix} (its copies are at other bits, or not of this "
                               "experts module)")
    return {part: f.get_tensor(f"{prefix}.{part}") for part in PARTS if f"{prefix}.{part}" in keys}


def expected_copy_headers(spec: FormatSpec, weights: dict[str, TensorHeader]) -> dict[str, TensorHeader]:
    """Every tensor expert_copies.safetensors must hold, with dtype and shape, from the spec and the headers of the
    main weight files (each projection's out/in features and bias dtype are read from its main groups)."""
    out: dict[str, TensorHeader] = {}
    for path, es in spec.experts.items():
        bits = es.copy_bits
        if bits is None:
            continue
        for proj, by_bits in es.groups.items():
            out_f, in_f, bias = _proj_shape(spec, weights, path, proj, by_bits)
            if in_f % 8 or in_f % spec.group_size:
                raise MoecompressError(f"{path}.{proj}: in_features {in_f} cannot hold {bits}-bit copies of "
                                       f"group_size {spec.group_size}")
            e, groups, prefix = len(es.held(proj)), in_f // spec.group_size, copy_prefix(path, proj, bits)
            out[f"{prefix}.qweight"] = TensorHeader("U8", (e, out_f, in_f * bits // 8))
            out[f"{prefix}.scales"] = TensorHeader("F16", (e, out_f, groups))
            if not spec.symmetric:
                out[f"{prefix}.zeros"] = TensorHeader("U8", (e, out_f, groups))
            if bias is not None:
                out[f"{prefix}.bias"] = TensorHeader(bias, (e, out_f))
    return out


def _proj_shape(spec, weights, path, proj, by_bits) -> tuple[int, int, str | None]:
    """(out_features, in_features, bias dtype or None) of one projection, from any of its main groups."""
    for b in sorted(by_bits):
        prefix = group_prefix(path, proj, b)
        main = weights.get(f"{prefix}.weight" if b == 16 else f"{prefix}.qweight")
        if main is None or len(main.shape) != 3:
            continue
        bias = weights.get(f"{prefix}.bias")
        return main.shape[1], main.shape[2] if b == 16 else main.shape[2] * 8 // b, bias and bias.dtype
    raise MoecompressError(f"{path}.{proj}: no main group in the weight files to size its copies from")


def check_copies(directory: str | Path, spec: FormatSpec) -> None:
    """expert_copies.safetensors is present exactly when the spec has copies, with exactly the implied tensors."""
    directory = Path(directory)
    path = copies_file(directory)
    if spec.copy_bits is None:
        if path.exists():
            raise MoecompressError(f"{path}: the quantization_config has no copy_bits, yet the file exists; remove it "
                                   "or re-export")
        return
    if not path.exists():
        raise MoecompressError(f"{directory}: quantization_config has copy_bits {spec.copy_bits} but "
                               f"{COPIES_FILE} is missing; copy it back or re-export")
    weights: dict[str, TensorHeader] = {}
    for name in weight_files(directory):
        weights.update(read_header(directory / name))
    want, have = expected_copy_headers(spec, weights), read_header(path)
    for key in sorted(set(want) | set(have)):
        if key not in have:
            raise MoecompressError(f"{path}: tensor {key} is missing; re-export the checkpoint")
        if key not in want:
            raise MoecompressError(f"{path}: unexpected tensor {key} (quantization_config does not imply it)")
        if have[key] != want[key]:
            raise MoecompressError(f"{path}: tensor {key} is {have[key].dtype} {list(have[key].shape)}, expected "
                                   f"{want[key].dtype} {list(want[key].shape)}")
