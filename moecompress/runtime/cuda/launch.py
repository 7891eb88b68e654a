"""One launch per (projection, bit-width) group: tile shapes per path and the kernel call.

`Config` gives packed_kernel's tile: BN output columns per program, BK values of K per step, warps and pipeline
stages. DECODE and PREFILL are the defaults of the two paths (kernel_registry.py lists them under
("cuda", bits, path)); eval/bench_gpu.py measures alternatives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moecompress.runtime.cuda.routing import Tables


@dataclass(frozen=True)
class Config:
    block_n: int  # BN: output columns per program
    block_k: int  # BK: values of K per step (a multiple of 32)
    num_warps: int = 4
    num_stages: int = 3


# decode: BM 16 (tl.dot's smallest M), narrow column tiles so that the few hit experts still fill the GPU
DECODE = {bits: Config(32, 256) for bits in (2, 3, 4, 8, 16)}
PREFILL = {bits: Config(128, 128, num_warps=8) for bits in (2, 3, 4, 8, 16)}
GEMV = Config(32, 128)  # one token per call: gemv_kernel (CUDA cores, no shared memory)
GEMV_ENABLED = True
DECODE_ROWS = 16  # BM of the decode path: tokens per call up to which each expert's rows are one block


def values_per_unit(bits: int) -> tuple[int, int]:
    """(values, words) of one unit of the packing: 32 values in 3 words at 3 bits, else one word of 32/bits."""
    if bits == 16:
        return 1, 1
    return (32, 3) if bits == 3 else (32 // bits, 1)


def prefill_rows(pairs: int, positions: int) -> int:
    """BM of the prefill path from the mean rows per position: small tiles when experts get few rows."""
    mean = pairs / max(1, positions)
    return 16 if mean < 24 else 32 if mean < 48 else 64


def run(group, x: torch.Tensor, tables: Tables, pos0: int, grid_m: int, out: torch.Tensor, row_div: int,
        config: Config, routing_weights: torch.Tensor | None = None, with_bias: bool = True,
        gemv: bool = False) -> None:
    """Compute `group`'s rows of `tables` into `out` (rows indexed by pair): out[pair] = x[pair // row_div] @ W.T
    (+ the expert's bias when with_bias), times routing_weights[pair] when given (out float32 then). gemv: every
    block is one row (one token per call): gemv_kernel with the GEMV tile (packed groups)."""
    from moecompress.runtime.cuda.kernels import gemv_kernel, packed_kernel

    n_slots, N, K = len(group.experts), group.out_features, group.in_features
    if group.bits == 16:
        q, s, z, groups = group.weight, group.weight, group.weight, 1
    else:
        q = group.qweight.view(torch.int32)  # [n, out, in*bits/32]: the format's bytes, little-endian words
        s = group.scales
        z = s if group.symmetric else group.zeros
        groups = s.shape[-1]
    bias = getattr(group, "bias", None) if with_bias else None
    vpw, unit = values_per_unit(group.bits)
    if gemv and group.bits != 16:
        config = GEMV
        grid = (max(1, grid_m), -(-N // config.block_n))
        gemv_kernel[grid](
            x, q, s, z, bias if bias is not None else out, routing_weights if routing_weights is not None else out,
            out, tables.order, tables.blocks, tables.first, pos0, n_slots, tables.blocks.shape[0], row_div, N, K,
            groups, x.stride(0), out.stride(0), q.stride(0), q.stride(1),
            BITS=group.bits, GS=group.group_size, SYMMETRIC=bool(group.symmetric), HAS_BIAS=bias is not None,
            WEIGHTED=routing_weights is not None, BN=config.block_n, BK=config.block_k, VPW=vpw, UNIT=unit,
            num_warps=config.num_warps, num_stages=config.num_stages)
        return
    grid = (max(1, grid_m), -(-N // config.block_n))
    packed_kernel[grid](
        x, q, s, z, bias if bias is not None else out, routing_weights if routing_weights is not None else out, out,
        tables.order, tables.blocks, tables.first, pos0, n_slots, tables.blocks.shape[0], row_div, N, K, groups,
        x.stride(0), out.stride(0), q.stride(0), q.stride(1),
        BITS=group.bits, GS=group.group_size if group.bits != 16 else 1, SYMMETRIC=bool(group.symmetric),
        HAS_BIAS=bias is not None, WEIGHTED=routing_weights is not None, BM=tables.block_rows, BN=config.block_n,
        BK=config.block_k, VPW=vpw, UNIT=unit, num_warps=config.num_warps, num_stages=config.num_stages)
