"""Hopper (sm90) prefill kernel in Gluon: y^T = W x^T per tile, the dequantized weights as wgmma's register operand.

packed_kernel (kernels.py) computes y = x W^T with the dequantized [BK, BN] weight tile as tl.dot's B operand, which
wgmma reads from shared memory: every step stores the tile there and waits for it. Here each program computes
two tiles of W [BNT, 128] x x^T [128, BM] (Machete / mixed-input CUTLASS style): the weights are dequantized in
registers, directly in the layout of wgmma's A operand (no shared memory, no shuffles: `convert_layout(...,
assert_trivial=True)` checks it at compile time), and x^T is wgmma's B operand in shared memory. x's rows and both
tiles' packed words come by cp.async, NUM_STAGES - 1 steps ahead (NUM_STAGES >= 3); the words are read from shared
memory by the thread that dequantizes them (3 bits: 12 words per row and step, gathered 4 bytes at a time there,
are loaded from global memory into registers half a step to a step ahead instead: 2.5-3 % faster on the mixes).
While one tile's wgmma runs (asynchronously) the other tile is dequantized, two operations per value (_mantissa;
MANTISSA False: the magic-number form, five). A first version that loaded every width's words
from global memory half a step ahead was 11-13 % slower at 4 bits but ~5 % faster on Mixtral's mix (session 23,
eval/bench_gpu.py HOPPER_SETTINGS' notes).

ptxas (12.8) treats a wgmma's register operand as free once the wgmma is issued: the next tile's dequantization
reuses those registers after waiting for the wgmma (SASS: WARPGROUP.DEPBAR right after the HGMMAs), so tensor cores
and dequantization take turns; a schedule that kept the operand live (two wgmmas per tile, session 24) measured
slower (launch.py's note). Down projections with few long programs split K (grid axis 2: launch.hopper_split_k).

The order of K inside each step of 128 is permuted so that each thread's 32 values of a weight row are consecutive
in the packing (whole words: 4 words at 4 bits, 2 at 2, 8 at 8, one 3-word unit at 3): column c = 16i + 8h + 2t + e
of the A tile (t: the thread in its quad; wgmma's A fragment) holds k = 32t + 4i + 2h + e. x (and h) are permuted
the same way once per projection input (`permute_k`, a torch op), so their loads stay 16-byte cp.async copies.

The two tiles are the gate and up rows of an output column block (GATED: SiLU(gate) * up written as h, rounded as
the reference does) or two consecutive row blocks of W (plain, optionally times the routing weight: down). Rows come
in blocks of the routing tables (routing.py) exactly as in packed_kernel; CUDA-graph safe (no host sync).
Requirements (launch.hopper_device / hopper_group): sm90, packed 2/3/4/8-bit groups without bias, K % 128 == 0,
group_size % 32 == 0, BM <= 128 (register budget: two [BNT, BM] float32 accumulators; 255 registers, and 100-156
bytes spilled at 3 bits and BM 128, ptxas -v: x's row pointers, reloaded once a step).
"""
from __future__ import annotations

from functools import cache

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                               warpgroup_mma_wait)

BK = 128  # values of K per step (the permutation's block)


def _log2(n: int) -> int:
    return n.bit_length() - 1


@cache
def layouts(bnt: int, bm: int, warps: int, bits: int) -> dict:
    """Gluon layouts of one program: the values of the packed words ([BNT, 4, 32] at 3 bits, else [BNT, 4, WPT, VPW]:
    thread t of a quad holds the 32 values 32t.. of its rows), wgmma's accumulator and A operand, x's load and shared
    tile. Rows of a tile: 16 per warp (lanes 8 rows, a register for row + 8), rows past 16 * warps in registers."""
    vpw = 32 if bits == 3 else 32 // bits
    shape = [bnt, 4, 32] if bits == 3 else [bnt, 4, 32 // vpw, vpw]
    rank = len(shape)

    def at(dim: int, value: int) -> list[int]:
        basis = [0] * rank
        basis[dim] = value
        return basis

    if bits == 3:
        regs = [at(2, 1 << b) for b in range(5)]
    else:
        regs = [at(3, 1 << b) for b in range(_log2(vpw))] + [at(2, 1 << b) for b in range(_log2(32 // vpw))]
    regs += [at(0, 8)] + [at(0, 1 << b) for b in range(_log2(bnt)) if (1 << b) >= 16 * warps]
    lanes = [at(1, 1), at(1, 2), at(0, 1), at(0, 2), at(0, 4)]
    warp_bases = [at(0, 16 << b) for b in range(_log2(warps))]
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, bm, 16])
    wload = (gl.BlockedLayout([1, 1], [8, 4], [warps, 1], [1, 0]) if bits == 3 else  # [row, unit]: one word each
             gl.BlockedLayout([1, 4], [32 // bits, bits], [warps, 1], [1, 0]))  # [row, word]: 16 bytes
    return dict(
        WLOAD=wload,
        WSMEM=gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
        VALUES=gl.DistributedLinearLayout(regs, lanes, warp_bases, [], shape), MMA=mma,
        DOT=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
        XLOAD=gl.BlockedLayout([1, 8], [2, 16], [warps, 1], [1, 0]),
        XSMEM=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
    )


def permute_k(x: torch.Tensor) -> torch.Tensor:
    """x [rows, K] with each block of 128 columns in the kernel's order: column 16i + 8h + 2t + e <- 32t + 4i + 2h
    + e (a copy)."""
    rows, k = x.shape
    return x.view(rows, k // BK, 4, 8, 2, 2).permute(0, 1, 3, 4, 2, 5).reshape(rows, k)


@gluon.jit
def _rows(blocks_ptr, first_ptr, order_ptr, pos0, n_slots, max_blocks, row_div, BM: gl.constexpr,
          layout: gl.constexpr):
    """(valid, slot, row mask, pair, source row) of this program's block, rows in `layout` (packed_kernel's _block)."""
    blk = gl.load(first_ptr + pos0) + gl.program_id(0)
    valid = blk < max_blocks
    blk = gl.minimum(blk, max_blocks - 1)
    slot = gl.load(blocks_ptr + blk * 3) - pos0
    valid = valid & (slot < n_slots)
    r0 = gl.load(blocks_ptr + blk * 3 + 1)
    r1 = gl.load(blocks_ptr + blk * 3 + 2)
    rows = r0 + gl.arange(0, BM, layout=layout)
    rmask = (rows < r1) & valid
    pair = gl.load(order_ptr + rows, mask=rmask, other=0)
    return valid, slot, rmask, pair, (pair // row_div).to(gl.int64)


@gluon.jit
def _words(w_smem, stage, BITS: gl.constexpr, VALUES: gl.constexpr):
    """One stage's packed words (2/4/8 bits) of this thread's rows from shared memory: [BNT, 4, WPT]."""
    BNT: gl.constexpr = VALUES.shape[0]
    WPT: gl.constexpr = VALUES.shape[2]
    wa = w_smem.index(stage).reshape([BNT, 4, WPT]).load(gl.SliceLayout(3, VALUES))
    return wa, wa, wa


@gluon.jit
def _words3(q_base, q_rows, step, VALUES: gl.constexpr):
    """3 bits: the three words of this thread's unit of each row, [BNT, 4] each, from global memory (a row's 12
    words of a step are not a power of two: loaded a step ahead into registers instead of shared memory)."""
    lay: gl.constexpr = gl.SliceLayout(2, VALUES)
    t = gl.arange(0, 4, layout=gl.SliceLayout(0, lay))
    p = q_base + (q_rows[:, None] + ((step * 4 + t) * 3)[None, :])  # (int32 offsets: fewer registers)
    return gl.load(p), gl.load(p + 1), gl.load(p + 2)


@gluon.jit
def _scales(s_base, z_base, rows, step, GS: gl.constexpr, SYMMETRIC: gl.constexpr, BITS: gl.constexpr,
            VALUES: gl.constexpr):
    """float32 (scale, zero) of this thread's 32 values of each row: [BNT, 4] (one group: GS % 32 == 0)."""
    if BITS == 3:
        lay: gl.constexpr = gl.SliceLayout(2, VALUES)
    else:
        lay: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, VALUES))  # noqa: F811
    t = gl.arange(0, 4, layout=gl.SliceLayout(0, lay))
    g = ((step * 128 + t * 32) // GS)[None, :]
    off = rows[:, None] + g  # (int32 offsets from the expert's base: fewer registers than row pointers)
    s = gl.load(s_base + off).to(gl.float32)
    if SYMMETRIC:
        z = gl.zeros_like(s) + (1 << (BITS - 1))
    else:
        z = gl.load(z_base + off).to(gl.float32)
    return s, z


@gluon.jit
def _mantissa(wa, wb, wc, s, z, BITS: gl.constexpr, VALUES: gl.constexpr):
    """(q - z) * s in float32, exactly, in two operations per value: q is moved (one shift shared by up to RUN
    values) to bit p (12 <= p <= 23 - BITS) of a float32's mantissa and or'ed into 1.0 (one lop3): a = 1 + q 2^(p-23);
    then fma(a, s 2^(23-p), -(2^(23-p) + z) s) = (q - z) s, exact because (2^(23-p) + z) s has at most 12 + 11 bits
    (z < 2^BITS, s a float16) and the result is (q - z) s itself. The magic-number form ((q | 0x4B000000) - 2^23, then
    fma(w, s, -z s)) takes shift, mask, or, add and fma (eval/results/gpu_hopper.md)."""
    RUN: gl.constexpr = (11 - BITS) // BITS + 1  # values per shift: 2 bits 5, 3 bits 3, 4 bits 2, 8 bits 1
    if BITS == 3:  # [BNT, 4, 32]: value j at bits 3j.. of the 96 bits a, b, c (j = 10, 21 span two words)
        j = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, VALUES)))[None, None, :]
        word = (j * 3) // 32
        off = (j * 3) % 32
        idx = j - (word * 32 + 2) // 3  # index among the values that start in `word`
        p = gl.where(off > 29, 12, 12 + (idx % RUN) * 3)
        a = wa.to(gl.uint32, bitcast=True)[:, :, None]
        b = wb.to(gl.uint32, bitcast=True)[:, :, None]
        c = wc.to(gl.uint32, bitcast=True)[:, :, None]
        lo = gl.where(word == 0, a, gl.where(word == 1, b, c))
        hi = gl.where(word == 0, b, c)
        s_ = s[:, :, None]
        z_ = z[:, :, None]
    else:  # [BNT, 4, WPT, VPW]: value j of a word at bits BITS j..
        VPW: gl.constexpr = VALUES.shape[3]
        j = gl.arange(0, VPW, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, VALUES))))
        j = j[None, None, None, :]
        off = j * BITS
        p = 12 + (j % RUN) * BITS
        lo = wa.to(gl.uint32, bitcast=True)[:, :, :, None]
        hi = lo
        s_ = s[:, :, None, None]
        z_ = z[:, :, None, None]
    r = off - p  # right shift (left where negative); over 0 the next word's low bits come in (3 bits' j 10, 21)
    rr = gl.maximum(r, 0).to(gl.uint32)
    v = ((lo << gl.maximum(-r, 0).to(gl.uint32)) >> rr) | ((hi << 1) << (31 - rr))
    zero = gl.zeros_like(v)
    q = gl.inline_asm_elementwise(  # (v & mask) | 1.0's bits, one lop3 (ptxas emits two: one immediate each)
        "lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [v, zero + (((1 << BITS) - 1) << p).to(gl.uint32),
                                                      zero + 0x3F800000], dtype=gl.uint32, is_pure=True, pack=1)
    m = (1 << (23 - p)).to(gl.float32)
    return gl.fma(q.to(gl.float32, bitcast=True), s_ * m, -((m + z_) * s_))


@gluon.jit
def _dequant(wa, wb, wc, s, z, BITS: gl.constexpr, MANTISSA: gl.constexpr, VALUES: gl.constexpr,
             DOT: gl.constexpr, dt: gl.constexpr):
    """wgmma's A operand [BNT, 128] from one step's words: exact (q - z) * s in float32, rounded to dt."""
    BNT: gl.constexpr = VALUES.shape[0]
    if MANTISSA:
        w = _mantissa(wa, wb, wc, s, z, BITS, VALUES).to(dt)
    elif BITS == 3:
        j = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, VALUES)))[None, None, :]
        a = wa.to(gl.uint32, bitcast=True)[:, :, None]
        b = wb.to(gl.uint32, bitcast=True)[:, :, None]
        c = wc.to(gl.uint32, bitcast=True)[:, :, None]
        word = (j * 3) // 32
        sh = ((j * 3) % 32).to(gl.uint32)
        lo = gl.where(word == 0, a, gl.where(word == 1, b, c))
        hi = gl.where(word == 0, b, c)
        q = ((lo >> sh) | ((hi << 1) << (31 - sh))) & 7
        w = (q | 0x4B000000).to(gl.float32, bitcast=True) - 8388608.0
        w = gl.fma(w, s[:, :, None], -(z * s)[:, :, None]).to(dt)
    else:
        VPW: gl.constexpr = VALUES.shape[3]
        j = gl.arange(0, VPW, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, VALUES))))
        q = (wa.to(gl.uint32, bitcast=True)[:, :, :, None] >> (j * BITS).to(gl.uint32)[None, None, None, :]) & (
            (1 << BITS) - 1)
        w = (q | 0x4B000000).to(gl.float32, bitcast=True) - 8388608.0
        w = gl.fma(w, s[:, :, None, None], -(z * s)[:, :, None, None]).to(dt)
    w = gl.reshape(w, [BNT, 4, 8, 2, 2])
    w = gl.permute(w, [0, 2, 3, 1, 4])
    return gl.convert_layout(gl.reshape(w, [BNT, 128]), DOT, assert_trivial=True)


@gluon.jit
def _issue(x_smem, wa_smem, wb_smem, stage, x_ptr, src, qa, qb, step, BITS: gl.constexpr, XLOAD: gl.constexpr,
           WLOAD: gl.constexpr):
    """cp.async of one step into `stage`: x's [BM, 128] rows and the packed words of both tiles' rows (not at 3
    bits: _words3)."""
    cols = gl.arange(0, 128, layout=gl.SliceLayout(0, XLOAD))
    async_copy.async_copy_global_to_shared(x_smem.index(stage), x_ptr + src[:, None] + (step * 128 + cols)[None, :])
    if BITS != 3:
        WPRP: gl.constexpr = 4 * BITS
        c = gl.arange(0, WPRP, layout=gl.SliceLayout(0, WLOAD))
        off = (step * WPRP + c)[None, :]
        async_copy.async_copy_global_to_shared(wa_smem.index(stage), qa[:, None] + off)
        async_copy.async_copy_global_to_shared(wb_smem.index(stage), qb[:, None] + off)


@gluon.jit
def wgmma_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, rw_ptr, y_ptr, order_ptr, blocks_ptr, first_ptr,
    pos0, n_slots, max_blocks, row_div, N, K, groups,
    stride_xm, stride_ym, stride_qe, stride_qn, split_steps, stride_ys,
    BITS: gl.constexpr, GS: gl.constexpr, SYMMETRIC: gl.constexpr, WEIGHTED: gl.constexpr, GATED: gl.constexpr,
    BM: gl.constexpr, NUM_STAGES: gl.constexpr, MANTISSA: gl.constexpr,
    VALUES: gl.constexpr, MMA: gl.constexpr, DOT: gl.constexpr, XLOAD: gl.constexpr, XSMEM: gl.constexpr,
    WLOAD: gl.constexpr, WSMEM: gl.constexpr,
):
    """Program (m, n): block m of the group's rows, output columns n*2*BNT.. (plain: two tiles of BNT rows) or
    n*BNT.. of h (GATED: gate rows n*BNT.. and up rows N/2 + n*BNT..). x is permute_k'ed. Split K: program
    (m, n, k) computes steps k*split_steps.. of K into y + k*stride_ys (split_steps * 128 % GS == 0)."""
    BNT: gl.constexpr = VALUES.shape[0]
    dt: gl.constexpr = x_ptr.dtype.element_ty
    valid, slot, rmask, pair, src = _rows(blocks_ptr, first_ptr, order_ptr, pos0, n_slots, max_blocks, row_div, BM,
                                          gl.SliceLayout(1, XLOAD))
    if valid:
        slot64 = slot.to(gl.int64)
        kbeg = gl.program_id(2) * split_steps  # this program's steps of K: bases moved to its first
        x_ptr = x_ptr + kbeg * 128
        y_ptr = y_ptr + gl.program_id(2).to(gl.int64) * stride_ys
        if GATED:
            n_out = N // 2
            n0 = gl.program_id(1) * BNT
            n1 = n0 + n_out
        else:
            n_out = N
            n0 = gl.program_id(1) * (2 * BNT)
            n1 = n0 + BNT
        if BITS == 3:
            row_lay: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, VALUES))
        else:
            row_lay: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, VALUES)))  # noqa: F811
        r = gl.arange(0, BNT, layout=row_lay)
        ra = gl.minimum(n0 + r, N - 1)  # rows past N (last tile) read row N - 1, their outputs are not stored
        rb = gl.minimum(n1 + r, N - 1)
        s_base = s_ptr + slot64 * N * groups + kbeg * 128 // GS
        z_base = z_ptr + slot64 * N * groups + kbeg * 128 // GS
        ga_s = ra * groups
        gb_s = rb * groups
        rw_ = gl.arange(0, BNT, layout=gl.SliceLayout(1, WLOAD))
        q_base = q_ptr + slot64 * stride_qe + kbeg * (4 * BITS)
        qa = q_base + gl.minimum(n0 + rw_, N - 1).to(gl.int64) * stride_qn
        qb = q_base + gl.minimum(n1 + rw_, N - 1).to(gl.int64) * stride_qn
        src_x = src * stride_xm
        x_smem = gl.allocate_shared_memory(dt, [NUM_STAGES, BM, 128], XSMEM)
        ga = ra * stride_qn  # (3 bits: words from global memory, _words3)
        gb = rb * stride_qn
        if BITS == 3:
            wa_smem = x_smem
            wb_smem = x_smem
        else:
            wa_smem = gl.allocate_shared_memory(gl.int32, [NUM_STAGES, BNT, 4 * BITS], WSMEM)
            wb_smem = gl.allocate_shared_memory(gl.int32, [NUM_STAGES, BNT, 4 * BITS], WSMEM)
        steps = gl.minimum(K // 128 - kbeg, split_steps)
        for s in gl.static_range(NUM_STAGES - 1):
            if s < steps:
                _issue(x_smem, wa_smem, wb_smem, s, x_ptr, src_x, qa, qb, s, BITS, XLOAD, WLOAD)
            async_copy.commit_group()
        acc_a = gl.zeros([BNT, BM], gl.float32, MMA)
        acc_b = gl.zeros([BNT, BM], gl.float32, MMA)
        async_copy.wait_group(NUM_STAGES - 2)
        fence_async_shared()
        gl.thread_barrier()
        ssa, zqa = _scales(s_base, z_base, ga_s, 0, GS, SYMMETRIC, BITS, VALUES)
        ssb, zqb = _scales(s_base, z_base, gb_s, 0, GS, SYMMETRIC, BITS, VALUES)
        if BITS == 3:
            wa0, wa1, wa2 = _words3(q_base, ga, 0, VALUES)
            wb0, wb1, wb2 = _words3(q_base, gb, 0, VALUES)  # (tile b's words: loaded after its dequant)
        else:
            wa0, wa1, wa2 = _words(wa_smem, 0, BITS, VALUES)
            wb0, wb1, wb2 = wa0, wa1, wa2
        a_tile = _dequant(wa0, wa1, wa2, ssa, zqa, BITS, MANTISSA, VALUES, DOT, dt)
        for i in range(steps):
            st = i % NUM_STAGES
            nxt = gl.minimum(i + 1, steps - 1)
            ssa, zqa = _scales(s_base, z_base, ga_s, nxt, GS, SYMMETRIC, BITS, VALUES)  # next step's: in flight
            if BITS == 3:
                wa0, wa1, wa2 = _words3(q_base, ga, nxt, VALUES)
            xt = x_smem.index(st).permute((1, 0))
            acc_a = warpgroup_mma(a_tile, xt, acc_a, is_async=True)
            if BITS != 3:
                wb0, wb1, wb2 = _words(wb_smem, st, BITS, VALUES)
            b_tile = _dequant(wb0, wb1, wb2, ssb, zqb, BITS, MANTISSA, VALUES, DOT, dt)
            ssb, zqb = _scales(s_base, z_base, gb_s, nxt, GS, SYMMETRIC, BITS, VALUES)  # half a step ahead
            if BITS == 3:
                wb0, wb1, wb2 = _words3(q_base, gb, nxt, VALUES)
            acc_a, _ = warpgroup_mma_wait(0, deps=[acc_a, a_tile])
            acc_b = warpgroup_mma(b_tile, xt, acc_b, is_async=True)
            async_copy.wait_group(NUM_STAGES - 3)  # step i + 1 has landed
            fence_async_shared()
            gl.thread_barrier()  # ... for every thread; and every warpgroup is past step i - 1's wgmmas
            j = i + NUM_STAGES - 1
            if j < steps:  # into the stage of step i - 1
                _issue(x_smem, wa_smem, wb_smem, j % NUM_STAGES, x_ptr, src_x, qa, qb, j, BITS, XLOAD, WLOAD)
            async_copy.commit_group()
            if BITS != 3:
                wa0, wa1, wa2 = _words(wa_smem, (i + 1) % NUM_STAGES, BITS, VALUES)
            a_tile = _dequant(wa0, wa1, wa2, ssa, zqa, BITS, MANTISSA, VALUES, DOT, dt)
            acc_b, _ = warpgroup_mma_wait(0, deps=[acc_b, b_tile])
        async_copy.wait_group(0)
        _epilogue(acc_a, acc_b, y_ptr, rw_ptr, blocks_ptr, first_ptr, order_ptr, pos0, n_slots, max_blocks, n0, n1,
                  n_out, stride_ym, BM, WEIGHTED, GATED, MMA, dt)


@gluon.jit
def _epilogue(acc_a, acc_b, y_ptr, rw_ptr, blocks_ptr, first_ptr, order_ptr, pos0, n_slots, max_blocks, n0, n1,
              n_out, stride_ym, BM: gl.constexpr, WEIGHTED: gl.constexpr, GATED: gl.constexpr, MMA: gl.constexpr,
              dt: gl.constexpr):
    """Stores y[pair, n] = acc[n, pair's column] (rounded to dt as the reference's matmul; weighted in float32), or
    h = SiLU(gate) * up with the reference's roundings (GATED)."""
    BNT: gl.constexpr = acc_a.shape[0]
    valid, slot, rmask, pair, src = _rows(blocks_ptr, first_ptr, order_ptr, pos0, n_slots, max_blocks, 1, BM,
                                          gl.SliceLayout(0, MMA))
    r = gl.arange(0, BNT, layout=gl.SliceLayout(1, MMA))
    base = y_ptr + pair.to(gl.int64)[None, :] * stride_ym
    if GATED:
        g = acc_a.to(dt).to(gl.float32)
        act = (g / (1.0 + gl.exp(-g))).to(dt).to(gl.float32)
        h = (act * acc_b.to(dt).to(gl.float32)).to(dt)
        gl.store(base + (n0 + r)[:, None], h, mask=rmask[None, :] & ((n0 + r) < n_out)[:, None])
    else:
        ya = acc_a.to(dt)
        yb = acc_b.to(dt)
        if WEIGHTED:
            rw = gl.load(rw_ptr + pair, mask=rmask, other=0.0).to(gl.float32)[None, :]
            gl.store(base + (n0 + r)[:, None], ya.to(gl.float32) * rw,
                     mask=rmask[None, :] & ((n0 + r) < n_out)[:, None])
            gl.store(base + (n1 + r)[:, None], yb.to(gl.float32) * rw,
                     mask=rmask[None, :] & ((n1 + r) < n_out)[:, None])
        else:
            gl.store(base + (n0 + r)[:, None], ya, mask=rmask[None, :] & ((n0 + r) < n_out)[:, None])
            gl.store(base + (n1 + r)[:, None], yb, mask=rmask[None, :] & ((n1 + r) < n_out)[:, None])
