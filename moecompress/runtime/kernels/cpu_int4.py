"""PyTorch's CPU int4 weight-only matmul, adapted to the moecompress group format.

The kernel computes x @ W^T with W[n, k] = (q - 8) * scale + zero per group, from an opaque packed layout. Our
format stores W = (q - z) * s, so zero = (8 - z) * s. The packed layout is private to PyTorch; `unpack_int4` recovers
the exact integers by running the kernel on an identity matrix (scale 1, zero 8 gives W = q).

The kernel works on tiles of 4 rows of x and dequantizes its weights once per tile, so its cost grows with the rows;
past a few dozen rows per expert, dequantizing once and running a bf16 matmul is faster. `block_layout` checks
(by packing a probe) whether the packing is the plain blocked one of PyTorch's vectorized CPU kernels, in which case
`unpack_blocked` reads the integers straight out of it with a few bit operations.
"""
from __future__ import annotations

import torch

INNER_K_TILES = 2
_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F  # the low 4 bits of each byte of an int64


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: uint8 [n, k] values 0..15 -> PyTorch's CPU int4 packed layout (uint8 [n, k/2])."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), INNER_K_TILES)


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """scales [..., n, k/g] float16, zeros [..., n, k/g] uint8 or None (symmetric: 8) -> [..., k/g, n, 2] in `dtype`."""
    s = scales.float()
    z = torch.full_like(s, 8.0) if zeros is None else zeros.float()
    return torch.stack([s, (8.0 - z) * s], dim=-1).transpose(-3, -2).contiguous().to(dtype)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    """x [m, k] -> [m, n]; x is cast to the dtype of `sz`."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(sz.dtype).contiguous(), packed, group_size, sz)


def unpack_int4(packed: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Exact inverse of `pack_int4`: uint8 [n, k]."""
    n = packed.shape[0]
    ones = torch.ones(k // group_size, n, dtype=torch.float32)
    sz = torch.stack([ones, torch.full_like(ones, 8.0)], dim=-1)  # w = (q - 8) * 1 + 8 = q
    eye = torch.eye(k, dtype=torch.float32)
    q_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, group_size, sz)  # [k, n]
    return q_t.t().round().to(torch.uint8).contiguous()


def unpack_blocked(packed: torch.Tensor, block: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """packed [..., n, k/2] in the blocked layout of `block` rows -> the integers transposed, [..., k, n] in `dtype`.

    Blocked layout: for each block of `block` rows, k-major, byte j of a k holds row j (low nibble) and row
    j + block/2 (high nibble). Split on int64 words, 16 nibbles at a time, into the low and high halves of each block
    in the packed order (contiguous: writing the transposed order runs the bit operations on rows of 4 words, 1.3-2.5x
    slower at refmoe's expert shapes, 2 threads); then one copy transposes and converts to `dtype`.
    """
    *lead, n, half_k = packed.shape
    k, blocks = 2 * half_k, n // block
    words = packed.reshape(*lead, blocks, k, block // 2).view(torch.int64)  # [..., n/b, k, b/16]
    halves = torch.empty(*lead, blocks, 2, k, block // 16, dtype=torch.int64, device=packed.device)
    torch.bitwise_and(words, _LOW_NIBBLES, out=halves[..., 0, :, :])  # rows 0 .. b/2 of each block
    torch.bitwise_and(words >> 4, _LOW_NIBBLES, out=halves[..., 1, :, :])  # rows b/2 .. b
    q = halves.view(torch.uint8).view(*lead, blocks, 2, k, block // 2)
    out = torch.empty(*lead, k, n, dtype=dtype, device=packed.device)
    out.view(*lead, k, blocks, 2, block // 2).copy_(q.movedim(-2, -4))  # [..., k, n/b, 2, b/2]
    return out


def pack_blocked(q: torch.Tensor, block: int = 64) -> torch.Tensor:
    """q uint8 [..., n, k] values 0..15 -> the blocked layout that `unpack_blocked` reads, [..., n, k/2] (without
    PyTorch's packer, whose layout depends on the CPU: the fused AMX kernel reads 64-row blocks on any machine)."""
    *lead, n, k = q.shape
    halves = q.reshape(*lead, n // block, 2, block // 2, k)  # rows j and j + block/2 of each block
    byte = halves[..., 0, :, :] | (halves[..., 1, :, :] << 4)  # [..., n/b, b/2, k]
    return byte.transpose(-2, -1).contiguous().view(*lead, n, k // 2)


def block_layout(n: int, k: int) -> int | None:
    """The block size (64 on AVX-512, 32 on AVX2) when PyTorch packs an [n, k] weight in the plain blocked layout
    that `unpack_blocked` reads, checked on a probe of two blocks; None when it does not (other CPUs, odd shapes)."""
    if not available() or k % 16:
        return None
    gen = torch.Generator().manual_seed(0)
    for block in (64, 32):
        if n % block:
            continue
        probe = torch.randint(0, 16, (2 * block, k), dtype=torch.uint8, generator=gen)
        packed = pack_int4(probe)
        if packed.shape == (2 * block, k // 2) and torch.equal(unpack_blocked(packed, block).t(), probe):
            return block
    return None
