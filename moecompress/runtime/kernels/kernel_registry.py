"""Which kernel computes a packed group on CPU or CUDA: one plain dict keyed by (ISA, bits, path), looked up, never branched.

`path` is `decode` (few rows per expert; PackedGroup sends slots with fewer than PREFILL_MIN_ROWS rows there) or
`prefill` (many rows). Each key lists kernels best first; `select` takes the first one that is built here and
supports the group's shapes, and walks down to the next ISA (cpu_features.ISA_ORDER) when none does. The ISA to
start from is the CPU's best, read at run time (cpu_features.best_isa; MOECOMPRESS_CPU_ISA forces a lower one), or
`cuda` for a group on a CUDA device.

| ISA              | 2/3/8-bit decode        | 2/3/8-bit prefill        | 4-bit decode            | 4-bit prefill            |
|------------------|-------------------------|--------------------------|-------------------------|--------------------------|
| cpu:amx          | q8_avx512_vnni          | packed_amx (fused AMX)   | q8_avx512_vnni          | packed_amx (fused AMX)***|
| cpu:avx512_vnni  | q8_avx512_vnni          | tile_mm_avx2             | q8_avx512_vnni          | tile_mm_avx2             |
| cpu:avx2         | q8_avx2                 | q8_avx2**, tile_mm_avx2  | q8_avx2                 | q8_avx2**, tile_mm_avx2  |
| cpu:neon_dotprod | q8_neon_dotprod         | tile_mm_portable         | q8_neon_dotprod         | tile_mm_portable         |
| cpu:portable     | q8_portable             | tile_mm_portable         | q8_portable             | tile_mm_portable         |
| cpu:torch        | dequant (torch ops)     | dequant                  | int4, else dequant      | int4, else dequant       |
| cuda             | triton_decode           | triton_prefill           | triton_decode           | triton_prefill           |

cuda: the Triton kernels of runtime/cuda/ (bf16 / float16 x; the format's packing read as it is, no repack); whole
MoE layers on CUDA run them from PackedExperts.forward with device-side routing (runtime/cuda/experts.py), this
entry serves PackedGroup.linear. Without Triton or for other shapes: dequant.

q8_*: int8 activations x low-bit weights, integer dot products (cpu_lowbit.decode; on the prefill path
cpu_lowbit.prefill_q8, a register-blocked GEMM of the same integers for slots of many rows); used for bfloat16 / float16
activations, while float32 activations take the exact tile_mm kernel on both paths unless
MOECOMPRESS_INT8_ACTIVATIONS=always (e.g. a float32 model on an AVX2-only CPU, for speed). tile_mm_*: dequantized tiles of
128 weight rows + at::mm, in float32, or bf16 where the CPU computes bf16 natively (cpu_lowbit.prefill,
cpu_features.compute_dtype). q8_neon_dotprod is tested under qemu-user only (tests/test_cpu_neon.py); ARM64 without
dotprod takes the portable kernels. int4: 4-bit groups converted at load to PyTorch's int4 layout (`layout="int4"`, what
PackedGroup.prepare looks for) on the cpu:torch ISA only; the AMX kernels are cpu_kernels.py's. On AMX CPUs 4-bit
groups keep the format's packing like the other widths (session 24, Xeon Emerald Rapids, 2 threads, model (b) of
eval/bench_cpu.py at 4 bits: the int4 layout's decode ran 107 tok/s through transformers, since the whole-model C++
step takes packed groups only; packed with q8_avx512_vnni in that step 333 tok/s; 4-bit prefill through packed_amx
not measured there, 2-bit through it 1940 tok/s against 1635 for the int4 layout at 4 bits). **bf16 / float16 x and in_features >= Q8_PREFILL_MIN_IN, else the tiles.
float32 x on AMX CPUs: the avx512_vnni row. ***Dense (one-expert) 4-bit groups with MOECOMPRESS_AMX_DENSE_INT4=1:
int4_amx_dense, an int4 prefill copy beside the packed form (AMX_DENSE_INT4_ENV). 16-bit groups are plain matmuls and never looked up
(unquantized bf16 / float16 models on CPUs without native bf16 prefill through experts/cpu_prefill16.py's GEMM).

A whole MoE layer of at most cpu_moe.FUSED_MAX_TOKENS tokens (decode steps) runs in one C++ call (cpu_moe.py) when
every group of its two projections takes a q8_* decode kernel here (all of one ISA) and the gate is the default
SiLU one: the same kernels, with the routing, the activation and the weighted sum in C++ too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable

import torch

from moecompress.errors import MoecompressError
from moecompress.format.pack import unpack
from moecompress.runtime.kernels import cpu_features, cpu_int4, cpu_kernels, cpu_lowbit
from moecompress.runtime import cuda

PATHS = ("decode", "prefill")
# Rows per expert from which the prefill kernels beat q8 decode, Qwen3-30B-A3B expert shapes, group 128, 2 threads,
# Xeon (Sapphire Rapids), eval/bench_kernels.py: tiles + GEMM between 32 and 64 rows (4-bit, ms per expert, q8 /
# tiles: gate_up 1.14 / 1.88 at 32 rows, 2.45 / 1.79 at 64; down 0.71 / 1.00 at 32, 1.66 / 0.81 at 64; with the
# AVX2 kernels down 1.25 / 1.09 at 32); packed_amx already at 4-8 rows.
TILE_MIN_ROWS = 48
# On AVX2 without VNNI the int8 decode kernel stays ahead of the tiles + float32 GEMM up to about 128 rows per expert
# (AMD EPYC Zen 3, 1 thread, gate_up 1536 x 2048 and 2048 x 4096, 2/4/8-bit: tiles / int8 time 1.0-1.9 at 32-64
# rows, 0.84-1.29 at 128, mixed above: `eval/bench_kernels.py --threads 1 --paths decode prefill --rows 32 64 128 256`).
TILE_MIN_ROWS_AVX2 = 128
# ISAs whose prefill path (bf16 / float16 x) runs the q8 kernels at every row count, before the tiles: on AVX2 without
# VNNI the int8 kernel beats dequantized tiles + at::mm at 32-512 rows per expert (AMD EPYC Zen 3, 1 thread, bf16 x,
# group 128, GFLOP/s q8 / best tile: 4-bit q_proj 4096 x 2048 at 512 rows 76 / 57, 8 experts of 1536 x 2048 at 32
# rows 96 / 43, 2-bit 106-117 / 44-66, 8-bit 44-76 / 35-66; torch's own float32 mm reaches 21-70 here).
# The prefill calls take the register-blocked GEMM (cpu_lowbit.prefill_q8, csrc/lowbit/gemm.h) for slots of 8 rows
# and more (session 23): at in_features 256 / 128 (refmoe-qwen3) it reaches 58-120 GFLOP/s against 12-69 for the
# decode kernel and 41-54 for the tiles (1 thread, CPU time, 128 rows), at 768 / 2048 it ties or beats the decode
# kernel (0.91-1.86x). So every in_features from Q8_PREFILL_MIN_IN (0: all) takes it.
Q8_PREFILL_ISAS = ("cpu:avx2",)
Q8_PREFILL_MIN_IN = 0
# ... except the projections of wide layers at 2 / 4 bits, where the GEMM only ties the decode kernel (1536 x 2048 at
# 32 rows: 2-bit 107 vs 118, 4-bit 61 vs 63 GFLOP/s) and a 512-token prefill of the 30B-dims model at 4 bits took 8 %
# more CPU time with it (2031 vs 1878 ms, loaded): there the q8 prefill kernel calls the decode kernels.
Q8_GEMM_MAX_IN = 1024
AMX_MIN_ROWS = 6
# 4-bit dense projections (one-expert groups: attention, a shared expert) on AMX CPUs: a prefill copy in the blocked
# int4 layout for the fused int4 kernel (cpu_kernels.int4_mm, the one the int4 layout ran before session 24's fix),
# while the format's packing stays for the decode kernels and the C++ decode step. It costs a second copy of those
# weights (+3.6 % of a 2-bit model (b) checkpoint). Measured (session 26, Emerald Rapids, 2 threads, 512 rows,
# eval/results/cpu_amx_prefill_s26.md): 1.1-2.2x faster per projection (q_proj 4096 x 2048 7.8 vs 13.5 ms), the dense
# projections' share of a model (b) prefill 12-26 % less, the whole prefill only 1.4-7.6 % faster (experts: ~70 % of it).
# "1": on; "0" (default): packed_amx (the copy's memory for a few per cent of prefill).
AMX_DENSE_INT4_ENV = "MOECOMPRESS_AMX_DENSE_INT4"
# int8 activations (the q8 kernels): "auto" for bfloat16 / float16 x only, so that float32 models stay exact up to
# summation order (what the end-to-end tests hold them to); "always" also for float32 x; "never".
INT8_ACTIVATIONS_ENV = "MOECOMPRESS_INT8_ACTIVATIONS"


@dataclass(frozen=True)
class Kernel:
    name: str
    layout: str  # "packed": the format's packing; "int4": PyTorch's int4 layout, converted once at load
    run: Callable  # (group: PackedGroup, x [R, in], slots, counts) -> [R, out] in x's dtype
    available: Callable[[], bool]  # built / usable in this process
    supports: Callable  # (group, dtype) -> bool: the group's shapes and x's dtype fit
    min_rows: int = 0  # prefill kernels: rows per expert from which they beat the decode kernels (measured)
    prepare: Callable | None = None  # (group, compute_dtype) -> None: load-time work (PackedGroup.prepare calls it)


def _lowbit_shapes(group, dtype: torch.dtype) -> bool:
    return (group.group_size % 32 == 0 and group.in_features % group.group_size == 0 and group.scales.device.type == "cpu"
            and group.scales.dtype == torch.float16 and dtype in (torch.float32, torch.bfloat16, torch.float16))


def _q8_shapes(group, dtype: torch.dtype) -> bool:
    mode = os.environ.get(INT8_ACTIVATIONS_ENV, "auto")
    wanted = {"auto": dtype != torch.float32, "always": True, "never": False}.get(mode)
    if wanted is None:
        raise MoecompressError(f"{INT8_ACTIVATIONS_ENV}={mode!r}; allowed: auto, always, never")
    return wanted and _lowbit_shapes(group, dtype)


def _zeros(group):
    return None if group.symmetric else group.zeros


def _q8(isa: str) -> Kernel:
    def run(group, x, slots, counts):
        return cpu_lowbit.decode(x, group.qweight, group.scales, _zeros(group), group.bits, group.group_size, slots,
                                 counts, isa)

    return Kernel(f"q8_{isa.removeprefix('cpu:')}", "packed", run, cpu_lowbit.available, _q8_shapes)


def _tile_mm(isa: str, name: str, min_rows: int = TILE_MIN_ROWS) -> Kernel:
    def run(group, x, slots, counts):
        dtype = torch.float32 if x.dtype == torch.float32 else cpu_features.compute_dtype()
        return cpu_lowbit.prefill(x, group.qweight, group.scales, _zeros(group), group.bits, group.group_size, slots,
                                  counts, isa, dtype)

    return Kernel(name, "packed", run, cpu_lowbit.available, _lowbit_shapes, min_rows)


def _packed_amx_run(group, x, slots, counts):
    return cpu_kernels.packed_mm(x, group.qweight, group.scales, _zeros(group), group.bits, group.group_size, slots, counts)


def _packed_amx_shapes(group, dtype: torch.dtype) -> bool:
    return (dtype == torch.bfloat16 and group.scales.device.type == "cpu" and group.out_features % 64 == 0
            and group.group_size % 32 == 0 and group.in_features % group.group_size == 0
            and group.scales.dtype == torch.float16)


PACKED_AMX = Kernel("packed_amx", "packed", _packed_amx_run, lambda: cpu_kernels.amx(), _packed_amx_shapes, AMX_MIN_ROWS)


def amx_dense_int4() -> bool:
    value = os.environ.get(AMX_DENSE_INT4_ENV, "0")
    if value not in ("0", "1"):
        raise MoecompressError(f"{AMX_DENSE_INT4_ENV}={value!r}; allowed: 0 (packed_amx), 1 (the int4 prefill copy)")
    return value == "1"


def int4_copy(group, compute_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-bit group's prefill copy in the blocked int4 layout, made once (non-persistent buffers: state_dict keeps
    the format's tensors only): packed uint8 [n, out, in/2] (64-row blocks), sz bf16 [n, in/g, out, 2]."""
    if "int4_copy_weight" not in group._buffers:
        q = unpack(group.qweight, 4, group.in_features)  # [n, out, in]
        group.register_buffer("int4_copy_weight", cpu_int4.pack_blocked(q, 64), persistent=False)
        group.register_buffer("int4_copy_sz", cpu_int4.scales_and_zeros(group.scales, _zeros(group), torch.bfloat16),
                              persistent=False)
    return group.int4_copy_weight, group.int4_copy_sz


def _int4_dense_run(group, x, slots, counts):
    packed, sz = int4_copy(group)
    return cpu_kernels.int4_mm(x, packed, sz, slots, counts, 64, group.group_size)


def _int4_dense_shapes(group, dtype: torch.dtype) -> bool:
    return (amx_dense_int4() and group.bits == 4 and len(group.experts) == 1 and dtype == torch.bfloat16
            and group.out_features % 64 == 0 and group.in_features % 32 == 0 and _lowbit_shapes(group, dtype))


INT4_DENSE = Kernel("int4_amx_dense", "packed", _int4_dense_run, lambda: cpu_kernels.amx(), _int4_dense_shapes,
                    AMX_MIN_ROWS, prepare=lambda group, dtype: int4_copy(group))


def _int4_run(group, x, slots, counts):
    """PyTorch's int4 layout: PackedGroup._int4_matmul picks per slot between PyTorch's int4 op (few rows) and the
    fused AMX kernel or dequantization (many rows), as before this registry."""
    per_slot = [0] * len(group.experts)  # _int4_matmul takes the rows of every slot of the group
    for s, c in zip(slots, counts):
        per_slot[s] = c
    return group._int4_matmul(x, slots, per_slot)


INT4 = Kernel("int4", "int4", _int4_run, cpu_int4.available,
              lambda group, dtype: group.bits == 4 and group.scales.device.type == "cpu")
DEQUANT = Kernel("dequant", "packed", lambda group, x, slots, counts: group._dequantized_matmul(x, slots, counts),
                 lambda: True, lambda group, dtype: True)

Q8 = {isa: _q8(isa) for isa in ("cpu:avx512_vnni", "cpu:avx2", "cpu:neon_dotprod", "cpu:portable")}
TILE_MM = {"cpu:avx512_vnni": _tile_mm("cpu:avx512_vnni", "tile_mm_avx2"),
           "cpu:avx2": _tile_mm("cpu:avx2", "tile_mm_avx2", TILE_MIN_ROWS_AVX2),
           "cpu:portable": _tile_mm("cpu:portable", "tile_mm_portable")}
TILE_MM["cpu:neon_dotprod"] = TILE_MM["cpu:portable"]  # no NEON dequantization: the portable tiles


def _q8_prefill(isa: str) -> Kernel:
    def run(group, x, slots, counts):
        if group.in_features > Q8_GEMM_MAX_IN and group.bits in (2, 4):
            return Q8[isa].run(group, x, slots, counts)
        return cpu_lowbit.prefill_q8(x, group.qweight, group.scales, _zeros(group), group.bits, group.group_size, slots,
                                     counts, isa)

    def supports(group, dtype):
        return group.in_features >= Q8_PREFILL_MIN_IN and _q8_shapes(group, dtype)

    return replace(Q8[isa], run=run, supports=supports)


Q8_PREFILL = {isa: _q8_prefill(isa) for isa in Q8_PREFILL_ISAS}

KERNELS: dict[tuple[str, int, str], tuple[Kernel, ...]] = {}
for _bits in (2, 3, 4, 8):
    # AMX CPUs have AVX-512 VNNI too: its int8 decode beats packed_amx at 1-4 rows (4x at 1 row, eval/bench_kernels.py)
    KERNELS[("cpu:amx", _bits, "decode")] = (Q8["cpu:avx512_vnni"], PACKED_AMX)
    KERNELS[("cpu:amx", _bits, "prefill")] = ((INT4_DENSE,) if _bits == 4 else ()) + (PACKED_AMX,)
    for _isa in Q8:
        KERNELS[(_isa, _bits, "decode")] = (Q8[_isa], TILE_MM[_isa])  # float32 x: the exact tiles
        KERNELS[(_isa, _bits, "prefill")] = ((Q8_PREFILL[_isa],) if _isa in Q8_PREFILL else ()) + (TILE_MM[_isa],)
    for _path in PATHS:
        KERNELS[("cpu:torch", _bits, _path)] = (INT4, DEQUANT) if _bits == 4 else (DEQUANT,)
del _bits, _path, _isa


def _cuda_kernel(path: str) -> Kernel:
    def run(group, x, slots, counts):
        from moecompress.runtime.cuda import experts

        return experts.linear_sorted(group, x, slots, counts, path)

    def supports(group, dtype):
        from moecompress.runtime.cuda import experts

        return experts.group_supported(group, dtype)

    return Kernel(f"triton_{path}", "packed", run, cuda.available, supports, 16 if path == "prefill" else 0)


CUDA = {path: _cuda_kernel(path) for path in PATHS}
for _bits in (2, 3, 4, 8):
    for _path in PATHS:
        KERNELS[("cuda", _bits, _path)] = (CUDA[_path],)
del _bits, _path


def settings() -> tuple:
    """The environment settings that change what `select` returns (callers caching a lookup key on them)."""
    return os.environ.get(cpu_features.ISA_ENV), os.environ.get(INT8_ACTIVATIONS_ENV), os.environ.get(AMX_DENSE_INT4_ENV)


def select(bits: int, path: str, group, dtype: torch.dtype, isa: str | None = None, layout: str | None = None) -> Kernel:
    """The kernel for a group of `bits` on `path` with x in `dtype`: the first one listed for the ISA (default: the
    CPU's best) that is available and supports the group (and reads `layout`, when given), else the same for the
    next ISA down."""
    isa = isa or ("cuda" if group.scales.device.type == "cuda" else cpu_features.best_isa())
    order = cpu_features.ISA_ORDER
    for candidate in order[order.index(isa):] if isa in order else (isa,):
        for kernel in KERNELS.get((candidate, bits, path), ()):
            if (layout is None or kernel.layout == layout) and kernel.available() and kernel.supports(group, dtype):
                return kernel
    return DEQUANT
