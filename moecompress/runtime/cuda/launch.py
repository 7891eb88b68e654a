"""One launch per (projection, bit-width) group: tile shapes per path and the kernel call.

`Config` gives packed_kernel's tile: BN output columns per program, BK values of K per step, warps and pipeline
stages. DECODE and PREFILL (PREFILL_TALL for row blocks of 256) are the defaults of the routing-table paths
(kernel_registry.py lists them under ("cuda", bits, path)); PAIR_* set the pair path (decode.py) that layers of
packed groups take up to PAIR_TOKENS tokens per call; eval/bench_gpu.py sweeps them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from moecompress.errors import MoecompressError
from moecompress.runtime.cuda.routing import Tables


@dataclass(frozen=True)
class Config:
    block_n: int  # BN: output columns per program
    block_k: int  # BK: values of K per step (a multiple of 32)
    num_warps: int = 4
    num_stages: int = 3


# decode: BM 16 (tl.dot's smallest M), narrow column tiles so that the few hit experts still fill the GPU. On an
# H200 (eval/bench_gpu.py --sweeps adopt, session 21) 64 x 128 beat 32 x 256 on the tables path by 22-48 % in 7 of
# 8 shapes but was 2.8 % slower on Qwen3-30B-A3B mix at 4 tokens (0.25 rows per expert): DECODE keeps 32 x 256, and
# DECODE_DENSE (64 x 128) serves the layers above PAIR_MAX_MEAN_ROWS rows per expert (Mixtral at 16 tokens: 1.16 /
# 0.99 ms mix / 4-bit against 1.99 / 1.29 on the pair path)
def _env_tile(default: str) -> Config:
    """MOECOMPRESS_DECODE_TILE="BNxBK" (e.g. 64x128): another decode tile without editing this file (benchmarks,
    tests of a candidate default); an unreadable value is an error, not a silent default."""
    text = os.environ.get("MOECOMPRESS_DECODE_TILE", default)
    try:
        block_n, block_k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise MoecompressError(f"MOECOMPRESS_DECODE_TILE={text!r}: expected BNxBK, e.g. 64x128") from None
    return Config(block_n, block_k)


DECODE = {bits: _env_tile("32x256") for bits in (2, 3, 4, 8, 16)}
DECODE_DENSE = {bits: Config(64, 128) for bits in (2, 3, 4, 8, 16)}
# prefill tiles, from eval/bench_gpu.py's prefill sweep on an H200 (eval/results/gpu.md): for row blocks up to 128
# (Qwen3-30B-A3B) 256 x 128 with the gate fused (PREFILL_GATED: 128 gate + 128 up columns per program; session 22:
# 1.67 / 1.46 ms mix / 4-bit eager, against 1.76 / 1.63 for 128 x 128 unfused), for blocks of 256 rows (Mixtral)
# 128 x 64 unfused (6.48 ms 4-bit; gated 6.94, 256 x 64 gated 16.9: too many registers at 256 rows)
PREFILL = {**{bits: Config(256, 128, num_warps=8) for bits in (2, 3, 4, 8)},
           16: Config(128, 128, num_warps=8)}  # bf16 groups: 256 x 128 needs 288 KB of shared memory
PREFILL_TALL = {bits: Config(128, 64, num_warps=8) for bits in (2, 3, 4, 8, 16)}
# packed_kernel's prefill with SiLU(gate) * up fused into the first projection (layers whose gate is that): for row
# blocks up to 128 (PREFILL) and of 256 (PREFILL_TALL)
PREFILL_GATED = os.environ.get("MOECOMPRESS_PREFILL_GATED", "1") != "0"
PREFILL_TALL_GATED = os.environ.get("MOECOMPRESS_PREFILL_TALL_GATED", "0") == "1"
# Hopper prefill (hopper.py: wgmma with the dequantized weights as the register operand): on sm90 GPUs where Gluon
# imports, for packed groups without bias, K % 128 == 0 and group_size % 32 == 0; row blocks of at most
# HOPPER_MAX_ROWS; HOPPER: tile rows per wgmma tile (BNT, two tiles per program), warps, cp.async stages (>= 3).
# H200, 2048 tokens, graph-replayed (eval/bench_gpu.py --sweeps hopper, session 23): packed_kernel -> this, µs,
# Qwen3-30B-A3B mix / 4-bit 1450 / 1249 -> 1259 / 990, Mixtral-8x7B 7546 / 6257 -> 6026 / 4389 (3 stages: within
# 2 %; blocks of 64 rows: 1-40 % slower). MOECOMPRESS_HOPPER_PREFILL=0: packed_kernel everywhere
HOPPER_PREFILL = os.environ.get("MOECOMPRESS_HOPPER_PREFILL", "1") != "0"
HOPPER = Config(128, 128, num_warps=8, num_stages=4)  # 8 bits: 3 stages (4 do not fit in shared memory)
# hopper.py's dequantization: q or'ed into 1.0's mantissa, then one fma (2 ops a value; same values bit for bit);
# MOECOMPRESS_HOPPER_MANTISSA=0: the magic-number form (shift, mask, or, add, fma). Offline (ptxas, sm90a): loop
# 866 -> 576 instructions at 3 bits, 815 -> 557 at 4. H200, 2048 tokens, graph µs (session 23, gpu2; with int32
# scale/word offsets: eval/results/gpu_hopper_mantissa.md), Qwen3-30B-A3B mix / 4-bit, Mixtral-8x7B mix / 4-bit:
# magic 1192 / 971 / 5545 / 4301, mantissa 1098 / 881 / 4765 / 3660 (before both: 1259 / 990 / 6026 / 4389)
HOPPER_MANTISSA = os.environ.get("MOECOMPRESS_HOPPER_MANTISSA", "1") != "0"
# Tried in session 24 and removed (eval/results/gpu_hopper_split.md): ptxas reuses a wgmma's register operand for the
# other tile's dequantization right after the issue and so waits for that wgmma (SASS: WARPGROUP.DEPBAR right after
# the HGMMAs; tensor cores and dequantization take turns). Each tile's wgmma in two halves of the row block (the
# second after the other tile's dequantization) kept the operand live and interleaved them in the SASS, but measured
# slower on an H200: 1110 / 882 / 4810 / 3680 -> 1120 / 909 / 5080 / 4040 µs (64-column wgmmas; 32-108 B spills)
HOPPER_MAX_ROWS = 128
GEMV = Config(32, 128)  # one token per call: gemv_kernel (CUDA cores, no shared memory)
GEMV_ENABLED = True
DECODE_ROWS = 16  # BM of the decode path: tokens per call up to which each expert's rows are one block
PREFILL_MAX_ROWS = 256  # largest BM of the prefill path (prefill_rows: 128-256 beat 64 on an H200: gpu.md)


PAIR_BLOCK_N = 16  # decode.pair_kernel: output columns per program (one step = one quantization group)
PAIR_WARPS = 2  # with BN 16 and 4 groups per program: the fastest in eval/bench_gpu.py's sweep on an H200
PAIR_GROUPS_PER_PROGRAM = 4  # quantization groups per program of the pair path (split K; launch.split_k)
PAIR_ASM = os.environ.get("MOECOMPRESS_PAIR_ASM", "1") != "0"  # one lop3 (inline PTX) per value; 0: plain ops
PAIR_TOKENS = 16  # tokens per call up to which eligible layers run decode.pair_kernel (experts.pair_supported)
# ... and pairs per expert (tokens * top_k / experts) up to which; above, every expert's rows are one block of the
# routing-table path with the DECODE_DENSE tile (its packed bytes read once, not once per pair: few large experts,
# e.g. Mixtral at 16 tokens). Measured on an H200 (session 21, --sweeps adopt): no slower on any of 8 decode shapes
# (worst 1.005x), 0.58x / 0.77x of the pair path's time for Mixtral at 16 tokens mix / 4-bit
PAIR_MAX_MEAN_ROWS = float(os.environ.get("MOECOMPRESS_PAIR_MAX_MEAN_ROWS", "2"))
# ... and only where the pair path's extra reads (each pair reads its expert's packed bytes: (pairs - experts) x the
# bytes of one expert more than the tables path) reach PAIR_DENSE_MIN_BYTES: below, the layer is launch-bound and the
# pair path's 4 launches beat the tables path's 10-14. H200, refmoe-qwen3 (16 experts of 256 x 128, 2.0-2.6 MB of
# extra reads) at 16 rows, whole CUDA-graph step (eval/bench_gpu_trace.py, session 26): 1.190 -> 1.027 ms mix, 1.095 ->
# 1.009 ms 4-bit; Mixtral-8x7B at 16 tokens (1.6 GB of extra reads) keeps the tables path (0.58x / 0.77x of the
# pair path's time, session 21). 32 MB lies between the two, not a measured crossover. 0: rows alone (sessions 21-25)
PAIR_DENSE_MIN_BYTES = float(os.environ.get("MOECOMPRESS_PAIR_DENSE_MIN_BYTES", "32e6"))
# the tables path of a dense decode layer computes SiLU(gate) * up in its first projection (packed_kernel GATED, as
# the prefill path does) instead of the model's gate in torch after it. Session 26, refmoe-qwen3 at 16 rows on the
# tables path: 1.193 -> 1.172 ms (mix), 1.100 -> 1.069 (4-bit) per step; not measured where the tables path is the
# default now (Mixtral): off, MOECOMPRESS_DECODE_GATED=1 on
DECODE_GATED = os.environ.get("MOECOMPRESS_DECODE_GATED", "0") == "1"


def dense_decode(pairs: int, experts: int, expert_bytes: float) -> bool:
    """Whether a call of `pairs` (token, expert) pairs over a layer of `experts` experts of `expert_bytes` packed
    bytes each takes the routing-table path (each hit expert's bytes read once) rather than the pair path (once per
    pair): above PAIR_MAX_MEAN_ROWS pairs per expert, when the pair path's extra reads reach PAIR_DENSE_MIN_BYTES."""
    return pairs > PAIR_MAX_MEAN_ROWS * experts and (pairs - experts) * expert_bytes >= PAIR_DENSE_MIN_BYTES


def values_per_unit(bits: int) -> tuple[int, int]:
    """(values, words) of one unit of the packing: 32 values in 3 words at 3 bits, else one word of 32/bits."""
    if bits == 16:
        return 1, 1
    return (32, 3) if bits == 3 else (32 // bits, 1)


def prefill_rows(pairs: int, positions: int, max_rows: int | None = None) -> int:
    """BM of the prefill path from the mean rows per position: small tiles when experts get few rows."""
    mean = pairs / max(1, positions)
    return min(max_rows or PREFILL_MAX_ROWS, 16 if mean < 24 else 32 if mean < 48 else 64 if mean < 96
               else 128 if mean < 192 else 256)


def config_for(path: str, bits: int, block_rows: int, dense: bool = False) -> Config:
    """The tile of a routing-table path: DECODE (DECODE_DENSE for layers above PAIR_MAX_MEAN_ROWS rows per expert),
    PREFILL, or PREFILL_TALL for row blocks of 256."""
    if path == "decode":
        return (DECODE_DENSE if dense else DECODE)[bits]
    return (PREFILL_TALL if block_rows >= 256 else PREFILL)[bits]


def run(group, x: torch.Tensor, tables: Tables, pos0: int, grid_m: int, out: torch.Tensor, row_div: int,
        config: Config, routing_weights: torch.Tensor | None = None, with_bias: bool = True,
        gemv: bool = False, gated: bool = False) -> None:
    """Compute `group`'s rows of `tables` into `out` (rows indexed by pair): out[pair] = x[pair // row_div] @ W.T
    (+ the expert's bias when with_bias), times routing_weights[pair] when given (out float32 then). gemv: every
    block is one row (one token per call): gemv_kernel with the GEMV tile (packed groups). gated (packed groups, no
    bias, no weights): out[pair] = SiLU(gate) * up of the two halves of W's output, block_n / 2 columns of each."""
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
    args = [x, q, s, z, bias if bias is not None else out, routing_weights if routing_weights is not None else out,
            out, tables.order, tables.blocks, tables.first, pos0, n_slots, tables.blocks.shape[0], row_div, N, K,
            groups, x.stride(0), out.stride(0), q.stride(0), q.stride(1)]
    dynamic = (0, 5, 6, 7, 8, 9) if bias is not None else (0, 4, 5, 6, 7, 8, 9)  # the tensors of this call
    common = dict(BITS=group.bits, SYMMETRIC=bool(group.symmetric), HAS_BIAS=bias is not None,
                  WEIGHTED=routing_weights is not None, VPW=vpw, UNIT=unit)
    if gemv and group.bits != 16:
        config = GEMV
        grid = (max(1, grid_m), -(-N // config.block_n))
        _call(group, gemv_kernel, grid, args, dynamic, dict(common, GS=group.group_size, BN=config.block_n,
                                                           BK=config.block_k), config)
        return
    block_n = config.block_n // 2 if gated else config.block_n
    grid = (max(1, grid_m), -(-(N // 2 if gated else N) // block_n))
    fits = (group.bits, tables.block_rows, config, gated)
    stages = min(config.num_stages, _STAGES_THAT_FIT.get(fits, config.num_stages))
    constexprs = dict(common, GS=group.group_size if group.bits != 16 else 1, BM=tables.block_rows, BN=block_n,
                      BK=config.block_k, GATED=gated)
    while True:
        try:
            _call(group, packed_kernel, grid, args, dynamic, constexprs, replace(config, num_stages=stages))
            return
        except Exception as exc:  # noqa: BLE001 (Triton's OutOfResources, raised before launching: fewer stages)
            if type(exc).__name__ != "OutOfResources" or stages <= 1:
                raise
            stages -= 1
            _STAGES_THAT_FIT[fits] = stages


_STAGES_THAT_FIT: dict = {}  # (bits, BM, tile, gated) -> pipeline stages, where a tile's did not fit in shared memory
FAST_TABLES = os.environ.get("MOECOMPRESS_FAST_TABLES", "1") != "0"  # 0: every routing-table launch via Triton


def _call(group, kernel, grid, args: list, dynamic: tuple[int, ...], constexprs: dict, config: Config) -> None:
    """kernel[grid](*args, **constexprs) through a Launcher cached on the group (launcher.py: after the first call
    the compiled kernel is called directly, without Triton's per-call binding of ~20 arguments); args at `dynamic`
    positions (this call's tensors) change per call. Its host-time gain was not separable from the H200 host's
    run-to-run differences (session 22)."""
    if not FAST_TABLES:
        kernel[grid](*args, **constexprs, num_warps=config.num_warps, num_stages=config.num_stages)
        return
    from moecompress.runtime.cuda.launcher import Launcher

    static = tuple(None if i in dynamic else a.data_ptr() if isinstance(a, torch.Tensor) else a
                   for i, a in enumerate(args))
    key = (id(kernel), grid, static, tuple(constexprs.items()), config.num_warps, config.num_stages)
    cache = group.__dict__.setdefault("_cuda_launchers", {})
    launcher = cache.get(key)
    if launcher is None:
        if len(cache) >= 64:  # many shapes (prompt lengths): start over rather than grow
            cache.clear()
        launcher = cache[key] = Launcher(kernel, grid, [None if i in dynamic else a for i, a in enumerate(args)],
                                         dynamic, constexprs, config.num_warps, config.num_stages)
    launcher(*[args[i] for i in dynamic])


def hopper_device(device) -> bool:
    """Whether the Hopper prefill kernel can run on `device` (sm90, Gluon importable, HOPPER_PREFILL)."""
    if not HOPPER_PREFILL or torch.cuda.get_device_capability(device) != (9, 0):
        return False
    return _gluon_imports()


def _gluon_imports() -> bool:
    global _GLUON
    if _GLUON is None:
        try:
            from moecompress.runtime.cuda import hopper  # noqa: F401
            _GLUON = True
        except Exception:  # noqa: BLE001 (no Gluon in this Triton: packed_kernel serves)
            _GLUON = False
    return _GLUON


_GLUON = None


def hopper_group(group) -> bool:
    """Whether a group's prefill launch can take hopper.wgmma_kernel (given hopper_device): packed, no bias."""
    return (group.bits in (2, 3, 4, 8) and getattr(group, "bias", None) is None and group.in_features % 128 == 0
            and group.group_size % 32 == 0)


# split K of the down projection on hopper.wgmma_kernel (hopper_split_k). H200, 2048 tokens, graph µs (session 24,
# eval/results/gpu.md): Mixtral-8x7B mix 4767 -> 4456 (its 2- and 4-bit groups of 2 experts: 16 x ~10 programs of
# 112 steps on 132 SMs), 4-bit 3709 -> 3715 and Qwen3-30B-A3B (K 768) not split. MOECOMPRESS_HOPPER_SPLIT_K=0: off
HOPPER_SPLIT_K = os.environ.get("MOECOMPRESS_HOPPER_SPLIT_K", "1") != "0"


def hopper_split_k(group, pairs: int, num_experts: int, block_rows: int, device) -> int:
    """Splits of K for a weighted (down) projection on hopper.wgmma_kernel: few long programs (Mixtral's down: K
    14336 = 112 steps, ~10-20 row blocks per bit-width group, 16 column programs) leave the last wave of one
    program per SM nearly empty (split_k_for). Programs estimated from the group's share of the pairs (the tables
    are on the device)."""
    steps = group.in_features // 128
    if not HOPPER_SPLIT_K or steps < 16:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    blocks = len(group.experts) + pairs * len(group.experts) / max(1, num_experts) / block_rows
    return split_k_for(int(blocks + 0.5) * -(-group.out_features // (2 * HOPPER.block_n)), steps, sms,
                       group.group_size)


def split_k_for(programs: int, steps: int, sms: int, group_size: int) -> int:
    """hopper_split_k's rule: S (1-4: the output has S copies, zeroed and summed) with the fewest program-steps per
    SM, ceil(programs * S / sms) * ceil(steps / S), at least 8 steps per split, each split's start a whole group;
    1 unless it saves >= 10 %."""
    cost = {s: -(-programs * s // sms) * -(-steps // s) for s in range(1, 5)
            if steps // s >= 8 and (-(-steps // s) * 128) % group_size == 0}
    best = min(cost, key=lambda s: (cost[s], s))
    return best if cost[best] <= 0.9 * cost[1] else 1


def run_hopper(group, x_perm: torch.Tensor, tables: Tables, pos0: int, grid_m: int, out: torch.Tensor, row_div: int,
               routing_weights: torch.Tensor | None = None, gated: bool = False, config: Config | None = None,
               split_k: int = 1) -> None:
    """launch.run's prefill for one packed group on sm90 (hopper.wgmma_kernel): x_perm = hopper.permute_k(x).
    split_k > 1 (weighted, not gated): split k of K adds into out[k * rows:], out [split_k * rows, N] (summed by the
    caller)."""
    from moecompress.runtime.cuda import hopper

    config = config or HOPPER
    n_slots, N, K = len(group.experts), group.out_features, group.in_features
    q = group.qweight.view(torch.int32)
    s = group.scales
    z = s if group.symmetric else group.zeros
    rw = routing_weights if routing_weights is not None else out
    args = [x_perm, q, s, z, rw, out, tables.order, tables.blocks, tables.first, pos0, n_slots,
            tables.blocks.shape[0], row_div, N, K, s.shape[-1], x_perm.stride(0), out.stride(0), q.stride(0),
            q.stride(1), -(-(K // 128) // split_k), out.shape[0] // split_k * out.stride(0)]
    bnt = config.block_n
    grid = (max(1, grid_m), -(-(N // 2) // bnt) if gated else -(-N // (2 * bnt)), split_k)
    constexprs = dict(BITS=group.bits, GS=group.group_size, SYMMETRIC=bool(group.symmetric),
                      WEIGHTED=routing_weights is not None, GATED=gated, BM=tables.block_rows,
                      NUM_STAGES=config.num_stages, MANTISSA=HOPPER_MANTISSA,
                      **hopper.layouts(bnt, tables.block_rows, config.num_warps, group.bits))
    fits = ("hopper", group.bits, tables.block_rows, config)
    stages = min(config.num_stages, _STAGES_THAT_FIT.get(fits, config.num_stages))
    while True:  # 3 stages at least (the kernel waits for step i + 1 while step i's second wgmma runs)
        try:
            _call(group, hopper.wgmma_kernel, grid, args, (0, 4, 5, 6, 7, 8), dict(constexprs, NUM_STAGES=stages),
                  replace(config, num_stages=stages))
            return
        except Exception as exc:  # noqa: BLE001 (OutOfResources: x and the words of 3-4 stages, 8 bits)
            if type(exc).__name__ != "OutOfResources" or stages <= 3:
                raise
            stages -= 1
            _STAGES_THAT_FIT[fits] = stages


def split_k(groups: int) -> int:
    """Splits of K for the pair path: about PAIR_GROUPS_PER_PROGRAM quantization groups per program."""
    ks = max(1, groups // PAIR_GROUPS_PER_PROGRAM)
    while groups % ks:
        ks -= 1
    return ks


# Prefill of few large experts by dequantize-then-GEMM (dequant.py, session 27): every expert's weights dequantized
# once into a bf16 scratch, then torch._grouped_mm, instead of hopper.py's one dequantization per row block of at most
# 128 rows. Taken where the mean rows per computed expert reach PREFILL_DEQUANT_MIN_ROWS and the layer's mean bits per
# weight are at most PREFILL_DEQUANT_MAX_BITS (prefill_dequant). H200, one Mixtral-8x7B layer, graph µs, fused ->
# dequant (eval/results/gpu_prefill_s27.md): 2,048 tokens (512 rows per expert) mix 2/3/4 (3.0 bits) 4772 -> 4255,
# 4-bit 4125 -> 4345; mix at 1,024 tokens (256 rows) 2885 -> 3108, 512 tokens 1865 -> 2724; Qwen3-30B-A3B mix at 2,048
# (128 rows) 1126 -> 1840. The only measured gain is the first; 512 rows and 3.5 bits bound it, neither is a measured
# crossover. Costs +1.9 GB of transient scratch on Mixtral. MOECOMPRESS_PREFILL_DEQUANT=0: the fused kernels always
PREFILL_DEQUANT = os.environ.get("MOECOMPRESS_PREFILL_DEQUANT", "1") != "0"
PREFILL_DEQUANT_MIN_ROWS = float(os.environ.get("MOECOMPRESS_PREFILL_DEQUANT_MIN_ROWS", "512"))
PREFILL_DEQUANT_MAX_BITS = float(os.environ.get("MOECOMPRESS_PREFILL_DEQUANT_MAX_BITS", "3.5"))


def prefill_dequant(pairs: int, positions: int, mean_bits: float) -> bool:
    """Whether a prefill call of `pairs` (token, expert) pairs over `positions` computed experts whose weights have
    `mean_bits` bits on average (bf16 groups: 16) takes dequant.py: pairs / positions >= PREFILL_DEQUANT_MIN_ROWS and
    mean_bits <= PREFILL_DEQUANT_MAX_BITS, where PREFILL_DEQUANT."""
    return (PREFILL_DEQUANT and pairs >= PREFILL_DEQUANT_MIN_ROWS * max(1, positions)
            and mean_bits <= PREFILL_DEQUANT_MAX_BITS)
