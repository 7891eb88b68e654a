"""Resident pages of the checkpoint's file mappings that no loaded tensor uses any more.

transformers memory-maps the safetensors files and keeps the tensors it can use as they are as views of the mapping
(our packed tensors, same-dtype dense weights: one copy, file-backed). Tensors it converts (a dtype change, fused
experts) and groups that `prepare()` converts to a kernel layout get new memory, but the source pages stay resident
in the mapping as long as any other tensor views the same file: every converted byte counts twice in the process's
RSS. `release_unused` drops those pages from the process (MADV_DONTNEED; the page cache keeps them, nothing is read
again unless a tensor touches them).

Linux only (elsewhere a no-op). Only mappings with no copy-on-write page are touched: a tensor that wrote to its
view would lose the write, so such a mapping is left as it is.
"""
from __future__ import annotations

import ctypes
import mmap
import re
import sys

from torch import nn

MADV_DONTNEED = 4
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


def file_mappings(suffix: str = ".safetensors") -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's mappings of files ending in `suffix` that hold no copy-on-write page."""
    out, current, clean = [], None, True
    with open("/proc/self/smaps") as f:
        for line in f:
            m = _HEADER.match(line)
            if m:
                if current is not None and clean:
                    out.append(current)
                start, end, _, path = m.groups()
                current = (int(start, 16), int(end, 16), path) if path.endswith(suffix) else None
                clean = True
            elif current is not None and line.startswith("Anonymous:"):
                clean = int(line.split()[1]) == 0
    if current is not None and clean:
        out.append(current)
    return out


def _live_ranges(model: nn.Module) -> list[tuple[int, int]]:
    ranges = []
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        if st.nbytes():
            ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
    return sorted(ranges)


def unused_ranges(mapping: tuple[int, int], live: list[tuple[int, int]], page: int) -> list[tuple[int, int]]:
    """Whole pages of `mapping` [start, end) that no live range touches; live sorted by start."""
    start, end = mapping
    out, cursor = [], start
    for a, b in live:
        if b <= cursor or a >= end:
            continue
        lo, hi = -(-cursor // page) * page, a // page * page  # inward to whole pages
        if hi > lo:
            out.append((lo, hi))
        cursor = max(cursor, b)
    lo, hi = -(-cursor // page) * page, end // page * page
    if hi > lo:
        out.append((lo, hi))
    return out


def release_unused(model: nn.Module) -> int:
    """Drop the resident pages of the model's safetensors mappings that none of its tensors views; bytes released
    (an upper bound: pages never touched count too)."""
    if not sys.platform.startswith("linux"):
        return 0
    mappings = file_mappings()
    if not mappings:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    live, released = _live_ranges(model), 0
    for start, end, _ in mappings:
        for lo, hi in unused_ranges((start, end), live, mmap.PAGESIZE):
            if libc.madvise(lo, hi - lo, MADV_DONTNEED) == 0:
                released += hi - lo
    return released

