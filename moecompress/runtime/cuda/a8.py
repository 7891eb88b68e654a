"""W{2,3,4,8}A8 prefill (issue 14, session 28): int8 activations x low-bit weights on the int8 tensor cores.

The bf16 prefill kernels (hopper.py, dequant.py) turn every packed value into a bf16 weight before the MMA; on an
H200 that conversion costs about as much as the MMA itself. Here the activations are quantized instead, once per
projection input: per (row, step of BK values of K), symmetric, xq = round(x * 127 / absmax) in int8, sx = absmax /
127 (quant_kernel; between the projections it first applies SiLU(gate) * up to the bf16 gate_up output, rounded as
the reference does). The weights are only unpacked, masks and shifts to int8, no float conversion: w8 = q - OFF with
OFF = 2**(bits-1) for symmetric groups, else 0 (128 at 8 bits); one int8 tl.dot per step gives the integer
D = sum_k xq w8 (int32; the tensor cores' int8 rate is twice bf16's), and each step is promoted into the float32
accumulator (the vLLM / DeepGEMM block-scaled pattern):

    acc[m, n] += (D - (z - OFF) * sum_k xq[m, k]) * sx[m] * s[n]      (asymmetric; symmetric: D * sx[m] * s[n])

exactly sum_k (xq sx) ((q - z) s) per step: D and the correction are exact int32 (|.| < 2**22), made a float by
accumulating the dot onto the bits of 1.5 * 2**23 (MAGIC_CVT; else I2F); BK divides the weights' group_size (one
scale and zero per output row and step). The weights are the format's exact (q - z) * s; the activations are x to
int8 precision: NOT bit-equal to the bf16 dequantize-then-matmul reference. The int8 rounding costs 0.6 % (norm-
relative) of Gaussian x and 1.3 % of the heavier-tailed h; on Mixtral-8x7B shapes the layer output is 1.6-1.7e-2 from
the exact float result, against 5.1e-3 for the bf16 paths (eval/results/gpu_prefill_a8_s28.md).

Measured on an H200 (session 28): slower than bf16 grouped_mm and than the default packed path on every Mixtral-8x7B
case (0.43-0.60x of bf16's speed), level with bf16 on Qwen3-30B-A3B (1211 against 1230 µs; hopper.py 1111), so
launch.PREFILL_A8 is off. a8_kernel is ~96 % of the call (quant_kernel 82 µs of 7.5 ms). The float conversion is not
what limits it (the magic-number promotion against I2F: +0.6 % to -2.7 % time); tiles of 64 x 128 with 4 warps ran
1.5-2.2x faster than 128 x 128 with 8 warps and than 64 x 64. Presumably (not profiled per instruction) the unpack
(2-4 integer ops per value, then the int8 tile stored to shared memory for the MMA) and the per-step promotion run
between the MMAs of each program rather than beside them. Not tried: unpacking whole words at once (a lop3 per 4
int8 values, xq stored in the matching K order), which needs register-layout control (Gluon, as hopper.py).

Rows come from the routing tables (routing.py) exactly as in packed_kernel (kernels._block, _store); one launch per
(projection, bit-width) group; no host sync (CUDA-graph safe). TRANS: compute y^T = W xq^T per tile (the unpacked
weights as the MMA's first operand) instead of y = xq W^T (launch.A8_TRANS; slower on every case of both sweeps).
Requirements (`supported`): two projections of packed groups, no bias, no post-expert norm, the same positions in
both, K % BK == 0 and group_size % BK == 0 (BK = min(A8.block_k, group_size) >= 32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moecompress.runtime.cuda import launch, routing
from moecompress.runtime.cuda.kernels import _block, _silu_mul, _store, _values


@triton.jit
def quant_kernel(x_ptr, xq_ptr, sx_ptr, sq_ptr, R, stride_xm, K: tl.constexpr, GATED: tl.constexpr, BK: tl.constexpr,
                 BR: tl.constexpr):
    """Program (r, g): rows r*BR.. of x (GATED: of SiLU(x[:, :K]) * x[:, K:] rounded to x's dtype), columns g*BK..:
    xq int8 [R, K], sx float32 [R, K/BK] (absmax / 127; 0 for an all-zero step), sq int32 [R, K/BK] (sum of xq)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :]
    if GATED:
        v = _silu_mul(tl.load(ptrs, mask=rmask[:, None], other=0.0).to(tl.float32),
                      tl.load(ptrs + K, mask=rmask[:, None], other=0.0).to(tl.float32),
                      x_ptr.dtype.element_ty).to(tl.float32)
    else:
        v = tl.load(ptrs, mask=rmask[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(v), axis=1)  # [BR]
    inv = tl.where(amax > 0, 127.0 / amax, 0.0)
    q = tl.floor(v * inv[:, None] + 0.5)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int32)
    groups = K // BK
    tl.store(xq_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], q.to(tl.int8), mask=rmask[:, None])
    tl.store(sx_ptr + rows * groups + tl.program_id(1), amax / 127.0, mask=rmask)
    tl.store(sq_ptr + rows * groups + tl.program_id(1), tl.sum(q, axis=1), mask=rmask)


@triton.jit
def _int8_weights(q_rows, uu, wmask, BITS: tl.constexpr, VPW: tl.constexpr, UNIT: tl.constexpr, OFF: tl.constexpr,
                  BK: tl.constexpr, BN: tl.constexpr):
    """[BK, BN] int8: q - OFF of one step's packed words (value j of unit u at k = u*VPW + j)."""
    q = _values(q_rows, uu, wmask, BITS, VPW, UNIT)  # uint32 [BKW, VPW, BN]
    w = (q.to(tl.int32, bitcast=True) - OFF).to(tl.int8)
    return tl.reshape(w, (BK, BN))


@triton.jit
def _int8_weights_t(q_rows, uu, wmask, BITS: tl.constexpr, VPW: tl.constexpr, UNIT: tl.constexpr,
                    OFF: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """[BN, BK] int8 (TRANS: the MMA's first operand, built in this orientation): q_rows [BN, 1], uu [BKW],
    wmask [BN, BKW]."""
    wa = tl.load(q_rows + (uu * UNIT)[None, :], mask=wmask, other=0).to(tl.uint32, bitcast=True)[:, :, None]
    j = tl.arange(0, VPW)[None, None, :]
    if BITS == 3:
        wb = tl.load(q_rows + (uu * UNIT + 1)[None, :], mask=wmask, other=0).to(tl.uint32, bitcast=True)[:, :, None]
        wc = tl.load(q_rows + (uu * UNIT + 2)[None, :], mask=wmask, other=0).to(tl.uint32, bitcast=True)[:, :, None]
        word = (j * 3) // 32
        sh = ((j * 3) % 32).to(tl.uint32)
        lo = tl.where(word == 0, wa, tl.where(word == 1, wb, wc))
        hi = tl.where(word == 0, wb, wc)
        q = ((lo >> sh) | ((hi << 1) << (31 - sh))) & 7
    else:
        q = (wa >> (j * BITS).to(tl.uint32)) & ((1 << BITS) - 1)  # [BN, BKW, VPW]
    return tl.reshape((q.to(tl.int32, bitcast=True) - OFF).to(tl.int8), (BN, BK))


@triton.jit
def a8_kernel(
    xq_ptr, sx_ptr, sq_ptr, q_ptr, s_ptr, z_ptr, rw_ptr, y_ptr, order_ptr, blocks_ptr, first_ptr,
    pos0, n_slots, max_blocks, row_div, N, groups, stride_ym, stride_qe, stride_qn,
    K: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, SYMMETRIC: tl.constexpr, WEIGHTED: tl.constexpr,
    OUT_DTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, VPW: tl.constexpr, UNIT: tl.constexpr,
    TRANS: tl.constexpr, MAGIC_CVT: tl.constexpr = True,
):
    """Program (m, n): block m of the group's rows (routing tables), output columns n*BN..; row r reads xq row
    order[r] // row_div and writes y row order[r], rounded to OUT_DTYPE (times its routing weight in float32 when
    WEIGHTED). Per step of BK: int8 dot, promoted with the step's scales (module docstring)."""
    valid, slot, rmask, pair, src = _block(blocks_ptr, first_ptr, order_ptr, pos0, n_slots, max_blocks, row_div,
                                           tl.program_id(0), BM)
    if valid:
        slot64 = slot.to(tl.int64)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        nmask = offs_n < N
        offs_k = tl.arange(0, BK)
        BKW: tl.constexpr = BK // VPW
        offs_u = tl.arange(0, BKW)
        if SYMMETRIC:
            OFF: tl.constexpr = 1 << (BITS - 1)
        elif BITS == 8:
            OFF: tl.constexpr = 128  # noqa: F811
        else:
            OFF: tl.constexpr = 0  # noqa: F811  (q < 16 is an int8 already)
        q_rows = q_ptr + slot64 * stride_qe + offs_n[None, :].to(tl.int64) * stride_qn  # [1, BN]
        s_rows = s_ptr + slot64 * N * groups + offs_n * groups  # [BN]
        z_rows = z_ptr + slot64 * N * groups + offs_n * groups
        steps = K // BK
        MAGIC: tl.constexpr = 0x4B400000  # float32 1.5 * 2**23: its bits + d (|d| < 2**22) are 1.5 * 2**23 + d
        x_rows = xq_ptr + src * K  # [BM]
        a_rows = src * steps
        wmask = nmask[None, :] & (offs_u < BKW)[:, None]
        q_rows_t = q_ptr + slot64 * stride_qe + offs_n[:, None].to(tl.int64) * stride_qn  # [BN, 1]
        wmask_t = nmask[:, None] & (offs_u < BKW)[None, :]
        if TRANS:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            i = k0 // BK
            if TRANS:
                w = _int8_weights_t(q_rows_t, k0 // VPW + offs_u, wmask_t, BITS, VPW, UNIT, OFF, BK, BN)  # [BN, BK]
            else:
                w = _int8_weights(q_rows, k0 // VPW + offs_u, wmask, BITS, VPW, UNIT, OFF, BK, BN)  # [BK, BN]
            sx = tl.load(sx_ptr + a_rows + i, mask=rmask, other=0.0)  # [BM]
            s = tl.load(s_rows + k0 // GS, mask=nmask, other=0.0).to(tl.float32)  # [BN]
            if TRANS:
                xt = tl.load(x_rows[None, :] + (k0 + offs_k)[:, None], mask=rmask[None, :], other=0)  # [BK, BM]
                if SYMMETRIC:
                    c = tl.full((BN, BM), MAGIC, tl.int32)
                else:
                    sq = tl.load(sq_ptr + a_rows + i, mask=rmask, other=0)
                    z = tl.load(z_rows + k0 // GS, mask=nmask, other=0).to(tl.int32) - OFF
                    c = MAGIC - z[:, None] * sq[None, :]
                scale = s[:, None] * sx[None, :]
                if MAGIC_CVT:
                    d = tl.dot(w, xt, c, out_dtype=tl.int32)  # [BN, BM]
                    acc += (d.to(tl.float32, bitcast=True) - 12582912.0) * scale
                else:
                    d = tl.dot(w, xt, out_dtype=tl.int32) + (c - MAGIC)
                    acc += d.to(tl.float32) * scale
            else:
                x = tl.load(x_rows[:, None] + (k0 + offs_k)[None, :], mask=rmask[:, None], other=0)  # [BM, BK]
                if SYMMETRIC:
                    c = tl.full((BM, BN), MAGIC, tl.int32)
                else:
                    sq = tl.load(sq_ptr + a_rows + i, mask=rmask, other=0)
                    z = tl.load(z_rows + k0 // GS, mask=nmask, other=0).to(tl.int32) - OFF
                    c = MAGIC - sq[:, None] * z[None, :]
                scale = sx[:, None] * s[None, :]
                if MAGIC_CVT:
                    d = tl.dot(x, w, c, out_dtype=tl.int32)  # [BM, BN]
                    acc += (d.to(tl.float32, bitcast=True) - 12582912.0) * scale
                else:
                    d = tl.dot(x, w, out_dtype=tl.int32) + (c - MAGIC)
                    acc += d.to(tl.float32) * scale
        if TRANS:
            out = tl.trans(acc)
        else:
            out = acc
        _store(out, y_ptr, y_ptr, rw_ptr, slot64, pair, rmask, offs_n, nmask, N, stride_ym, OUT_DTYPE, False,
               WEIGHTED)


def step_k(group_size: int, config: launch.A8Config | None = None) -> int:
    """BK of a layer: the tile's block_k, or the group size where that is smaller (one scale per step)."""
    return min((config or launch.A8).block_k, group_size)


def quantize(x: torch.Tensor, bk: int, gated: bool = False):
    """x [R, K'] (gated: K' = 2K, SiLU(first half) * second half) -> (xq int8 [R, K], sx float32 [R, K/bk],
    sq int32 [R, K/bk])."""
    rows = x.shape[0]
    k = x.shape[1] // 2 if gated else x.shape[1]
    xq = torch.empty(rows, k, dtype=torch.int8, device=x.device)  # [R, K]
    sx = torch.empty(rows, k // bk, dtype=torch.float32, device=x.device)  # [R, K/bk]
    sq = torch.empty(rows, k // bk, dtype=torch.int32, device=x.device)
    br = 16
    quant_kernel[(-(-rows // br), k // bk)](x, xq, sx, sq, rows, x.stride(0), K=k, GATED=gated, BK=bk, BR=br,
                                            num_warps=4)
    return xq, sx, sq


def run(group, xq, sx, sq, tables: routing.Tables, pos0: int, grid_m: int, out: torch.Tensor, row_div: int,
        bk: int, routing_weights: torch.Tensor | None = None, config: launch.A8Config | None = None,
        trans: bool | None = None, out_dtype: torch.dtype | None = None) -> None:
    """One packed group's rows of `tables` into out (rows by pair): out[pair] = x[pair // row_div] @ W.T computed
    from (xq, sx, sq) (quantize(x, bk)), rounded to out_dtype (default out's dtype; bf16 when weighted), times
    routing_weights[pair] in float32 when given."""
    config = config or launch.A8
    trans = launch.A8_TRANS if trans is None else trans
    n_slots, N, K = len(group.experts), group.out_features, group.in_features
    q = group.qweight.view(torch.int32)  # [n, N, K*bits/32]
    s = group.scales
    z = s if group.symmetric else group.zeros
    vpw, unit = launch.values_per_unit(group.bits)
    if out_dtype is None:
        out_dtype = torch.bfloat16 if routing_weights is not None else out.dtype
    rw = routing_weights if routing_weights is not None else out
    grid = (max(1, grid_m), -(-N // config.block_n))
    a8_kernel[grid](xq, sx, sq, q, s, z, rw, out, tables.order, tables.blocks, tables.first, pos0, n_slots,
                    tables.blocks.shape[0], row_div, N, s.shape[-1], out.stride(0), q.stride(0), q.stride(1),
                    K=K, BITS=group.bits, GS=group.group_size, SYMMETRIC=bool(group.symmetric),
                    WEIGHTED=routing_weights is not None, OUT_DTYPE=_TL[out_dtype], BM=tables.block_rows,
                    BN=config.block_n, BK=bk, VPW=vpw, UNIT=unit, TRANS=trans, MAGIC_CVT=launch.A8_MAGIC,
                    num_warps=config.num_warps,
                    num_stages=config.num_stages)


_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def supported(experts) -> bool:
    """Whether the layer can take this path (module docstring's requirements)."""
    if (len(experts.proj_names) != 2 or not experts._same_order or experts.has_post_expert_norm
            or getattr(experts, "has_bias", False)):
        return False
    groups = [g for name in experts.proj_names for g in getattr(experts, name).children() if g.experts]
    if not groups or any(g.bits not in (2, 3, 4, 8) for g in groups):
        return False
    bk = min(step_k(g.group_size) for g in groups)
    return bk >= 32 and all(g.group_size % bk == 0 and g.in_features % bk == 0 for g in groups)


def forward(experts, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
            config: launch.A8Config | None = None) -> torch.Tensor:
    """PackedExperts' CUDA prefill with int8 activations: x [T, H] -> [T, H], no host sync."""
    from moecompress.runtime.cuda.experts import silu_gate

    config = config or launch.A8
    tokens, top_k = top_k_index.shape
    pairs = tokens * top_k
    first, down = (getattr(experts, name) for name in experts.proj_names)
    flat = top_k_index.reshape(-1)
    groups, positions = routing.proj_groups(first)
    keys = routing.lookup(first, x.device)[flat.clamp(max=first.num_experts)]  # [S]; positions: not computed
    tables = routing.build_torch(keys, positions, config.block_m)
    all_groups = groups + routing.proj_groups(down)[0]
    bk = min(step_k(g.group_size, config) for g, _ in all_groups)

    def grid_m(group):
        return min(len(group.experts), pairs) + pairs // tables.block_rows

    xq, sx, sq = quantize(x.contiguous(), bk)
    h = torch.empty(pairs, first.out_features, dtype=x.dtype, device=x.device)  # [S, N1], by pair
    for group, pos0 in groups:
        run(group, xq, sx, sq, tables, pos0, grid_m(group), h, top_k, bk, config=config)
    if silu_gate(experts):
        hq, hsx, hsq = quantize(h, bk, gated=True)
    else:
        h = experts._gate_fn(experts, h) if experts.has_gate else experts.act_fn(h)
        hq, hsx, hsq = quantize(h.contiguous(), bk)
    rw = top_k_weights.reshape(-1).contiguous()
    y = torch.zeros(pairs, down.out_features, dtype=torch.float32, device=x.device)  # [S, H], weighted, by pair
    for group, pos0 in routing.proj_groups(down)[0]:
        run(group, hq, hsx, hsq, tables, pos0, grid_m(group), y, 1, bk, rw, config=config)
    return y.view(tokens, top_k, -1).sum(1).to(x.dtype)
