"""What our process's RSS increase after a run is made of: the model's tensors, freed heap malloc keeps, the rest.

eval/bench_cpu.py measures, in each fresh process, VmRSS before loading and after the whole run. `rss_parts` splits
that increase, at the run's end, into
- weights: the resident bytes of the model's own tensors: for a tensor on a mapping of a checkpoint file or on a
  mapping of its own (huge_pages' copy, a large allocation), that mapping's resident pages, each mapping once; for
  one on the heap (norm vectors and other small copies), its bytes;
- freed heap: what `malloc_trim(0)` gives back at that moment (memory freed by the run that glibc kept; called only
  after everything else is read, it changes nothing measured before it);
- other: the rest of the increase (shared libraries loaded meanwhile are left out of the increase, as the table
  does): Python objects of modules imported and of the model, transformers' and torch's state made on first use,
  thread stacks, the decoders' live buffers. Session 27 measured this part at ~6 MB for any model size
  (eval/results/cpu_rss_s27.md: refmoe-qwen3's 7-15 MB checkpoints and the 30B-dims model's 0.4-0.8 GB).
"""
from __future__ import annotations

from pathlib import Path

from moecompress.runtime.kernels import heap


def mappings() -> list[tuple[int, int, str, int]]:
    """(start, end, path or "", resident bytes) of every mapping of this process."""
    out = []
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                out.append([lo, hi, head[5] if len(head) > 5 else "", 0])
            elif line.startswith("Rss:") and out:
                out[-1][3] = int(head[1]) * 1024
    return [tuple(m) for m in out]


def weights_rss(model, directory: Path) -> int:
    """Resident bytes of `model`'s CPU tensors (see the module docstring)."""
    maps = mappings()
    root = str(Path(directory).resolve())
    storages = {}
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type == "cpu" and t.untyped_storage().nbytes():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    counted, total = set(), 0
    for ptr, nbytes in storages.items():
        m = next((m for m in maps if m[0] <= ptr < m[1]), None)
        own = m is not None and (m[2].startswith(root) or (m[2] == "" and nbytes >= (m[1] - m[0]) // 2))
        if not own:
            total += nbytes
        elif m[0] not in counted:
            counted.add(m[0])
            total += m[3]
    return total


def rss_parts(model, directory: Path, rss_incr: int) -> dict:
    """weights / freed heap / other of an RSS increase `rss_incr` measured just before (bytes); trims the heap."""
    from bench_runtime import vm_kib

    weights = weights_rss(model, directory)
    before = vm_kib("VmRSS") * 1024
    heap.trim()
    freed = max(before - vm_kib("VmRSS") * 1024, 0)
    return {"rss_weights": weights, "rss_freed_heap": freed, "rss_other": rss_incr - weights - freed}
