"""Payload precision of the rows exchanged at a MoE layer: native (the model's dtype, as is: the lossless default),
bf16, int8 with a per-row scale, fp8 (e4m3) with a per-row scale where torch has `float8_e4m3fn`.

`quantize_payload` gives what goes on the wire, `dequantize_payload` what the receiver computes with; `row_bytes`
is the size of one row of H values. Scales are stored as float16 (2 bytes per row). `PRECISION_CODES` is the order
in which the edge runtime's wire headers number them.
"""
from __future__ import annotations

import torch

from moecompress.errors import MoecompressError

_FP8 = getattr(torch, "float8_e4m3fn", None)
_FP8_MAX = 448.0
SCALE_BYTES = 2  # float16 per-row scale


PRECISION_CODES = ("native", "bf16", "int8", "fp8")


def precisions() -> tuple[str, ...]:
    """The payload precisions this torch supports."""
    return ("native", "bf16", "int8") + (("fp8",) if _FP8 is not None else ())


def scaled(precision: str) -> bool:
    """The precision sends a per-row scale."""
    return precision in ("int8", "fp8")


def check_precision(name: str) -> str:
    if name not in precisions():
        raise MoecompressError(f"unknown payload precision {name!r}; allowed: {', '.join(precisions())}")
    return name


def row_bytes(precision: str, hidden_size: int, elem_bytes: int = 2) -> int:
    """Bytes on the wire for one row of `hidden_size` values (`elem_bytes`: the model dtype's, for native)."""
    check_precision(precision)
    if precision == "native":
        return elem_bytes * hidden_size
    return 2 * hidden_size if precision == "bf16" else hidden_size + SCALE_BYTES


def _scale(x: torch.Tensor, qmax: float) -> torch.Tensor:
    amax = x.float().abs().amax(-1, keepdim=True)  # [R, 1]
    return (amax / qmax).clamp_min(1e-12).to(torch.float16).float().clamp_min(6e-8)  # as stored: float16


def quantize_payload(x: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values as sent [R, H], per-row scale [R, 1] float32 or None) of rows `x` [R, H]."""
    check_precision(precision)
    if precision == "native":
        return x, None
    if precision == "bf16":
        return x.to(torch.bfloat16), None
    if precision == "int8":
        scale = _scale(x, 127.0)
        return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale
    scale = _scale(x, _FP8_MAX)
    return (x.float() / scale).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8), scale


def dequantize_payload(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The rows the receiver computes with, in `dtype`."""
    if scale is None:
        return values.to(dtype)
    return (values.float() * scale).to(dtype)


def round_trip(x: torch.Tensor, precision: str) -> torch.Tensor:
    """`x` as the receiver sees it after sending at `precision` (same dtype as `x`)."""
    return dequantize_payload(*quantize_payload(x, precision), x.dtype)
