"""Slow tiers of the expert store: where an expert lives while it is not in the fast-tier cache.

- `FileTier`: the packed tensors in the checkpoint's own safetensors files, one expert's rows read on demand. Reads
  bypass the page cache (O_DIRECT into page-aligned buffers; where the file system refuses O_DIRECT, a plain read
  followed by posix_fadvise(POSIX_FADV_DONTNEED) on the range), so read times are the device's, not the page cache's.
  Bytes read from the file (aligned ranges included) are counted.
- `PinnedTier` (GPU box): every expert's packed rows held once in pinned CPU memory; a read is a host -> GPU copy on a
  side CUDA stream, waited for by the reading thread only.

A read returns {(proj, name): tensor} for one expert, name in qweight/scales/zeros/weight/bias, each tensor
[1, ...] in the dtype the loaded model's own buffer had (so computing from it equals the fully resident model).
"""
from __future__ import annotations

import json
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.format.files import weight_files
from moecompress.format.headers import read_header

ALIGN = 4096
ROW_PAD = 64  # a row buffer's extra bytes: the row keeps the file's address modulo 64 (read_row)
ST_DTYPES = {"U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
             "I32": torch.int32, "I8": torch.int8}


@dataclass(frozen=True)
class RowSource:
    """One expert's row of one stored tensor: file, absolute byte offset, bytes, stored dtype, row shape."""

    file: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def tensor_index(directory: str | Path) -> dict[str, tuple[str, int, torch.dtype, tuple[int, ...]]]:
    """name -> (file, absolute offset of its data, dtype, shape) over every safetensors file of a checkpoint."""
    directory = Path(directory)
    out = {}
    for rel in weight_files(directory):
        path = directory / rel
        read_header(path)  # checks every offset against the file's size first
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            doc = json.loads(f.read(n))
        for name, entry in doc.items():
            if name != "__metadata__":
                out[name] = (str(path), 8 + n + entry["data_offsets"][0], ST_DTYPES.get(entry["dtype"]),
                             tuple(entry["shape"]))
    return out


def row_source(index: dict, name: str, slot: int) -> RowSource:
    if name not in index:
        raise MoecompressError(f"tensor {name} is not in the checkpoint's safetensors files; re-export the checkpoint")
    file, offset, dtype, shape = index[name]
    row = shape[1:]
    nbytes = torch.Size(row).numel() * torch.empty(0, dtype=dtype).element_size()
    return RowSource(file, offset + slot * nbytes, nbytes, dtype, row)


class BufferPool:
    """Row buffers of evicted experts, handed to the next reads of the same size instead of fresh allocations.

    Without it the process held 35-100 MiB of anonymous memory beyond the slots at a 50 % budget (more the more it
    read): glibc raises its mmap threshold once the first large buffer is freed, after which row buffers come from
    the heap and per-thread arenas, where the evicted ones' memory stays (eval/results/store_time.md: RSS). Recycled
    here, the same pages serve the next read; the pool is trimmed to what the cache leaves free of its budget."""

    def __init__(self):
        self._free: dict[int, list[torch.Tensor]] = {}  # bytes -> buffers, most recently freed last
        self._lock = threading.Lock()
        self.nbytes = 0

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self.nbytes -= nbytes
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buffers: list[torch.Tensor], limit: int) -> None:
        """Keep `buffers` (CPU uint8 row buffers nothing else uses any more), then trim to at most `limit` bytes."""
        with self._lock:
            for b in buffers:
                self._free.setdefault(b.numel(), []).append(b)
                self.nbytes += b.numel()
            count = sum(len(v) for v in self._free.values())
            limit += ROW_PAD * count  # the budget counts rows; each buffer holds ROW_PAD bytes more (read_row)
            for size in sorted(self._free, key=lambda n: len(self._free[n])):  # the sizes least recycled go first
                while self.nbytes > max(limit, 0) and self._free[size]:
                    self._free[size].pop(0)
                    self.nbytes -= size


class FileTier:
    """Reads expert rows from the safetensors files with the page cache bypassed; thread-safe."""

    def __init__(self, direct: bool = True):
        self.direct = direct
        self._fds: dict[tuple[str, bool], int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # per reading thread: its O_DIRECT buffer (_bounce)
        self.pool = BufferPool()  # evicted rows' buffers (ExpertCache gives them back)
        self.bytes_read = 0  # bytes transferred from the files (aligned ranges included)

    def _fd(self, file: str) -> tuple[int, bool]:
        with self._lock:
            for direct in ((True, False) if self.direct else (False,)):
                if (file, direct) in self._fds:
                    return self._fds[(file, direct)], direct
            if self.direct and hasattr(os, "O_DIRECT"):
                try:
                    fd = os.open(file, os.O_RDONLY | os.O_DIRECT)
                    self._fds[(file, True)] = fd
                    return fd, True
                except OSError:  # tmpfs and some others refuse O_DIRECT: fall back to fadvise
                    pass
            fd = os.open(file, os.O_RDONLY)
            self._fds[(file, False)] = fd
            return fd, False

    def read_row(self, src: RowSource, dtype: torch.dtype) -> torch.Tensor:
        """The row as a fresh tensor [1, *shape] of `dtype`."""
        fd, direct = self._fd(src.file)
        # The row keeps its address modulo 64 from the file (where the loaded model's memory-mapped tensor had it):
        # some dense kernels (a one-row float GEMV) pick their code path, hence summation order, by alignment.
        raw = self.pool.take(src.nbytes + ROW_PAD)
        skew = (src.offset - raw.data_ptr()) % ROW_PAD
        dst_t = raw[skew:skew + src.nbytes]
        out = dst_t.view(src.dtype).view((1, *src.shape))
        dst = dst_t.numpy()
        if direct:
            start = src.offset // ALIGN * ALIGN
            length = -(-(src.offset + src.nbytes - start) // ALIGN) * ALIGN
            buf = self._bounce(length)  # page-aligned, as O_DIRECT needs; this thread's, reused
            got = os.preadv(fd, [buf[:length]], start)
            if got < src.offset + src.nbytes - start:
                raise MoecompressError(f"{src.file}: short read at byte {src.offset} (file truncated?)")
            head = src.offset - start
            dst[:] = buf[head:head + src.nbytes]
            read = length
        else:
            got = os.preadv(fd, [dst], src.offset)
            if got < src.nbytes:
                raise MoecompressError(f"{src.file}: short read at byte {src.offset} (file truncated?)")
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, src.offset, src.nbytes, os.POSIX_FADV_DONTNEED)
            read = src.nbytes
        with self._lock:
            self.bytes_read += read
        return out if dtype == src.dtype else out.to(dtype)

    def _bounce(self, length: int) -> memoryview:
        """This thread's page-aligned read buffer of at least `length` bytes. Reused: a fresh anonymous mapping per
        read cost 1.5 ms of CPU per MiB (page faults, zeroing, unmapping) against 0.16 ms/MiB for the O_DIRECT read
        itself, and made the reads 2-3x slower (measured here)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < length:
            if buf is not None:
                buf.release()
                self._local.map.close()
            self._local.map = mmap.mmap(-1, max(length, 1 << 20))
            buf = self._local.buf = memoryview(self._local.map)
        return buf

    def read(self, sources: dict[tuple[str, str], tuple[RowSource, torch.dtype]]) -> dict:
        return {key: self.read_row(src, dtype) for key, (src, dtype) in sources.items()}

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class PinnedTier:
    """GPU box: all experts' rows in pinned CPU memory (read once from the files), copied to `device` on a side stream."""

    def __init__(self, file_tier: FileTier, all_sources: dict, device: torch.device):
        if not torch.cuda.is_available():
            raise MoecompressError("the pinned-memory tier needs CUDA; on a CPU box use the file tier")
        self.device = torch.device(device)
        self.file_tier = file_tier
        self._host = {key: {k: t.pin_memory() for k, t in file_tier.read(srcs).items()}
                      for key, srcs in all_sources.items()}
        self._stream = torch.cuda.Stream(self.device)
        self._compute = torch.cuda.default_stream(self.device)
        self._lock = threading.Lock()
        self._enqueue = threading.Lock()
        self.bytes_read = 0  # bytes copied host -> GPU
        self.busy_s = 0.0  # time the side stream spent on the copies (CUDA events: what the overlap hides or not)

    def read_expert(self, key) -> dict:
        host = self._host[key]
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with self._enqueue, torch.cuda.stream(self._stream):  # one read's events bracket its copies alone
            start.record(self._stream)
            out = {k: t.to(self.device, non_blocking=True) for k, t in host.items()}
            done.record(self._stream)
        done.synchronize()  # this (reading) thread waits; the compute stream never does
        for t in out.values():
            t.record_stream(self._compute)  # freed memory is not reused by the side stream while compute reads it
        with self._lock:
            self.bytes_read += sum(t.numel() * t.element_size() for t in out.values())
            self.busy_s += start.elapsed_time(done) / 1000
        return out


def device_view(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor over pinned host tensor `t`'s memory (unified addressing: the host pointer is valid on the
    device), so the kernels read it like device memory; `t` must outlive the view (HostExperts keeps it)."""
    if t.device.type != "cpu" or not t.is_pinned():
        return t
    try:
        storage = torch._C._construct_storage_from_data_pointer(t.data_ptr(), device, t.numel() * t.element_size())
    except (AttributeError, RuntimeError, TypeError):  # no such entry in this torch: Triton takes the pinned tensor
        return t
    return torch.empty(0, dtype=t.dtype, device=device).set_(storage, 0, t.shape, t.stride())
