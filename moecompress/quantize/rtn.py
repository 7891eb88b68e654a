"""Round-to-nearest group-wise quantization: the parameters of a group and the rounding.

Scales are rounded to float16 *before* the integers are computed (rounded up, so the grid still covers the
group's range), hence dequantizing with the stored float16 scales gives exactly the weights that were chosen.
"""
from __future__ import annotations

import torch

from moecompress.artifacts.quantized import QuantizedWeight
from moecompress.errors import MoecompressError
from moecompress.format.pack import PACK_BITS, dequantize_values

# Scales are clamped into float16's positive finite range: a constant (or all-zero) group gets the smallest
# float16 instead of a zero scale, and no scale ever becomes inf.
_MIN_SCALE = 2.0**-24  # smallest positive float16 (subnormal)
_MAX_SCALE = 65504.0  # largest finite float16


def check_quant_args(in_features: int, bits: int, group_size: int) -> None:
    if bits not in PACK_BITS:
        raise MoecompressError(
            f"cannot quantize to {bits!r} bits; quantized bit-widths are {', '.join(map(str, PACK_BITS))} "
            "(16 means kept in bf16: leave such weights unquantized)"
        )
    if group_size <= 0 or in_features % group_size:
        raise MoecompressError(
            f"in_features {in_features} is not a multiple of group_size {group_size}; pick a group_size that divides it"
        )


def _float16_at_least(s: torch.Tensor) -> torch.Tensor:
    """float32 s (positive, finite, <= float16 max) -> the smallest float16 >= s."""
    s16 = s.to(torch.float16)
    next_up = (s16.view(torch.int16) + 1).view(torch.float16)  # next float16 of a positive value
    return torch.where(s16.to(torch.float32) < s, next_up, s16)


# Range shrink factors tried by the clipping search ("mse"): the group's [min, max] scaled by each, the one with the
# least squared rounding error kept. 1.0 is plain min/max, so the search is never worse than it on its own metric.
CLIP_GRID = tuple(1.0 - 0.04 * i for i in range(13))  # 1.00 .. 0.52
CLIPS = ("minmax", "mse")


def quant_params(w: torch.Tensor, bits: int, symmetric: bool, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max parameters of each group w [..., g] -> (scales float16 [...], zeros uint8 [...] | None).

    Asymmetric: the range [min(w, 0), max(w, 0)] is split into 2**bits - 1 steps, zero = round(-min/scale).
    Symmetric: scale = max|w| / (2**(bits-1) - 1), zero fixed at 2**(bits-1), levels -(2**(bits-1))..2**(bits-1)-1.
    `shrink` < 1 scales the range first: weights beyond it are clipped to the grid's ends.
    """
    w = w.to(torch.float32)
    if symmetric:
        scale = w.abs().amax(dim=-1) * shrink / ((1 << (bits - 1)) - 1)
    else:
        lo = w.amin(dim=-1).clamp(max=0) * shrink
        hi = w.amax(dim=-1).clamp(min=0) * shrink
        scale = (hi - lo) / ((1 << bits) - 1)
    scales = _float16_at_least(scale.clamp(_MIN_SCALE, _MAX_SCALE))
    if symmetric:
        return scales, None
    zeros = torch.round(-lo / scales.to(torch.float32)).clamp(0, (1 << bits) - 1).to(torch.uint8)
    return scales, zeros


def clipped_params(
    w: torch.Tensor, bits: int, symmetric: bool, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Parameters of each group w [..., g] chosen by a clipping search: of the ranges min/max x `CLIP_GRID`, the one
    whose rounding has the least squared error, each input weighted by `importance` (broadcast to w, e.g. diag H;
    None: unweighted). Same output as `quant_params`."""
    w = w.to(torch.float32)
    best, best_err = None, None
    for shrink in CLIP_GRID:
        s, z = quant_params(w, bits, symmetric, shrink)
        zz = None if z is None else z[..., None]
        d = dequantize_values(quantize_values(w, s[..., None], zz, bits), s[..., None], zz, bits) - w
        err = (d * d if importance is None else d * d * importance).sum(dim=-1)
        if best is None:
            best, best_err = [s, z], err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[0] = torch.where(better, s, best[0])
        if z is not None:
            best[1] = torch.where(better, z, best[1])
    return best[0], best[1]


def check_clip(clip: str, key: str = "clip") -> None:
    if clip not in CLIPS:
        raise MoecompressError(f"{key} {clip!r}; allowed: {', '.join(CLIPS)}")


def group_params(w: torch.Tensor, bits: int, symmetric: bool, clip: str = "minmax",
                 importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`quant_params` (clip "minmax") or `clipped_params` (clip "mse") of each group w [..., g]."""
    check_clip(clip)
    return clipped_params(w, bits, symmetric, importance) if clip == "mse" else quant_params(w, bits, symmetric)


def quantize_values(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Round w to the grid of (scales, zeros), all broadcast together -> uint8 integers in 0..2**bits-1."""
    z = float(1 << (bits - 1)) if zeros is None else zeros.to(torch.float32)
    q = torch.round(w.to(torch.float32) / scales.to(torch.float32)) + z
    return q.clamp(0, (1 << bits) - 1).to(torch.uint8)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip: str = "minmax",
                 importance: torch.Tensor | None = None) -> QuantizedWeight:
    """Group-wise round-to-nearest of w [..., out, in] (groups of `group_size` consecutive inputs); the group
    parameters by `group_params` (importance: [in] weights of the inputs' squared errors, for clip "mse")."""
    in_features = w.shape[-1]
    check_quant_args(in_features, bits, group_size)
    if not torch.isfinite(w).all():
        raise MoecompressError("cannot quantize a weight with NaN or inf entries")
    groups = w.reshape(*w.shape[:-1], in_features // group_size, group_size)  # [..., out, in/g, g]
    if importance is not None:
        importance = importance.to(device=w.device, dtype=torch.float32).reshape(in_features // group_size, group_size)
    scales, zeros = group_params(groups, bits, symmetric, clip, importance)  # [..., out, in/g]
    q = quantize_values(groups, scales[..., None], None if zeros is None else zeros[..., None], bits)
    return QuantizedWeight(q=q.reshape(w.shape), scales=scales, zeros=zeros, bits=bits, group_size=group_size)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip: str = "minmax") -> torch.Tensor:
    """Quantize then dequantize, in w's dtype; bits 16 returns w itself."""
    if bits == 16:
        return w
    return quantize_rtn(w, bits, group_size, symmetric, clip).dequantize(w.dtype)
