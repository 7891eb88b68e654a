"""Routing tables on the device, fixed sizes, no host sync (safe inside a CUDA graph capture).

For the S = tokens x top_k (token, k) pairs of one call and a projection whose experts sit at positions 0..P-1
(ProjGroups: its groups in order, inside a group the slots in order), `keys` [S] holds each pair's position (P: the
expert is not computed here). The kernels (kernels.py) read:

- order  int32 [S]: pair ids sorted by position (stable);
- blocks int32 [max_blocks, 3]: (position, first row, end row) of runs of at most BM rows of one position, sorted by
  position; unused entries have position P;
- first  int32 [P+1]: index of the first block whose position is >= p.

`max_blocks(S, P, BM)` bounds the blocks of any routing: sum over positions of ceil(rows/BM) <= min(S, P) + S // BM.
Few pairs (S <= SMALL_PAIRS and at most BM rows per position: decode) take one Triton program (`route_kernel`);
otherwise torch ops (sort, scatter_add, cumsum, searchsorted), which are capturable too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SMALL_PAIRS = 256  # pairs up to which one program builds the tables (an S x S comparison in registers)


@dataclass(frozen=True)
class Tables:
    order: torch.Tensor  # int32 [S]
    blocks: torch.Tensor  # int32 [max_blocks, 3]
    first: torch.Tensor  # int32 [P + 1]
    block_rows: int  # BM
    small: bool  # built by route_kernel: each position is one block


def max_blocks(pairs: int, positions: int, block_rows: int) -> int:
    return max(1, min(pairs, positions) + pairs // block_rows)


def _pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


def build(keys: torch.Tensor, positions: int, block_rows: int, small: bool) -> Tables:
    """keys [S] int (position per pair, `positions` = not computed). small: every position has <= block_rows pairs
    (the caller guarantees it: decode calls with tokens <= block_rows and distinct experts per token)."""
    pairs = keys.numel()
    if small and pairs <= SMALL_PAIRS:
        from moecompress.runtime.cuda.kernels import route_kernel

        mb = min(pairs, positions) or 1
        order = torch.empty(pairs, dtype=torch.int32, device=keys.device)
        blocks = torch.empty(mb, 3, dtype=torch.int32, device=keys.device)
        first = torch.empty(positions + 1, dtype=torch.int32, device=keys.device)
        route_kernel[(1,)](keys, order, blocks, first, pairs, positions, mb, SP=_pow2(pairs),
                           PP=_pow2(positions + 1), MBP=_pow2(mb), num_warps=8)
        return Tables(order, blocks, first, block_rows, True)
    return build_torch(keys, positions, block_rows)


def build_torch(keys: torch.Tensor, positions: int, block_rows: int) -> Tables:
    pairs, dev = keys.numel(), keys.device
    keys = keys.long()
    order = torch.argsort(keys, stable=True).to(torch.int32)
    counts = torch.zeros(positions + 1, dtype=torch.int32, device=dev)
    counts.scatter_add_(0, keys, torch.ones(pairs, dtype=torch.int32, device=dev))
    counts = counts[:positions]
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    starts = ends - counts
    per_pos = (counts + block_rows - 1) // block_rows
    block_end = torch.cumsum(per_pos, 0, dtype=torch.int32)
    block_start = block_end - per_pos
    mb = max_blocks(pairs, positions, block_rows)
    idx = torch.arange(mb, dtype=torch.int32, device=dev)
    pos = torch.searchsorted(block_end, idx, right=True).to(torch.int32)  # positions: P past the last block
    p = pos.clamp(max=positions - 1).long()
    row0 = starts[p] + (idx - block_start[p]) * block_rows
    row1 = torch.minimum(row0 + block_rows, ends[p])
    blocks = torch.stack([pos, row0, row1], 1).to(torch.int32).contiguous()
    first = torch.cat([block_start, block_end[-1:]]).to(torch.int32)
    return Tables(order, blocks, first, block_rows, False)


def from_counts(counts: list[int], block_rows: int, device) -> Tables:
    """Tables for rows already sorted by slot (PackedGroup.linear_sorted): counts[s] rows of slot s, positions = slots.
    Built on the host (the counts are host ints already), so not for graph capture."""
    blocks, first, row = [], [], 0
    for s, c in enumerate(counts):
        first.append(len(blocks))
        for r in range(row, row + c, block_rows):
            blocks.append((s, r, min(r + block_rows, row + c)))
        row += c
    first.append(len(blocks))
    blocks = blocks or [(len(counts), 0, 0)]
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int32).to(device, non_blocking=True)  # noqa: E731
    return Tables(torch.arange(row, dtype=torch.int32, device=device), as_tensor(blocks), as_tensor(first),
                  block_rows, False)


def proj_groups(proj):
    """(group, first position) of each non-empty group of a ProjGroups, in position order."""
    out, pos = [], 0
    for group in proj.children():
        if group.experts:
            out.append((group, pos))
        pos += len(group.experts)
    return out, pos


def lookup(proj, device) -> torch.Tensor:
    """expert id -> position (ProjGroups' own table, cached on it as its `route` does)."""
    if proj._lookup_tensor is None or proj._lookup_tensor.device != device:
        proj._lookup_tensor = torch.tensor(proj._lookup, device=device)
    return proj._lookup_tensor
