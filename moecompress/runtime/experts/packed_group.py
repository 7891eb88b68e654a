"""One (projection, bit-width) group of a MoE layer's experts, stored packed and computed from the packed form.

A group holds n experts (ids in `experts`) in the tensors the format names (see format/spec.py). A call gets the
rows of x sorted by slot (the expert's row in the stacked tensors) with the row count of every slot, and returns
their outputs in the same order:

- 16-bit: one grouped matmul over the stored bf16 weights.
- 2/3/4/8-bit on CPU: the kernels kernel_registry.py looks up for the CPU's ISA, bit-width and path: slots with
  fewer rows than the prefill kernel's measured crossover take the `decode` kernel (without AMX: int8 activations x packed weights), the
  others the `prefill` kernel (without AMX: dequantized tiles + GEMM), by runs of consecutive slots.
- 4-bit where the registry's kernel reads PyTorch's int4 layout (the cpu:torch ISA: no C++ compiler, or forced):
  converted once by `prepare()` (same size as our packed bytes). Slots with few rows (decode) run PyTorch's int4 kernel (its cost grows
  with the rows: it dequantizes per 4 rows); slots with more rows run our fused int4 x bf16 kernel where the CPU has
  AMX (`FUSED_MIN_ROWS`, cpu_kernels.py), else are dequantized from that layout, a chunk at a time, and run as
  grouped matmuls (`DEQUANT_MIN_ROWS`, or `FAST_DEQUANT_MIN_ROWS` with the one-pass C++ dequantization; whole groups
  of small experts at once).
- Elsewhere (other devices, no C++ compiler): the hit slots are dequantized, a chunk at a time, and run as one
  grouped matmul.

Dequantized weights live for one tile or chunk of one call: nothing beyond the packed form stays in memory.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F

from moecompress.format.pack import pack, unpack
from moecompress.runtime.kernels import cpu_int4, cpu_kernels, kernel_registry

# Rows per hit expert from which dequantize + bf16 matmul beats the int4 kernel: measured crossover 50-60 rows at
# Qwen3-30B-A3B expert shapes (2048 x 1536), 1 and 2 threads, AVX-512 + AMX (eval/results/runtime.md). Per-slot
# micro-benchmarks of cold experts put it at 64-96 rows, but 80 measured worse on model (b) prefill (0.56x vs 0.65x,
# eval/bench_runtime.py --models b --plans 4, loaded machine).
DEQUANT_MIN_ROWS = 56
# The same crossover when the one-pass C++ dequantization (cpu_kernels.py) is available for bf16 compute: measured
# 0.72x bf16 on model (b) prefill at 32 rows vs 0.58x with the torch-ops dequantization at 56
# (eval/bench_runtime.py --models b --plans 4, 2 threads).
FAST_DEQUANT_MIN_ROWS = 32
# Weights dequantized at once: bounds the transient memory of a call (16 MiB in float32), and stays under glibc's
# mmap threshold so that the buffers are reused between chunks instead of page-faulted in afresh.
DEQUANT_CHUNK = 1 << 22
# Rows per hit expert from which the fused AMX kernel (cpu_kernels.int4_mm) beats PyTorch's int4 kernel: measured
# crossover 4-6 rows at Qwen3-30B-A3B expert shapes (2048 x 1536 and 768 x 2048), 2 threads.
FUSED_MIN_ROWS = 6
# Rows per hit expert from which the registry's `prefill` kernel replaces its `decode` kernel (packed groups); None:
# the prefill kernel's own measured crossover (Kernel.min_rows).
PREFILL_MIN_ROWS: int | None = None


class PackedGroup(nn.Module):
    def __init__(
        self,
        experts: tuple[int, ...],
        bits: int,
        in_features: int,
        out_features: int,
        group_size: int,
        symmetric: bool,
        has_bias: bool,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.experts = tuple(experts)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.in_features, self.out_features = in_features, out_features
        n, kw = len(experts), dict(device=device)
        if bits == 16:
            self.register_buffer("weight", torch.empty(n, out_features, in_features, dtype=dtype, **kw))
        else:
            ngroups = in_features // group_size
            self.register_buffer("qweight", torch.empty(n, out_features, in_features * bits // 8, dtype=torch.uint8, **kw))
            self.register_buffer("scales", torch.empty(n, out_features, ngroups, dtype=torch.float16, **kw))
            if not symmetric:
                self.register_buffer("zeros", torch.empty(n, out_features, ngroups, dtype=torch.uint8, **kw))
        if has_bias:
            self.register_buffer("bias", torch.empty(n, out_features, dtype=dtype, **kw))
        self.slot = {e: i for i, e in enumerate(self.experts)}  # expert id -> row in the stacked tensors
        self._int4_block: int | None = None  # blocked layout of the int4 kernel, when unpack_blocked can read it
        self._kernel_cache: dict = {}  # (dtype, device type, registry settings) -> (decode, prefill) kernels

    @property
    def _int4(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...] | None:
        """(int4 packed [n, out, in/2], scales_and_zeros [n, in/g, out, 2]) once prepared (read by inspect)."""
        return ((self.int4_weight, self.int4_sz),) if "int4_weight" in self._buffers else None

    # -- kernels ---------------------------------------------------------------------------------------------------
    def prepare(self, compute_dtype: torch.dtype) -> None:
        """Convert 4-bit groups on CPU to the int4 kernel layout, dropping our packed copy (no duplicate in memory).
        Packed groups computing in bf16 on CPU build the C++ kernels now (once per machine), not in the first forward."""
        if self._int4 is not None or self.bits == 16 or len(self.experts) == 0 or self.qweight.device.type != "cpu":
            return
        # looking the kernels up builds the C++ modules they need, now rather than in the first forward
        kernels = [kernel_registry.select(self.bits, path, self, compute_dtype) for path in kernel_registry.PATHS]
        for kernel in kernels:
            if kernel.prepare is not None:  # e.g. a copy in another layout (kernel_registry.INT4_DENSE)
                kernel.prepare(self, compute_dtype)
        if "int4" not in {kernel.layout for kernel in kernels}:
            return
        if compute_dtype == torch.bfloat16:
            cpu_kernels.available()  # the one-pass C++ dequantization of the int4 layout
        n, out_f, in_f = len(self.experts), self.out_features, self.in_features
        block = cpu_int4.block_layout(out_f, in_f)
        # Blocked layouts pack each block of rows on its own: convert 256 rows at a time, so that the transient
        # int32 copies stay small and the allocator gives their memory back (whole experts otherwise).
        rows = out_f if block is None else max(block, 256 // block * block)
        first = cpu_int4.pack_int4(unpack(self.qweight[0, :rows], 4, in_f))
        packed = torch.empty(n, out_f if block else first.shape[0], *first.shape[1:], dtype=first.dtype)
        sz = torch.empty(n, in_f // self.group_size, out_f, 2, dtype=compute_dtype)
        zeros = getattr(self, "zeros", None)
        for i in range(n):  # the results allocated once, filled a chunk at a time
            for r in range(0, out_f, rows):
                packed[i, r:r + rows] = cpu_int4.pack_int4(unpack(self.qweight[i, r:r + rows], 4, in_f))
            sz[i] = cpu_int4.scales_and_zeros(self.scales[i], None if zeros is None else zeros[i], compute_dtype)
        # not persistent: state_dict() gives back `qweight` in the format's packing (_restore_qweight)
        self.register_buffer("int4_weight", packed, persistent=False)
        self.register_buffer("int4_sz", sz, persistent=False)
        self._int4_block = block
        del self._buffers["qweight"]
        self._register_state_dict_hook(_restore_qweight)

    def linear_sorted(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [R, in], rows sorted by slot, counts[s] rows for slot s (sum R) -> [R, out] in the same order."""
        hit = [s for s, c in enumerate(counts) if c]
        if not hit:
            return x.new_empty(0, self.out_features)
        if self.bits == 16:
            w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
            y = _grouped_mm(x, w.transpose(-2, -1), counts)
        elif self._int4 is not None:
            y = self._int4_matmul(x, hit, counts)
        elif x.device.type in ("cpu", "cuda") and self.qweight.device == x.device:  # CUDA: runtime/cuda/ kernels
            y = self._packed_matmul(x, hit, [counts[s] for s in hit])
        else:
            y = self._dequantized_matmul(x, hit, [counts[s] for s in hit])
        if "bias" in self._buffers:
            y = y + self.bias[hit].to(y.dtype).repeat_interleave(torch.tensor([counts[s] for s in hit]), dim=0)
        return y

    def linear(self, slots: list[int], chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """For each hit expert slot, its rows x [m, in] -> [m, out]; all slots of the group in one call."""
        order = sorted(range(len(slots)), key=slots.__getitem__)
        counts = [0] * len(self.experts)
        for i in order:
            counts[slots[i]] += chunks[i].shape[0]
        x = chunks[0] if len(chunks) == 1 else torch.cat([chunks[i] for i in order])
        outs = dict(zip(order, self.linear_sorted(x, counts).split([chunks[i].shape[0] for i in order])))
        return [outs[i] for i in range(len(slots))]

    def _packed_matmul(self, x: torch.Tensor, hit: list[int], rows: list[int]) -> torch.Tensor:
        """Format-packed group on CPU: the registry's decode kernel for slots with fewer rows than its prefill
        kernel's `min_rows` (or PREFILL_MIN_ROWS), the prefill kernel for the others, by runs of consecutive slots of one kind. x [R, in] -> [R, out]."""
        decode, prefill = self._kernels(x.dtype)
        min_rows = prefill_min_rows(prefill)
        big = [r >= min_rows for r in rows]
        if decode is prefill or not any(big) or all(big):
            return (prefill if all(big) else decode).run(self, x, hit, rows)
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        start, i = 0, 0
        for many, run in itertools.groupby(big):
            n = len(list(run))
            end = start + sum(rows[i:i + n])
            y[start:end] = (prefill if many else decode).run(self, x[start:end], hit[i:i + n], rows[i:i + n])
            start, i = end, i + n
        return y

    def _kernels(self, dtype: torch.dtype):
        """(decode, prefill) kernels of the packed layout for x in `dtype`, looked up once per dtype and setting (the
        lookup costs more than a one-row decode's work on small projections)."""
        key = (dtype, self.qweight.device.type, *kernel_registry.settings())
        kernels = self._kernel_cache.get(key)
        if kernels is None:
            kernels = tuple(kernel_registry.select(self.bits, path, self, dtype, layout="packed")
                            for path in kernel_registry.PATHS)
            self._kernel_cache[key] = kernels
        return kernels

    def _int4_matmul(self, x: torch.Tensor, hit: list[int], counts: list[int]) -> torch.Tensor:
        """Prepared 4-bit group: PyTorch's int4 kernel for slots with few rows; slots with more (see `_min_rows`) run
        the fused kernel, or are dequantized and run as grouped matmuls, by runs of consecutive such slots. A group
        whose hit slots fit in one dequant chunk (small experts) is dequantized whole as soon as one slot is big: one
        grouped matmul costs less than many small calls. x [R, in] -> [R, out]."""
        min_rows = self._min_rows(x.dtype)
        big = [self._int4_block is not None and counts[s] >= min_rows for s in hit]
        fused = self._fused(x.dtype)
        if all(big) or (not fused and any(big) and len(hit) * self.in_features * self.out_features <= DEQUANT_CHUNK):
            return self._big_matmul(x, hit, [counts[s] for s in hit])
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        start = 0
        for dense, run in itertools.groupby(zip(hit, big), key=lambda sb: sb[1]):  # a run's rows are contiguous
            run = [s for s, _ in run]
            if dense:
                rows = [counts[s] for s in run]
                y[start:start + sum(rows)] = self._big_matmul(x[start:start + sum(rows)], run, rows)
                start += sum(rows)
                continue
            for s in run:
                end = start + counts[s]
                y[start:end] = cpu_int4.int4_linear(x[start:end], self.int4_weight[s], self.group_size, self.int4_sz[s])
                start = end
        return y

    def _min_rows(self, dtype: torch.dtype) -> int:
        if self._fused(dtype):
            return FUSED_MIN_ROWS
        return FAST_DEQUANT_MIN_ROWS if self._fast_dequant(dtype) else DEQUANT_MIN_ROWS

    def _big_matmul(self, x: torch.Tensor, hit: list[int], rows: list[int]) -> torch.Tensor:
        """Slots with many rows: the fused kernel where it runs, else dequantize + grouped matmul."""
        if self._fused(x.dtype):
            return cpu_kernels.int4_mm(x, self.int4_weight, self.int4_sz, hit, rows, self._int4_block, self.group_size)
        return self._dequantized_matmul(x, hit, rows)

    def _dequantized_matmul(self, x: torch.Tensor, hit: list[int], rows: list[int]) -> torch.Tensor:
        """Hit slots dequantized a chunk at a time, each chunk one grouped matmul; x [R, in] -> [R, out]."""
        per_slot = max(1, DEQUANT_CHUNK // (self.in_features * self.out_features))
        outs, start = [], 0
        for i in range(0, len(hit), per_slot):
            slots, counts = hit[i:i + per_slot], rows[i:i + per_slot]
            end = start + sum(counts)
            w_t = self._weights_t(slots, x.dtype)  # [len(slots), in, out], transient
            outs.append(_grouped_mm(x[start:end], w_t, counts))
            start = end
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _fast_dequant(self, dtype: torch.dtype) -> bool:
        """Whether this prepared 4-bit group dequantizes with the one-pass C++ kernel for `dtype` (bf16 compute, and
        the kernel's bf16 scale/zero table)."""
        return (self._int4_block is not None and dtype == torch.bfloat16 and self.int4_sz.dtype == torch.bfloat16
                and cpu_kernels.available())

    def _fused(self, dtype: torch.dtype) -> bool:
        """Whether this prepared 4-bit group runs the fused AMX kernel for `dtype` (64-row blocks, in % 32 == 0)."""
        return self._fast_dequant(dtype) and self._int4_block == 64 and self.in_features % 32 == 0 and cpu_kernels.amx()

    def _weights_t(self, slots: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Transposed weights [len(slots), in, out] of the given slots in `dtype` (a view where that is free)."""
        if self._int4 is not None and self._int4_block is not None:
            # the kernel's own numbers: (q - 8) * s + zero = q * s + (zero - 8 s), s and zero in the compute dtype
            if self._fast_dequant(dtype):  # one pass, one rounding
                return cpu_kernels.dequant_blocked(self.int4_weight, self.int4_sz, slots, self._int4_block,
                                                   self.group_size)
            n, groups = len(slots), self.in_features // self.group_size
            sz = _rows(self.int4_sz, slots).to(dtype)  # [n, in/g, out, 2]
            s = sz[..., 0].unsqueeze(-2).contiguous()  # [n, in/g, 1, out]; contiguous: addcmul vectorizes
            shift = (sz[..., 1].unsqueeze(-2) - 8 * s).contiguous()
            q_t = cpu_int4.unpack_blocked(_rows(self.int4_weight, slots), self._int4_block, dtype)  # [n, in, out]
            w_t = q_t.view(n, groups, self.group_size, self.out_features)
            return torch.addcmul(shift, w_t, s, out=w_t).view(n, self.in_features, self.out_features)
        return self.dequantized(slots, dtype).transpose(-2, -1)

    def dequantized(self, slots: list[int] | None = None, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """[len(slots), out, in] weights of the given slots (all when None): (q - z) * s in float32, then `dtype`."""
        slots = list(range(len(self.experts))) if slots is None else list(slots)
        if self.bits == 16:
            return _rows(self.weight, slots).to(dtype, copy=True)
        n, groups = len(slots), self.in_features // self.group_size
        if self._int4 is not None:
            q = self._int4_integers(slots)
        elif self.bits == 8:
            q = _rows(self.qweight, slots)  # 8-bit values are stored as they are
        else:
            q = unpack(_rows(self.qweight, slots), self.bits, self.in_features)  # [n, out, in] uint8
        s = _rows(self.scales, slots).float().unsqueeze(-1)  # [n, out, groups, 1]
        zeros = float(1 << (self.bits - 1)) if self.symmetric else _rows(self.zeros, slots).float().unsqueeze(-1)
        # q * s - z * s is exactly (q - z) * s in float32: all three products fit in its 24-bit significand
        w = q.reshape(n, self.out_features, groups, self.group_size).to(torch.float32)
        torch.addcmul(-(zeros * s), w, s, out=w)
        return w.view(n, self.out_features, self.in_features).to(dtype)

    def _int4_integers(self, slots: list[int]) -> torch.Tensor:
        """uint8 [len(slots), out, in] integers of a prepared 4-bit group, exactly."""
        if self._int4_block is not None:
            return cpu_int4.unpack_blocked(_rows(self.int4_weight, slots), self._int4_block).transpose(-2, -1)
        return torch.stack([cpu_int4.unpack_int4(self.int4_weight[s], self.in_features, self.group_size) for s in slots])

    def extra_repr(self) -> str:
        kernel = "int4-cpu" if self._int4 is not None else ("bf16" if self.bits == 16 else "packed")
        return f"bits={self.bits}, experts={len(self.experts)}, in={self.in_features}, out={self.out_features}, kernel={kernel}"


def prefill_min_rows(prefill) -> int:
    """Rows per slot from which `prefill` (a registry Kernel) replaces the decode kernel."""
    return prefill.min_rows if PREFILL_MIN_ROWS is None else PREFILL_MIN_ROWS


def _rows(t: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """t[slots] along dim 0: a view when the slots are consecutive, else one gather."""
    if not slots or slots == list(range(slots[0], slots[0] + len(slots))):
        return t[slots[0]:slots[0] + len(slots)] if slots else t[:0]
    return t.index_select(0, torch.tensor(slots, device=t.device))


def _grouped_mm(x: torch.Tensor, w_t: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x [R, in] sorted by slot, w_t [n, in, out], counts[s] rows of slot s -> [R, out]."""
    if x.device.type == "cpu" and hasattr(F, "grouped_mm"):
        offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return F.grouped_mm(x, w_t.to(x.dtype), offs=offs)
    return torch.cat([a @ w.to(a.dtype) for a, w in zip(x.split(counts), w_t)])


def _restore_qweight(module: PackedGroup, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict of a prepared 4-bit group: put back `qweight` in the format's packing, exactly."""
    if module._int4 is None:
        return
    state_dict[prefix + "qweight"] = pack(module._int4_integers(list(range(len(module.experts)))).contiguous(), 4)
