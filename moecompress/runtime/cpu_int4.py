"""PyTorch's CPU int4 weight-only matmul, adapted to the moecompress group format.

The kernel computes x @ W^T with W[n, k] = (q - 8) * scale + zero per group, from an opaque packed layout. Our
format stores W = (q - z) * s, so zero = (8 - z) * s. The packed layout is private to PyTorch; `unpack_int4` recovers
the exact integers by running the kernel on an identity matrix (scale 1, zero 8 gives W = q).
"""
from __future__ import annotations

import torch

INNER_K_TILES = 2


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: uint8 [n, k] values 0..15 -> PyTorch's CPU int4 packed layout (uint8 [n, k/2])."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), INNER_K_TILES)


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """scales [n, k/g] float16, zeros [n, k/g] uint8 or None (symmetric: 8) -> [k/g, n, 2] in `dtype`."""
    s = scales.float()
    z = torch.full_like(s, 8.0) if zeros is None else zeros.float()
    return torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous().to(dtype)


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
