"""The pair path of one layer (decode.py's kernels) as a plan: built once per (tokens, top_k, dtypes), then each
call is 4-5 launches of pre-bound kernels (launcher.py) and one allocation (the output).

A plan holds what does not change between calls of a layer at a number of tokens: the packed tensors and group
bounds of each projection, the launch grids and compile-time arguments, and the workspaces (the permuted hidden
states, the split-K partial sums, the gate's output): the layer's calls run one after the other on a stream, so
they can share them; a CUDA graph captured from a call keeps using the same buffers. The steps (decode.py):

    permute_kernel(x) -> pair_kernel(first projection) [-> gate_kernel] -> pair_kernel(down) -> sum_kernel

(the SiLU gate fused into pair_kernel when K is not split, into gate_kernel when it is; another gate runs in torch
between the projections).
"""
from __future__ import annotations

import os

import torch

from moecompress.runtime.cuda import launch
from moecompress.runtime.cuda.launcher import Launcher

PAIR_BITS = (2, 3, 4, 8)
MODES = {"plain": 0, "gated": 1, "partial": 2}


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _permuted_buffers(rows: int, cols: int, bits: set[int], device) -> dict[int, torch.Tensor]:
    """float32 [rows, cols] (3 bits: [rows, 3 cols]) per bit-width: the layout permute_kernel writes."""
    return {b: torch.empty(rows, 3 * cols if b == 3 else cols, dtype=torch.float32, device=device) for b in bits}


def _projection(proj, groups, dummy):
    """(12 packed tensors qB/sB/zB and 8 bounds startB/endB in PAIR_BITS order, bit-widths present)."""
    by_bits = {group.bits: (group, pos0) for group, pos0 in groups}
    ptrs, bounds = [], []
    for bits in PAIR_BITS:
        if bits in by_bits:
            group, pos0 = by_bits[bits]
            ptrs += [group.qweight.view(torch.int32), group.scales, group.scales if group.symmetric else group.zeros]
            bounds += [pos0, pos0 + len(group.experts)]
        else:
            ptrs += [dummy, dummy, dummy]
            bounds += [0, 0]
    return ptrs, bounds, set(by_bits)


class PairPlan:
    """experts (PackedExperts, pair_supported) at `tokens` x `top_k` pairs, activations of `dtype` on `device`;
    first/down: (ProjGroups, [(group, first position)], lookup tensor) of its two projections; gated: SiLU(gate) * up
    is fused (experts.silu_gate)."""

    def __init__(self, experts, first, down, gated: bool, tokens: int, top_k: int, dtype: torch.dtype, device):
        from moecompress.runtime.cuda.decode import gate_kernel, pair_kernel, permute_kernel, sum_kernel

        (proj1, groups1, lut1), (proj2, groups2, lut2) = first, down
        self.experts, self.tokens, self.top_k, self.dtype = experts, tokens, top_k, dtype
        pairs, dt = tokens * top_k, _tl_dtype(dtype)
        self.dummy = torch.zeros(4, dtype=torch.float32, device=device)  # for the pointers a launch does not use
        ptrs1, bounds1, bits1 = _projection(proj1, groups1, self.dummy)
        ptrs2, bounds2, bits2 = _projection(proj2, groups2, self.dummy)
        g1, g2 = groups1[0][0], groups2[0][0]
        k1, k2, hidden = g1.in_features, g2.in_features, proj2.out_features
        ks1 = launch.split_k(k1 // g1.group_size)
        self.mode = "gated" if gated and ks1 == 1 else "split" if gated else "plain"
        n1 = proj1.out_features // 2 if gated else proj1.out_features  # columns of the first pair_kernel

        def permute(rows, cols, bits, out):
            return Launcher(permute_kernel, (rows, -(-cols // 1024)), [None, *[out.get(b, self.dummy)
                            for b in PAIR_BITS], cols], (0,), dict(K=cols, BLOCK=1024,
                            **{f"OUT{b}": b in out for b in PAIR_BITS}), num_warps=4)

        def pair(xs, y, hs, ptrs, bounds, bits, lut, row_div, mode, n, rows, k, gs, symmetric, ks):
            args = [*[xs.get(b, self.dummy) for b in PAIR_BITS], None, lut, y, *[hs.get(b, self.dummy)
                    for b in PAIR_BITS], *ptrs, *bounds, row_div, proj1.num_experts, pairs]
            const = dict(N=n, K=k, GS=gs, SYMMETRIC=bool(symmetric), MODE=MODES[mode], ROWS=rows, KS=ks,
                         BN=launch.PAIR_BLOCK_N, DT=dt, ASM=launch.PAIR_ASM and not _interpreted(),
                         **{f"HAS{b}": b in bits for b in PAIR_BITS}, **{f"OUT{b}": b in hs for b in PAIR_BITS})
            return Launcher(pair_kernel, (pairs, -(-n // launch.PAIR_BLOCK_N), ks), args, (4,), const,
                            num_warps=launch.PAIR_WARPS)

        self.xs = _permuted_buffers(tokens, k1, bits1, device)
        self.hs = _permuted_buffers(pairs, k2, bits2, device)
        self.permute_x = permute(tokens, k1, bits1, self.xs)
        if self.mode == "gated":
            self.first = pair(self.xs, self.dummy, self.hs, ptrs1, bounds1, bits1, lut1, top_k, "gated", n1,
                              proj1.out_features, k1, g1.group_size, g1.symmetric, 1)
        elif self.mode == "split":
            part1 = torch.empty(ks1, pairs, proj1.out_features, dtype=torch.float32, device=device)
            self.first = pair(self.xs, part1, {}, ptrs1, bounds1, bits1, lut1, top_k, "partial", n1,
                              proj1.out_features, k1, g1.group_size, g1.symmetric, ks1)
            self.gate = Launcher(gate_kernel, (pairs, -(-n1 // 512)), [part1, *[self.hs.get(b, self.dummy)
                                 for b in PAIR_BITS], pairs], (), dict(N=n1, KS=ks1, BLOCK=512, DT=dt,
                                 **{f"OUT{b}": b in self.hs for b in PAIR_BITS}), num_warps=4)
        else:
            self.h = torch.empty(pairs, n1, dtype=dtype, device=device)
            self.first = pair(self.xs, self.h, {}, ptrs1, bounds1, bits1, lut1, top_k, "plain", n1, n1, k1,
                              g1.group_size, g1.symmetric, 1)
            self.permute_h = permute(pairs, k2, bits2, self.hs)
        ks2 = launch.split_k(k2 // g2.group_size)
        part2 = torch.empty(ks2, pairs, hidden, dtype=torch.float32, device=device)
        self.down = pair(self.hs, part2, {}, ptrs2, bounds2, bits2, lut2, 1, "partial", hidden, hidden, k2,
                         g2.group_size, g2.symmetric, ks2)
        self.sum = Launcher(sum_kernel, (tokens, -(-hidden // 1024)), [part2, None, None, pairs], (1, 2),
                            dict(N=hidden, TOP_K=top_k, KS=ks2, BLOCK=1024, DT=dt), num_warps=4)
        self.hidden, self.device = hidden, device

    def __call__(self, x: torch.Tensor, flat: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [tokens, H] contiguous, flat [tokens * top_k] expert ids, weights [tokens * top_k] -> [tokens, H]."""
        self.project(x, flat)
        out = torch.empty(self.tokens, self.hidden, dtype=self.dtype, device=self.device)
        self.sum(weights, out)
        return out

    def project(self, x: torch.Tensor, flat: torch.Tensor) -> None:
        """Every launch before the sum: the down projection's float32 partial sums land in `partial`."""
        self.permute_x(x)
        self.first(flat)
        if self.mode == "split":
            self.gate()
        elif self.mode == "plain":
            h = self.experts._gate_fn(self.experts, self.h) if self.experts.has_gate else self.experts.act_fn(self.h)
            self.permute_h(h.contiguous())
        self.down(flat)

    @property
    def partial(self) -> torch.Tensor:
        """The down projection's float32 partial sums [KS, pairs, H] (the sum kernel's first argument)."""
        return self.sum.args[0]


def _interpreted() -> bool:
    return bool(os.environ.get("TRITON_INTERPRET"))
