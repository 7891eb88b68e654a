"""Decode of few tokens: one program per ((token, k) pair, column tile, split of K), all bit-widths in ONE launch.

For a few tokens per call (launch.PAIR_TOKENS) a whole MoE layer is five launches and no routing tables:
  1. `permute_kernel`: the hidden states, float32, permuted (and scaled, below) once per bit-width present;
  2. `pair_kernel` on the first projection (gate_up): program (pair, n, ks) reads the pair's expert id, finds its
     position through the projection's lookup table and its group by comparing with the groups' first positions
     (a scalar branch per program: each group's code is specialised by bit-width, no divergence inside a program),
     and computes the partial sums of BN gate rows and the BN matching up rows (interleaved tile) over split ks
     of K (launch.split_k: a few quantization groups per program, so that many programs stream at once);
  3. `gate_kernel`: the splits summed in order, SiLU(gate) * up rounded as the reference does, written permuted
     for the down projection's bit-widths (without split K, pair_kernel does this itself: one launch less);
  4. `pair_kernel` on down: float32 partial sums (dropped pairs write zeros);
  5. `sum_kernel`: splits summed, rounded, times the routing weight, the top_k pairs of each token summed in a
     fixed order (deterministic: a CUDA-graph replay equals the eager call bit for bit).
Each program streams its weight rows once, one quantization group (GS values) per step; the next group's packed
words are loaded before this group's arithmetic (two groups in flight). Value j of a unit is made a float with one
logical op (lop3: its bits masked in place, the exponent bits of 2**23 or'ed in) = 2**23 + q 2**P, P a
compile-time constant (_unit_value; a shift first where the bits would pass the mantissa, a 3-bit value straddling
two words is joined first), then
    t[r, u] = sum_j (v_j - (2**23 + z 2**P_j)) * x_j 2**-P_j      (the subtraction is exact: (q - z) 2**P_j)
    acc[r, u] += t[r, u] * s[r, group]
so per value: one logical op, one add and one fma (the 2**-P_j is folded into the permuted x). x_j of the step's
units is read from the permuted copy (value j of unit u at j * UNITS + u), a load with the same shape, element
size and contiguity as the packed words, so Triton gives both the same layout: no shared memory or barrier in
the loop. The weights are not rounded to bf16 (the reference rounds them): the results differ by that rounding.
"""
from __future__ import annotations

import triton
import triton.language as tl

from moecompress.runtime.cuda.kernels import _scale_zero


@triton.jit
def _unit_value(wa, wb, wc, J: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """Value J of a unit (one word, or the three words of 32 3-bit values; J a compile-time constant) as the float32
    2**23 + q * 2**P (P: 0 for a straddling value, 23 - BITS for a shifted one, else its bit offset in the word;
    _permuted computes the same P per column): the value's bits are masked in place (shifted only where they would pass
    the mantissa's 23 bits) and the exponent bits of 2**23 or'ed in: one logical op for most values."""
    bit: tl.constexpr = J * BITS
    off: tl.constexpr = bit % 32
    if bit // 32 == 0:
        lo = wa
        hi = wb
    elif bit // 32 == 1:
        lo = wb
        hi = wc
    else:
        lo = wc
        hi = wc
    if off + BITS > 32:  # 3 bits straddling two words: low bits from the end of this word, high from the next
        src = (lo >> off) | (hi << (32 - off))
        mask: tl.constexpr = 7
    elif off + BITS > 23:  # shifted down to bits 23 - BITS .. 22 (P = 23 - BITS)
        src = lo >> (off + BITS - 23)
        mask: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
    else:
        src = lo
        mask: tl.constexpr = ((1 << BITS) - 1) << off
    if ASM:  # (src & mask) | exponent bits in one instruction (ptxas otherwise emits two: one immediate each)
        q = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                      [src, tl.full(src.shape, mask, tl.uint32),
                                       tl.full(src.shape, 0x4B000000, tl.uint32)],
                                      dtype=tl.uint32, is_pure=True, pack=1)
    else:
        q = (src & mask) | 0x4B000000
    return q.to(tl.float32, bitcast=True)


@triton.jit
def _load_units(q_rows, uu, m2, BITS: tl.constexpr, UNIT: tl.constexpr):
    wa = tl.load(q_rows + (uu * UNIT)[None, :], mask=m2, other=0).to(tl.uint32, bitcast=True)
    if BITS == 3:
        wb = tl.load(q_rows + (uu * UNIT + 1)[None, :], mask=m2, other=0).to(tl.uint32, bitcast=True)
        wc = tl.load(q_rows + (uu * UNIT + 2)[None, :], mask=m2, other=0).to(tl.uint32, bitcast=True)
    else:
        wb = wa
        wc = wa
    return wa, wb, wc


@triton.jit
def _permuted(v, cols, K: tl.constexpr, BITS: tl.constexpr):
    """(offsets in a permuted row, values times 2**-P) for values v at columns `cols` (see permute_kernel)."""
    VPW: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    UNIT: tl.constexpr = 3 if BITS == 3 else 1
    j = cols % VPW
    off = (j * BITS) % 32
    p = tl.where(off + BITS > 32, 0, tl.where(off + BITS > 23, 23 - BITS, off))
    scale = ((127 - p) << 23).to(tl.float32, bitcast=True)  # 2**-p exactly
    return j * (K // VPW * UNIT) + (cols // VPW) * UNIT, v * scale


@triton.jit
def _rows_dot(xr_row, q_base, s_base, z_base, rows, rmask, g0, K: tl.constexpr, GS: tl.constexpr,
              BITS: tl.constexpr, SYMMETRIC: tl.constexpr, R: tl.constexpr, NG: tl.constexpr, ASM: tl.constexpr):
    """float32 [R]: x . dequantized weight row rows[r] of one expert (packed words at q_base) over the NG groups
    from group g0 (split K), x permuted (xr_row, float32). One step = one group of GS values."""
    VPW: tl.constexpr = 32 if BITS == 3 else 32 // BITS  # values per unit
    UNIT: tl.constexpr = 3 if BITS == 3 else 1  # words per unit
    WPR: tl.constexpr = K * BITS // 32  # words per weight row
    BKW: tl.constexpr = GS // VPW  # units per step
    GROUPS: tl.constexpr = K // GS
    offs_u = tl.arange(0, BKW)
    q_rows = q_base + rows[:, None].to(tl.int64) * WPR  # [R, 1]
    sz_rows = rows.to(tl.int64) * GROUPS  # [R]
    m2 = rmask[:, None] & (offs_u < BKW)[None, :]
    x_tile = xr_row + offs_u[None, :] * UNIT + (rows * 0)[:, None]  # [R, BKW]: the word tile's shape and layout
    acc = tl.zeros((R, BKW), dtype=tl.float32)
    na, nb, nc = _load_units(q_rows, offs_u + g0 * BKW, m2, BITS, UNIT)
    for g in range(g0, g0 + NG):
        wa, wb, wc = na, nb, nc
        # the next group's words are in flight during this group's arithmetic (masked off after the last)
        na, nb, nc = _load_units(q_rows, offs_u + (g + 1) * BKW, m2 & (g + 1 < g0 + NG), BITS, UNIT)
        s, z = _scale_zero(s_base, z_base, sz_rows + g, rmask, BITS, SYMMETRIC)
        z = z[:, None]
        xg = x_tile + g * (BKW * UNIT)
        for j in tl.static_range(VPW):
            # (2**23 + q 2**P) - (2**23 + z 2**P) = (q - z) 2**P exactly; x_j was stored times 2**-P
            if (j * BITS) % 32 + BITS > 32:
                zm = z + 8388608.0
            elif (j * BITS) % 32 + BITS > 23:
                zm = z * (1 << (23 - BITS)) + 8388608.0
            else:
                zm = z * (1 << ((j * BITS) % 32)) + 8388608.0
            xj = tl.load(xg + j * (K // VPW * UNIT), mask=m2, other=0.0)
            if j == 0:
                t = (_unit_value(wa, wb, wc, j, BITS, ASM) - zm) * xj
            else:
                t += (_unit_value(wa, wb, wc, j, BITS, ASM) - zm) * xj
        acc += t * s[:, None]
    return tl.sum(acc, axis=1)


@triton.jit
def _pair_group(xr_row, q_ptr, s_ptr, z_ptr, y_row, h2, h3, h4, h8, pair, slot, n0, ks, N: tl.constexpr,
                K: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, MODE: tl.constexpr,
                ROWS: tl.constexpr, OUT2: tl.constexpr, OUT3: tl.constexpr, OUT4: tl.constexpr,
                OUT8: tl.constexpr, BN: tl.constexpr, KS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Columns n0..n0+BN of one pair whose expert is `slot` of a group of BITS: compute and store. MODE 0: the
    rounded projection; 1 (gated): h = SiLU(gate) * up, also permuted for the next projection's bit-widths OUTb
    into hb; 2: float32 partial sums over split ks of KS (gate and up rows both, when ROWS = 2N)."""
    q_base = q_ptr + slot.to(tl.int64) * (ROWS * (K * BITS // 32))
    sz_base = slot.to(tl.int64) * (ROWS * (K // GS))
    NG: tl.constexpr = K // GS // KS
    offs = n0 + tl.arange(0, BN)
    omask = offs < N
    if ROWS == 2 * N:  # rows interleaved: 2i -> gate row n0 + i, 2i + 1 -> up row N + n0 + i
        r = tl.arange(0, 2 * BN)
        cols = n0 + r // 2
        rows = cols + (r % 2) * N
        acc = _rows_dot(xr_row, q_base, s_ptr + sz_base, z_ptr + sz_base, rows, cols < N, ks * NG, K, GS, BITS,
                        SYMMETRIC, 2 * BN, NG, ASM)
        if MODE == 2:
            tl.store(y_row + rows, acc, mask=cols < N)
        else:
            gate, up = tl.split(tl.reshape(acc, (BN, 2)))
            h = _silu_gate(gate, up, DT)
            _store_permuted(h.to(tl.float32), h2, h3, h4, h8, pair, offs, omask, N, OUT2, OUT3, OUT4, OUT8)
    else:
        acc = _rows_dot(xr_row, q_base, s_ptr + sz_base, z_ptr + sz_base, offs, omask, ks * NG, K, GS, BITS,
                        SYMMETRIC, BN, NG, ASM)
        if MODE == 2:
            tl.store(y_row + offs, acc, mask=omask)
        else:
            tl.store(y_row + offs, acc.to(DT), mask=omask)


@triton.jit
def _silu_gate(gate, up, DT: tl.constexpr):
    """SiLU(gate) * up as the reference computes it in DT: h rounded, then silu and the product (each rounded)."""
    gate = gate.to(DT).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(DT).to(tl.float32)
    return (act * up.to(DT).to(tl.float32)).to(DT)


@triton.jit
def _store_permuted(v, h2, h3, h4, h8, row, cols, mask, N: tl.constexpr, OUT2: tl.constexpr, OUT3: tl.constexpr,
                    OUT4: tl.constexpr, OUT8: tl.constexpr):
    """v (float32, columns `cols` of row `row` of an [M, N] matrix) into its permuted copies (permute_kernel)."""
    r64 = row.to(tl.int64)
    if OUT2:
        offs, vb = _permuted(v, cols, N, 2)
        tl.store(h2 + r64 * N + offs, vb, mask=mask)
    if OUT3:
        offs, vb = _permuted(v, cols, N, 3)
        tl.store(h3 + r64 * (3 * N) + offs, vb, mask=mask)
    if OUT4:
        offs, vb = _permuted(v, cols, N, 4)
        tl.store(h4 + r64 * N + offs, vb, mask=mask)
    if OUT8:
        offs, vb = _permuted(v, cols, N, 8)
        tl.store(h8 + r64 * N + offs, vb, mask=mask)


@triton.jit
def pair_kernel(x2, x3, x4, x8, idx_ptr, lut_ptr, y_ptr, h2, h3, h4, h8,
                q2, s2, z2, q3, s3, z3, q4, s4, z4, q8, s8, z8,
                start2, end2, start3, end3, start4, end4, start8, end8,
                row_div, num_experts, pairs,
                N: tl.constexpr, K: tl.constexpr, GS: tl.constexpr, SYMMETRIC: tl.constexpr,
                MODE: tl.constexpr, ROWS: tl.constexpr, KS: tl.constexpr,
                HAS2: tl.constexpr, HAS3: tl.constexpr, HAS4: tl.constexpr, HAS8: tl.constexpr,
                OUT2: tl.constexpr, OUT3: tl.constexpr, OUT4: tl.constexpr, OUT8: tl.constexpr,
                BN: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Program (pair, n, ks): columns n*BN.. of row pair of y from row pair // row_div of x (permuted per bit-width:
    xb) and the pair's expert (see module doc); y [pairs, ROWS or N] (MODE 0, 1) or [KS, pairs, ROWS] (MODE 2:
    split ks of K). Groups of each bit-width: positions [startB, endB), packed tensors qB/sB/zB."""
    pair = tl.program_id(0)
    n0 = tl.program_id(1) * BN
    ks = tl.program_id(2)
    e = tl.load(idx_ptr + pair).to(tl.int32)
    e = tl.where((e < 0) | (e > num_experts), num_experts, e)
    pos = tl.load(lut_ptr + e).to(tl.int32)
    row = (pair // row_div).to(tl.int64)
    if MODE == 2:
        y_row = y_ptr + (ks.to(tl.int64) * pairs + pair) * ROWS
    else:
        y_row = y_ptr + pair.to(tl.int64) * ROWS  # MODE 1 writes the permuted copies only
    in2 = (pos >= start2) & (pos < end2)
    in3 = (pos >= start3) & (pos < end3)
    in4 = (pos >= start4) & (pos < end4)
    in8 = (pos >= start8) & (pos < end8)
    if HAS2:
        if in2:
            _pair_group(x2 + row * K, q2, s2, z2, y_row, h2, h3, h4, h8, pair, pos - start2, n0, ks, N, K, GS, 2,
                        SYMMETRIC, MODE, ROWS, OUT2, OUT3, OUT4, OUT8, BN, KS, DT, ASM)
    if HAS3:
        if in3:
            _pair_group(x3 + row * (3 * K), q3, s3, z3, y_row, h2, h3, h4, h8, pair, pos - start3, n0, ks, N, K, GS,
                        3, SYMMETRIC, MODE, ROWS, OUT2, OUT3, OUT4, OUT8, BN, KS, DT, ASM)
    if HAS4:
        if in4:
            _pair_group(x4 + row * K, q4, s4, z4, y_row, h2, h3, h4, h8, pair, pos - start4, n0, ks, N, K, GS, 4,
                        SYMMETRIC, MODE, ROWS, OUT2, OUT3, OUT4, OUT8, BN, KS, DT, ASM)
    if HAS8:
        if in8:
            _pair_group(x8 + row * K, q8, s8, z8, y_row, h2, h3, h4, h8, pair, pos - start8, n0, ks, N, K, GS, 8,
                        SYMMETRIC, MODE, ROWS, OUT2, OUT3, OUT4, OUT8, BN, KS, DT, ASM)
    if MODE == 2:
        if (in2 | in3 | in4 | in8) == 0:  # dropped pair (expert not computed here): contributes zeros
            offs = n0 + tl.arange(0, BN)
            tl.store(y_row + offs, tl.zeros((BN,), dtype=tl.float32), mask=offs < N)
            if ROWS == 2 * N:
                tl.store(y_row + N + offs, tl.zeros((BN,), dtype=tl.float32), mask=offs < N)


@triton.jit
def permute_kernel(x_ptr, x2, x3, x4, x8, stride_xm, K: tl.constexpr, OUT2: tl.constexpr, OUT3: tl.constexpr,
                   OUT4: tl.constexpr, OUT8: tl.constexpr, BLOCK: tl.constexpr):
    """Row m of x [M, K] -> float32 permuted rows for each bit-width b wanted: value k = u * VPW + j (unit u, value
    j of the unit) at xb[m, j * UNITS * UNIT + u * UNIT] (3 bits: rows of 3K, gaps unused). The pair kernel then
    reads x_j for a run of units with the same layout as the packed words (no layout conversion)."""
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < K
    v = tl.load(x_ptr + m * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    _store_permuted(v, x2, x3, x4, x8, m, cols, mask, K, OUT2, OUT3, OUT4, OUT8)


@triton.jit
def gate_kernel(part_ptr, h2, h3, h4, h8, pairs, N: tl.constexpr, KS: tl.constexpr, OUT2: tl.constexpr,
                OUT3: tl.constexpr, OUT4: tl.constexpr, OUT8: tl.constexpr, BLOCK: tl.constexpr, DT: tl.constexpr):
    """Split-K gate_up: h = SiLU(gate) * up from the KS partial sums [KS, pairs, 2N] (summed in order), written
    permuted for the down projection's bit-widths."""
    pair = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.zeros((BLOCK,), dtype=tl.float32)
    up = tl.zeros((BLOCK,), dtype=tl.float32)
    for ks in tl.static_range(KS):
        row = part_ptr + (ks * pairs + pair).to(tl.int64) * (2 * N)
        gate += tl.load(row + cols, mask=mask, other=0.0)
        up += tl.load(row + N + cols, mask=mask, other=0.0)
    h = _silu_gate(gate, up, DT).to(tl.float32)
    _store_permuted(h, h2, h3, h4, h8, pair, cols, mask, N, OUT2, OUT3, OUT4, OUT8)


@triton.jit
def sum_kernel(part_ptr, rw_ptr, out_ptr, pairs, N: tl.constexpr, TOP_K: tl.constexpr, KS: tl.constexpr,
               BLOCK: tl.constexpr, DT: tl.constexpr):
    """out[t] = sum over k of round(y[t * TOP_K + k]) * rw[t * TOP_K + k], y = the sum of the KS partials
    [KS, pairs, N] (float32; partials and k in order: deterministic), rounded to out's dtype."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        pair = t * TOP_K + k
        y = tl.zeros((BLOCK,), dtype=tl.float32)
        for ks in tl.static_range(KS):
            y += tl.load(part_ptr + (ks * pairs + pair).to(tl.int64) * N + offs, mask=mask, other=0.0)
        acc += y.to(DT).to(tl.float32) * tl.load(rw_ptr + pair).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * N + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
