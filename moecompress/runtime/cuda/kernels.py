"""Triton kernels: an MoE projection computed from the format's packed 2/3/4/8-bit experts (and bf16 experts).

Imported only where Triton is installed (`moecompress.runtime.cuda.available`). The kernels read the format's own
packing (format/pack.py) through an int32 view of `qweight`: a row of `in` values at `bits` bits is `in*bits/32`
little-endian words, value k at bit k*bits of the row (a 3-bit value may straddle two words). No load-time repack:
resident memory is the packed bytes. Scales fp16 [n, out, in/group_size], zeros uint8 (asymmetric) or 2**(bits-1).

One launch computes every routed row of one (projection, bit-width) group. Rows come in *blocks*: a block is up to
BM consecutive rows of one position (expert) in the routing order (routing.py builds `order`, `blocks` and `first`
on the device, fixed sizes, no host sync: the launch sequence can be captured in a CUDA graph). Program (m, n) takes
block first[pos0] + m and output columns n*BN.. ; blocks of other groups or past the end return at once.
Row r of a block reads x row order[r] // row_div and writes y row order[r] (the (token, k) pair), so gate_up reads
the token's hidden state and down writes the pair's output, optionally times its routing weight (WEIGHTED).

Dequantization is exact: w = fma(q, s, -z*s) in float32 equals (q - z) * s (format/pack.py) bit for bit, then
rounded to x's dtype, as the dequantize-then-matmul reference does (gemv_kernel keeps the float32 weights);
products accumulate in float32.
Integers become floats by the 2**23 trick (exponent bits or'ed in, 2**23 subtracted); ptxas may turn it back into
its fast int->float convert (I2FP), which is exact too.

- `packed_kernel` (the decode path's 2-16 tokens, BM 16, narrow column tiles; the prefill path, BM 16-256, wide
  tiles): per step the packed words of a [BK, BN] weight tile are loaded once, expanded in registers, dequantized
  and multiplied with x's [BM, BK] rows in one tl.dot (HMMA; HGMMA with both operands from shared memory for the
  prefill tiles on Hopper, where hopper.py's kernel, weights as the register operand, replaces it). GATED (prefill):
  the gate and up halves in two dots per step, SiLU(gate) * up written as h.
- `gemv_kernel` (one token per call): the same expansion, then FMAs on the CUDA cores in float32, no shared memory;
  1.4-2.1x faster than packed_kernel at one token on an H200 (eval/results/gpu.md, runs 2 and 3).
(A first version that dequantized per element from a gathered word, and one that ran a dot per value of a word over
strided columns of x, measured 10-20x slower on an H200: eval/results/gpu.md.)
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _block(blocks_ptr, first_ptr, order_ptr, pos0, n_slots, max_blocks, row_div, m, BM: tl.constexpr):
    """(valid, slot, row mask [BM], pair [BM], source row [BM]) of block m of this launch's group."""
    blk = tl.load(first_ptr + pos0) + m
    valid = blk < max_blocks
    blk = tl.minimum(blk, max_blocks - 1)
    slot = tl.load(blocks_ptr + blk * 3) - pos0
    valid = valid & (slot < n_slots)
    r0 = tl.load(blocks_ptr + blk * 3 + 1)
    r1 = tl.load(blocks_ptr + blk * 3 + 2)
    rows = r0 + tl.arange(0, BM)
    rmask = (rows < r1) & valid
    pair = tl.load(order_ptr + rows, mask=rmask, other=0)
    return valid, slot, rmask, pair, (pair // row_div).to(tl.int64)


@triton.jit
def _int_to_float(q):
    """uint32 integers below 2**23 -> float32, exactly."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _store(acc, y_ptr, b_ptr, rw_ptr, slot64, pair, rmask, offs_n, nmask, N, stride_ym,
           OUT_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, WEIGHTED: tl.constexpr):
    """Rows rounded to the compute dtype (+ bias, rounded again), as the reference's bf16 matmul; weighted in fp32."""
    yv = acc.to(OUT_DTYPE)
    if HAS_BIAS:
        bias = tl.load(b_ptr + slot64 * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
        yv = (yv.to(tl.float32) + bias[None, :]).to(OUT_DTYPE)
    ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if WEIGHTED:
        rw = tl.load(rw_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
        tl.store(ptrs, yv.to(tl.float32) * rw[:, None], mask=rmask[:, None] & nmask[None, :])
    else:
        tl.store(ptrs, yv, mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _silu_mul(gate, up, OUT_DTYPE: tl.constexpr):
    """SiLU(gate) * up rounded as the reference does it: matmul outputs, SiLU and the product each in OUT_DTYPE."""
    g = gate.to(OUT_DTYPE).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(OUT_DTYPE).to(tl.float32)
    return (a * up.to(OUT_DTYPE).to(tl.float32)).to(OUT_DTYPE)


@triton.jit
def _scale_zero(s_ptr, z_ptr, idx, mask, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """float32 (scale, zero point) at group entries `idx` (any shape): zeros uint8, or 2**(bits-1) when symmetric."""
    s = tl.load(s_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        z = tl.zeros_like(s) + (1 << (BITS - 1))
    else:
        z = tl.load(z_ptr + idx, mask=mask, other=0).to(tl.float32)
    return s, z


@triton.jit
def _step_scale_zero(s_rows, z_rows, k0, uu, nmask, wmask, BITS: tl.constexpr, GS: tl.constexpr,
                     SYMMETRIC: tl.constexpr, ONE_GROUP: tl.constexpr, UPG: tl.constexpr):
    """Scales and zeros of one step of packed_kernel / gemv_kernel, shaped to broadcast on [BKW, VPW, BN]: one group
    for the whole step (ONE_GROUP), else the group of every unit uu."""
    if ONE_GROUP:
        s, z = _scale_zero(s_rows, z_rows, k0 // GS, nmask, BITS, SYMMETRIC)
        s3 = s[None, None, :]
        z3 = z[None, None, :]
    else:
        s, z = _scale_zero(s_rows[None, :], z_rows[None, :], (uu // UPG)[:, None], wmask, BITS, SYMMETRIC)
        s3 = s[:, None, :]
        z3 = z[:, None, :]
    return s3, z3


@triton.jit
def _values(q_rows, uu, wmask, BITS: tl.constexpr, VPW: tl.constexpr, UNIT: tl.constexpr):
    """uint32 integers [BKW, VPW, BN]: value j of unit uu[i] of every weight row (units: one word, or the three
    words of 32 3-bit values); each word is loaded once."""
    wa = tl.load(q_rows + (uu * UNIT)[:, None], mask=wmask, other=0).to(tl.uint32, bitcast=True)[:, None, :]
    j = tl.arange(0, VPW)[None, :, None]
    if BITS == 3:
        wb = tl.load(q_rows + (uu * UNIT + 1)[:, None], mask=wmask, other=0).to(tl.uint32, bitcast=True)[:, None, :]
        wc = tl.load(q_rows + (uu * UNIT + 2)[:, None], mask=wmask, other=0).to(tl.uint32, bitcast=True)[:, None, :]
        word = (j * 3) // 32
        sh = ((j * 3) % 32).to(tl.uint32)
        lo = tl.where(word == 0, wa, tl.where(word == 1, wb, wc))
        hi = tl.where(word == 0, wb, wc)
        q = ((lo >> sh) | ((hi << 1) << (31 - sh))) & 7  # the high part is nonzero only where a value straddles
    else:
        q = (wa >> (j * BITS).to(tl.uint32)) & ((1 << BITS) - 1)
    return q


@triton.jit
def packed_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, rw_ptr, y_ptr, order_ptr, blocks_ptr, first_ptr,
    pos0, n_slots, max_blocks, row_div, N, K, groups,
    stride_xm, stride_ym, stride_qe, stride_qn,
    BITS: tl.constexpr, GS: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
    WEIGHTED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    VPW: tl.constexpr, UNIT: tl.constexpr, GATED: tl.constexpr = False,
):
    """Per step: BK values of K; the packed words of the [BN, BK] weight tile are loaded once, expanded in
    registers to [BK/VPW, VPW, BN] -> [BK, BN], dequantized, and multiplied with the [BM, BK] rows of x in one tl.dot.
    A unit is UNIT words (3 at 3 bits, else 1) holding VPW values; GS % VPW == 0; K % VPW == 0.
    GATED (packed groups, the model's gate SiLU(gate) * up): columns n and N/2 + n in two dots per step, y[pair, n]
    = SiLU(gate) * up (no bias, not weighted): the first projection writes h itself."""
    valid, slot, rmask, pair, src = _block(blocks_ptr, first_ptr, order_ptr, pos0, n_slots, max_blocks, row_div,
                                              tl.program_id(0), BM)
    if valid:
        dt = x_ptr.dtype.element_ty
        slot64 = slot.to(tl.int64)
        if GATED:
            n_out = N // 2
        else:
            n_out = N
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        nmask = offs_n < n_out
        offs_k = tl.arange(0, BK)
        q_rows = q_ptr + slot64 * stride_qe + offs_n[None, :].to(tl.int64) * stride_qn  # [1, BN]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        if BITS == 16:
            for k0 in range(0, K, BK):
                kk = k0 + offs_k
                kmask = kk < K
                x = tl.load(x_ptr + src[:, None] * stride_xm + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                            other=0.0)
                w = tl.load(q_rows + kk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0).to(dt)
                acc = tl.dot(x, w, acc)
        else:
            BKW: tl.constexpr = BK // VPW  # units per step
            UPG: tl.constexpr = GS // VPW  # units per group
            offs_u = tl.arange(0, BKW)
            s_rows = s_ptr + slot64 * N * groups + offs_n * groups  # [BN]
            z_rows = z_ptr + slot64 * N * groups + offs_n * groups
            units = K // VPW
            for k0 in range(0, K, BK):
                uu = k0 // VPW + offs_u
                umask = uu < units
                wmask = umask[:, None] & nmask[None, :]
                kk = k0 + offs_k
                x = tl.load(x_ptr + src[:, None] * stride_xm + kk[None, :],
                            mask=rmask[:, None] & (kk < K)[None, :], other=0.0)
                acc = tl.dot(x, _weights(q_rows, s_rows, z_rows, k0, uu, nmask, wmask, BITS, GS, SYMMETRIC, VPW, UNIT,
                                         BKW, UPG, BK, BN, dt), acc)
                if GATED:
                    acc_up = tl.dot(x, _weights(q_rows + n_out * stride_qn, s_rows + n_out * groups,
                                                z_rows + n_out * groups, k0, uu, nmask, wmask, BITS, GS, SYMMETRIC,
                                                VPW, UNIT, BKW, UPG, BK, BN, dt), acc_up)
        if GATED:
            tl.store(y_ptr + pair[:, None].to(tl.int64) * stride_ym + offs_n[None, :], _silu_mul(acc, acc_up, dt),
                     mask=rmask[:, None] & nmask[None, :])
        else:
            _store(acc, y_ptr, b_ptr, rw_ptr, slot64, pair, rmask, offs_n, nmask, N, stride_ym, dt, HAS_BIAS,
                   WEIGHTED)


@triton.jit
def _weights(q_rows, s_rows, z_rows, k0, uu, nmask, wmask, BITS: tl.constexpr, GS: tl.constexpr,
             SYMMETRIC: tl.constexpr, VPW: tl.constexpr, UNIT: tl.constexpr, BKW: tl.constexpr, UPG: tl.constexpr,
             BK: tl.constexpr, BN: tl.constexpr, dt: tl.constexpr):
    """packed_kernel's dequantized [BK, BN] weight tile of one step."""
    q = _values(q_rows, uu, wmask, BITS, VPW, UNIT)  # [BKW, VPW, BN]
    s, z = _step_scale_zero(s_rows, z_rows, k0, uu, nmask, wmask, BITS, GS, SYMMETRIC, UPG % BKW == 0, UPG)
    w = tl.fma(_int_to_float(q), s, -(z * s)).to(dt)
    return tl.reshape(w, (BK, BN))


@triton.jit
def gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, rw_ptr, y_ptr, order_ptr, blocks_ptr, first_ptr,
    pos0, n_slots, max_blocks, row_div, N, K, groups,
    stride_xm, stride_ym, stride_qe, stride_qn,
    BITS: tl.constexpr, GS: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
    WEIGHTED: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, VPW: tl.constexpr, UNIT: tl.constexpr,
):
    """One row per block (a decode step of one token): no tensor cores and no shared memory. The packed words are
    expanded in registers to [BK/VPW, VPW, BN], dequantized in float32 (not rounded to bf16: the result differs from
    the reference's bf16 weights by that rounding only) and multiplied with x on the CUDA cores; the products
    accumulate per element and are reduced once at the end."""
    valid, slot, rmask, pair, src = _block(blocks_ptr, first_ptr, order_ptr, pos0, n_slots, max_blocks, row_div,
                                              tl.program_id(0), 1)
    if valid:
        dt = x_ptr.dtype.element_ty
        slot64 = slot.to(tl.int64)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        nmask = offs_n < N
        q_rows = q_ptr + slot64 * stride_qe + offs_n[None, :].to(tl.int64) * stride_qn  # [1, BN]
        BKW: tl.constexpr = BK // VPW
        UPG: tl.constexpr = GS // VPW
        offs_u = tl.arange(0, BKW)
        offs_j = tl.arange(0, VPW)
        s_rows = s_ptr + slot64 * N * groups + offs_n * groups
        z_rows = z_ptr + slot64 * N * groups + offs_n * groups
        x_row = x_ptr + tl.sum(src, axis=0) * stride_xm
        units = K // VPW
        acc = tl.zeros((BKW, VPW, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            uu = k0 // VPW + offs_u
            umask = uu < units
            wmask = umask[:, None] & nmask[None, :]
            q = _values(q_rows, uu, wmask, BITS, VPW, UNIT)  # [BKW, VPW, BN]
            s, z = _step_scale_zero(s_rows, z_rows, k0, uu, nmask, wmask, BITS, GS, SYMMETRIC, UPG % BKW == 0,
                                    UPG)
            x = tl.load(x_row + (uu * VPW)[:, None] + offs_j[None, :], mask=umask[:, None], other=0.0)
            acc += tl.fma(_int_to_float(q), s, -(z * s)) * x.to(tl.float32)[:, :, None]
        out = tl.sum(tl.sum(acc, axis=0), axis=0)[None, :]  # [1, BN]
        _store(out, y_ptr, b_ptr, rw_ptr, slot64, pair, rmask, offs_n, nmask, N, stride_ym, dt, HAS_BIAS, WEIGHTED)


@triton.jit
def route_kernel(keys_ptr, order_ptr, blocks_ptr, first_ptr, S, P, max_blocks,
                 SP: tl.constexpr, PP: tl.constexpr, MBP: tl.constexpr):
    """Routing tables for few pairs (one program; every position gets at most BM rows, i.e. one block):
    keys [S] (position of each pair, P = not computed) -> order [S] (pairs sorted by position, stable),
    blocks [max_blocks, 3] (position, first row, end row; position P past the last), first [P+1]."""
    i = tl.arange(0, SP)
    mi = i < S
    key = tl.load(keys_ptr + i, mask=mi, other=P).to(tl.int32)
    ki = key[:, None]
    kj = key[None, :]
    same = kj == ki
    before = same & (i[None, :] < i[:, None])
    rank = tl.sum(((kj < ki) | before).to(tl.int32), axis=1)
    tl.store(order_ptr + rank, i, mask=mi)
    count = tl.sum(same.to(tl.int32), axis=1)
    head = (tl.sum(before.to(tl.int32), axis=1) == 0) & mi & (key < P)  # first pair of each computed position
    below = tl.sum(((kj < ki) & head[None, :]).to(tl.int32), axis=1)  # computed positions below key: the block
    tl.store(blocks_ptr + below * 3, key, mask=head)
    tl.store(blocks_ptr + below * 3 + 1, rank, mask=head)
    tl.store(blocks_ptr + below * 3 + 2, rank + count, mask=head)
    n_blocks = tl.sum(head.to(tl.int32), axis=0)
    b = tl.arange(0, MBP)
    unused = (b >= n_blocks) & (b < max_blocks)
    tl.store(blocks_ptr + b * 3, tl.full((MBP,), 0, tl.int32) + P, mask=unused)
    tl.store(blocks_ptr + b * 3 + 1, tl.full((MBP,), 0, tl.int32), mask=unused)
    tl.store(blocks_ptr + b * 3 + 2, tl.full((MBP,), 0, tl.int32), mask=unused)
    p = tl.arange(0, PP)
    first = tl.sum(((kj < p[:, None]) & head[None, :]).to(tl.int32), axis=1)
    tl.store(first_ptr + p, first, mask=p <= P)
