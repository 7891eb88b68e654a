"""Streamed weights onto transparent huge pages (Linux), without a second resident copy.

A CPU decode step streams every active weight once per token, from the checkpoint's memory-mapped file: 4 KB pages,
each a TLB entry, and the hardware prefetchers stop at every 4 KB boundary. The same kernel reading the same bytes
from 2 MB pages streamed 8-bit weights at 14.4 instead of 12.1 GB/s on one Zen 3 core (cold, eval notes of session
23). `move(owner, tensors)` copies the given tensors into one anonymous mapping madvised MADV_HUGEPAGE, points the
tensors at it in place (`tensor.data = ...`: every holder of the tensor object, the model's modules and the fused
calls, reads the new memory), then drops the file pages they occupied from this process (MADV_DONTNEED on whole pages
inside them; read again, they would come back from the file unchanged). Resident memory stays what it was: the
copies replace the file pages (page cache is not process memory). Only tensors that live in a file mapping move, and
only when they add up to MIN_TOTAL_BYTES (a small model sits in the caches: 2 MB pages buy nothing there and their
rounding would cost up to 2 MB). Off with MOECOMPRESS_HUGE_PAGES=0, and where THP is `never` or not Linux.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from functools import cache
from pathlib import Path

import torch

ENV = "MOECOMPRESS_HUGE_PAGES"
HUGE_PAGE = 2 << 20
ALIGN = 4096  # each tensor starts on its own page: its old pages and its new ones never share one with another
MIN_TOTAL_BYTES = 64 << 20
ATTR = "_moecompress_huge_pages"  # owner attribute: the mapping (kept alive with the owner; the tensors hold it too)
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The kernel's THP setting (always / madvise / never), None where there is none."""
    try:
        text = _THP.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def enabled() -> bool:
    return (os.environ.get(ENV, "1") != "0" and thp_mode() in ("always", "madvise")
            and hasattr(mmap, "MADV_HUGEPAGE") and _libc() is not None)


@cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "madvise") else None


def _file_ranges() -> list[tuple[int, int]]:
    """[start, end) of this process's file-backed mappings."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/"):
                a, b = (int(x, 16) for x in parts[0].split("-"))
                out.append((a, b))
    return out


def _in_file(ptr: int, ranges: list[tuple[int, int]]) -> bool:
    return any(a <= ptr < b for a, b in ranges)


def moved_bytes(owner) -> int:
    """Bytes `move` put on huge pages for `owner` (0: none)."""
    arena = owner.__dict__.get(ATTR)
    return 0 if arena is None else arena[1]


def move(owner, tensors) -> int:
    """Put `tensors` (CPU, contiguous; the others are left) on huge pages, once per `owner` (the model): -> bytes
    moved (0 where nothing moved: off, too few bytes, not in a file mapping)."""
    if ATTR in owner.__dict__:
        return moved_bytes(owner)
    owner.__dict__[ATTR] = None, 0
    if not enabled():
        return 0
    ranges = _file_ranges()
    todo, end = [], 0
    for t in sorted((t for t in tensors if t is not None and t.device.type == "cpu"), key=lambda t: t.data_ptr()):
        ptr = t.data_ptr()
        if ptr < end or not t.is_contiguous() or t.nbytes < ALIGN or not _in_file(ptr, ranges):
            continue  # overlapping another (a view, or the same tensor again), small, or not in a file mapping
        todo.append(t)
        end = ptr + t.nbytes
    total = sum((t.nbytes + ALIGN - 1) // ALIGN * ALIGN for t in todo)
    if total < MIN_TOTAL_BYTES:
        return 0
    size = (total + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    # private anonymous memory (a shared one is shmem, whose huge pages follow another setting); its first 2 MB
    # boundary starts the huge pages
    arena = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(arena))
    start = -address % HUGE_PAGE
    arena.madvise(mmap.MADV_HUGEPAGE, start, size)
    base = torch.frombuffer(arena, dtype=torch.uint8, count=size, offset=start)  # holds the mapping
    libc, page, offset = _libc(), mmap.PAGESIZE, 0
    with torch.no_grad():
        for t in todo:  # one at a time, its file pages dropped at once: the peak stays one tensor above the start
            ptr, n = t.data_ptr(), t.nbytes
            new = base[offset:offset + n].view(t.dtype).view(t.shape)
            new.copy_(t)
            t.data = new
            offset += (n + ALIGN - 1) // ALIGN * ALIGN
            a, b = -(-ptr // page) * page, (ptr + n) // page * page  # the pages wholly inside it: no one reads them
            if b > a:
                libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), 4)  # MADV_DONTNEED
    owner.__dict__[ATTR] = arena, total
    return total
