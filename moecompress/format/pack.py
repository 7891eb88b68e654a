"""Bit packing and group-wise dequantization: the primitives shared by export and the runtime.

Packed layout: values are taken in blocks of 8; a block of `bits`-bit values is one `bits`-byte little-endian
integer in which value i occupies bits [i*bits, (i+1)*bits). So 8 values cost exactly `bits` bytes (3-bit: 3 bytes)
and a row of n values costs n*bits/8 bytes. Dequantization: w = (q - z) * s per group of `group_size` consecutive
inputs; symmetric matrices store no zeros and use z = 2**(bits-1).

Imports only torch (and our exception type): the runtime depends on this file.
"""
from __future__ import annotations

import torch

from moecompress.errors import MoecompressError

PACK_BITS = (2, 3, 4, 8)  # bit-widths stored as packed integers; 16 means bf16 and is never packed


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise MoecompressError(f"cannot pack {bits!r}-bit values; packed bit-widths are {', '.join(map(str, PACK_BITS))}")


def _check_uint8(t: torch.Tensor, name: str) -> None:
    if t.dtype != torch.uint8:
        raise MoecompressError(f"{name} must be a uint8 tensor, got {t.dtype}")


def _lanes(bits: int):
    """Where each of the 8 values of a block lies: (lane, first byte, bit shift in it, spills into the next byte)."""
    for i in range(8):
        offset = i * bits
        byte, shift = divmod(offset, 8)
        yield i, byte, shift, shift + bits > 8


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit integers q [..., n] (uint8, n a multiple of 8) into uint8 [..., n*bits/8]."""
    _check_bits(bits)
    _check_uint8(q, "q")
    n = q.shape[-1] if q.dim() else 0
    if q.dim() == 0 or n % 8:
        raise MoecompressError(f"pack needs a last dimension that is a multiple of 8, got shape {tuple(q.shape)}")
    if q.numel() and int(q.max()) >= 1 << bits:
        raise MoecompressError(f"value {int(q.max())} does not fit in {bits} bits (allowed 0..{(1 << bits) - 1})")
    if bits == 8:
        return q.clone()
    lead = q.shape[:-1]
    blocks = q.reshape(*lead, n // 8, 8)  # [..., n/8, 8]
    out = torch.zeros(*lead, n // 8, bits, dtype=torch.uint8, device=q.device)  # [..., n/8, bits]
    for i, byte, shift, spills in _lanes(bits):
        v = blocks[..., i]
        out[..., byte] |= v << shift  # uint8 shift drops the bits that belong to the next byte
        if spills:
            out[..., byte + 1] |= v >> (8 - shift)
    return out.reshape(*lead, n * bits // 8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Exact inverse of `pack`: uint8 [..., n*bits/8] -> uint8 [..., n]."""
    _check_bits(bits)
    _check_uint8(packed, "packed")
    if n % 8 or packed.dim() == 0 or packed.shape[-1] != n * bits // 8:
        raise MoecompressError(
            f"cannot unpack {n} values of {bits} bits from shape {tuple(packed.shape)}: "
            f"n must be a multiple of 8 and the last dimension n*bits/8 = {n * bits // 8}"
        )
    if bits == 8:
        return packed.clone()
    lead = packed.shape[:-1]
    blocks = packed.reshape(*lead, n // 8, bits)  # [..., n/8, bits]
    out = torch.empty(*lead, n // 8, 8, dtype=torch.uint8, device=packed.device)  # [..., n/8, 8]
    mask = (1 << bits) - 1
    for i, byte, shift, spills in _lanes(bits):
        v = blocks[..., byte] >> shift
        if spills:
            v = v | (blocks[..., byte + 1] << (8 - shift))
        out[..., i] = v & mask
    return out.reshape(*lead, n)


def dequantize_values(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int) -> torch.Tensor:
    """(q - z) * s elementwise in float32, all arguments broadcast together; zeros None = symmetric, z = 2**(bits-1).

    The one place the dequantization formula is written: quantizers use it for what they optimise, `dequantize`
    for what the runtime computes, so both agree bit for bit.
    """
    z = float(1 << (bits - 1)) if zeros is None else zeros.to(torch.float32)
    return (q.to(torch.float32) - z) * scales.to(torch.float32)


def dequantize_unpacked(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Integers q [..., out, in] (uint8), scales/zeros [..., out, ceil(in/group_size)] -> weights [..., out, in].

    Leading dimensions (a stack of experts) pass through; the last group of a row may be shorter than group_size.
    """
    in_features = q.shape[-1]
    groups = -(-in_features // group_size)
    if scales.shape != q.shape[:-1] + (groups,):
        raise MoecompressError(
            f"scales of shape {tuple(scales.shape)} do not match weights {tuple(q.shape)} with group_size "
            f"{group_size}: expected {tuple(q.shape[:-1]) + (groups,)}"
        )
    if zeros is not None and zeros.shape != scales.shape:
        raise MoecompressError(f"zeros of shape {tuple(zeros.shape)} do not match scales {tuple(scales.shape)}")

    def per_input(t: torch.Tensor) -> torch.Tensor:  # [..., out, groups] -> [..., out, in]
        return t.repeat_interleave(group_size, dim=-1)[..., :in_features]

    z = None if zeros is None else per_input(zeros)
    return dequantize_values(q, per_input(scales), z, bits).to(dtype)


def dequantize(
    qweight_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Packed [..., out, in*bits/8], scales/zeros [..., out, ceil(in/group_size)] -> weights [..., out, in] of dtype."""
    return dequantize_unpacked(unpack(qweight_packed, bits, in_features), scales, zeros, bits, group_size, dtype)
