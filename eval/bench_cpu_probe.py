"""The read-bandwidth probe behind bench_cpu.py's bandwidth bound: what `threads` threads can read, in C.

The bound of issue 16 is bytes of active weights per decode step / measured read bandwidth. Until session 24 the
probe was torch's float32 sum of 1 GiB, best of 7, and the bound took the highest of six such readings (4 KB and 2 MB
pages, before and after each round): on the 2-core EPYC those readings swing 18.9-26.6 GB/s within one quiet run, so
the bound moved by 40 % with no change to the code. This probe reads like the decode does and reports medians:

- `stream`: each thread reads one contiguous share of the buffer (torch's sum does this): 32-byte loads, four
  independent accumulators, software prefetch `prefetch` bytes ahead (0: the hardware prefetchers alone).
- `decode`: the decode's pattern: regions of 8 matrices of `chunk` bytes at random places in the buffer (a token's 8
  experts of one projection), each region split between the threads as at::parallel_for splits the experts' rows,
  a barrier after each region (the join of one parallel loop).
- pages: 2 MB (madvise MADV_HUGEPAGE, as runtime/kernels/huge_pages.py gives the streamed weights) or 4 KB.

Each reading reads the whole buffer (1 GiB, far beyond any L3) `repeats` times and keeps the median; bench_cpu.py
takes readings through the run (fresh processes) and bounds with their median. Compiled on first use with the
system's C compiler (x86-64 with AVX2; elsewhere torch's sum stands in) into a cache folder.

    .venv/bin/python eval/bench_cpu_probe.py --threads 2           # every variant, a table of GB/s
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(clockid_t c) { struct timespec t; clock_gettime(c, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

/* n bytes (a multiple of 128) from p: four accumulators of vpsadbw sums keep every load alive. */
static uint64_t read_range(const uint8_t* p, int64_t n, int64_t pf) {
  const __m256i z = _mm256_setzero_si256();
  __m256i a0 = z, a1 = z, a2 = z, a3 = z;
  for (int64_t i = 0; i < n; i += 128) {
    if (pf) {
      _mm_prefetch((const char*)p + i + pf, _MM_HINT_T0);
      _mm_prefetch((const char*)p + i + pf + 64, _MM_HINT_T0);
    }
    a0 = _mm256_add_epi64(a0, _mm256_sad_epu8(_mm256_load_si256((const __m256i*)(p + i)), z));
    a1 = _mm256_add_epi64(a1, _mm256_sad_epu8(_mm256_load_si256((const __m256i*)(p + i + 32)), z));
    a2 = _mm256_add_epi64(a2, _mm256_sad_epu8(_mm256_load_si256((const __m256i*)(p + i + 64)), z));
    a3 = _mm256_add_epi64(a3, _mm256_sad_epu8(_mm256_load_si256((const __m256i*)(p + i + 96)), z));
  }
  __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  uint64_t o[4]; _mm256_storeu_si256((__m256i*)o, s);
  return o[0] + o[1] + o[2] + o[3];
}

/* A 2 MB-aligned private anonymous buffer of n bytes, on huge pages or not, every page written. */
uint8_t* probe_alloc(int64_t n, int huge) {
  const int64_t align = 2 << 20;
  uint8_t* raw = mmap(0, n + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return 0;
  uint8_t* p = (uint8_t*)(((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1));
  madvise(p, n, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  memset(p, 1, n);
  return p;
}

void probe_free(uint8_t* p, int64_t n) { munmap(p, n); }  /* the alignment slack (< 2 MB) stays mapped */

/* One pass over the buffer: `count` chunks of `chunk` bytes in the order `order` (offsets in chunks), `per` chunks per
   region, each region split in `threads` equal byte shares (thread t: [t * R / T, (t + 1) * R / T) of the region's
   concatenated chunks, rounded to 128 bytes), a barrier after each region. Returns wall seconds; cpu[t]: thread t's
   CPU seconds; *check: the bytes' sum (the caller checks it). */
double probe_pass(const uint8_t* buf, int64_t chunk, const int64_t* order, int64_t count, int64_t per, int threads,
                  int64_t pf, double* cpu, uint64_t* check) {
  uint64_t total = 0;
  const double t0 = now(CLOCK_MONOTONIC);
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const double c0 = now(CLOCK_THREAD_CPUTIME_ID);
    for (int64_t r0 = 0; r0 < count; r0 += per) {
      const int64_t nc = r0 + per <= count ? per : count - r0, R = nc * chunk;
      const int64_t lo = (R * t / T) & ~(int64_t)127, hi = t == T - 1 ? R : (R * (t + 1) / T) & ~(int64_t)127;
      for (int64_t c = lo / chunk; c < nc && c * chunk < hi; ++c) {
        const int64_t a = c * chunk > lo ? c * chunk : lo, b = (c + 1) * chunk < hi ? (c + 1) * chunk : hi;
        total += read_range(buf + order[r0 + c] * chunk + (a - c * chunk), b - a, pf);
      }
#pragma omp barrier
    }
    cpu[t] = now(CLOCK_THREAD_CPUTIME_ID) - c0;
  }
  *check = total;
  return now(CLOCK_MONOTONIC) - t0;
}
"""

CHUNK = {"stream": 0, "decode": 3 << 18}  # decode: 768 KiB = a 4-bit expert's down projection (2048 x 768)
PER_REGION = 8  # top-8: one projection of a token's experts per parallel loop


def _library() -> ctypes.CDLL:
    tag = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
    folder = Path(os.environ.get("MOECOMPRESS_PROBE_DIR", Path(tempfile.gettempdir()) / "moecompress-probe"))
    lib = folder / f"probe_{tag}.so"
    if not lib.exists():
        folder.mkdir(parents=True, exist_ok=True)
        src = folder / f"probe_{tag}.c"
        src.write_text(SOURCE)
        tmp = lib.with_suffix(f".{os.getpid()}.so")
        subprocess.run(["cc", "-O2", "-mavx2", "-fopenmp", "-shared", "-fPIC", "-o", str(tmp), str(src)], check=True)
        tmp.rename(lib)
    so = ctypes.CDLL(str(lib))
    so.probe_alloc.restype = ctypes.c_void_p
    so.probe_alloc.argtypes = [ctypes.c_int64, ctypes.c_int]
    so.probe_free.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    so.probe_pass.restype = ctypes.c_double
    so.probe_pass.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64,
                              ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_double),
                              ctypes.POINTER(ctypes.c_uint64)]
    return so


def available() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        _library()
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def read(threads: int, pattern: str = "decode", huge: bool = True, prefetch: int = 2048, gib: float = 1.0,
         repeats: int = 5, seed: int = 0) -> dict:
    """Median and all readings (bytes/s by wall time; and by the threads' CPU time, for loaded machines) of `repeats`
    passes over a fresh buffer of `gib` GiB."""
    import random

    so = _library()
    n = int(gib * 2**30)
    chunk = CHUNK[pattern] or n
    count = n // chunk
    n = count * chunk
    order = list(range(count))
    random.Random(seed).shuffle(order)
    per = PER_REGION if CHUNK[pattern] else 1
    buf = so.probe_alloc(n, int(huge))
    if not buf:
        raise MemoryError(f"probe: could not map {n} bytes")
    order_c = (ctypes.c_int64 * count)(*order)
    cpu = (ctypes.c_double * threads)()
    check = ctypes.c_uint64()
    so.probe_pass(buf, chunk, order_c, count, per, threads, prefetch, cpu, ctypes.byref(check))  # warm-up
    wall, by_cpu = [], []
    try:
        for _ in range(repeats):
            secs = so.probe_pass(buf, chunk, order_c, count, per, threads, prefetch, cpu, ctypes.byref(check))
            if check.value != n:  # every byte is 1
                raise RuntimeError(f"probe: read {check.value} of {n} bytes")
            wall.append(n / secs)
            by_cpu.append(n / max(cpu[i] for i in range(threads)))  # the slowest thread's CPU time
    finally:
        so.probe_free(buf, n)
    return {"pattern": pattern, "huge": huge, "prefetch": prefetch, "threads": threads,
            "median": statistics.median(wall), "readings": wall, "median_cpu": statistics.median(by_cpu)}


def torch_sum(threads: int, gib: float = 1.0, repeats: int = 7) -> float:
    """Session 24's probe: bytes/s of a float32 sum of `gib` GiB, best of `repeats` (the fallback off x86)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


VARIANTS = [("stream", False, 0), ("stream", True, 0), ("stream", True, 2048), ("decode", True, 2048),
            ("decode", True, 0), ("decode", False, 2048)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variant", help="pattern,huge(0/1),prefetch: one reading as JSON (bench_cpu.py's call)")
    args = ap.parse_args(argv)
    if args.variant:
        pattern, huge, pf = args.variant.split(",")
        print(json.dumps(read(args.threads, pattern, bool(int(huge)), int(pf), repeats=args.repeats)))
        return
    print(f"torch float32 sum, best of 7: {torch_sum(args.threads) / 1e9:.1f} GB/s")
    for pattern, huge, pf in VARIANTS:
        r = read(args.threads, pattern, huge, pf, repeats=args.repeats)
        readings = ", ".join(f"{x / 1e9:.1f}" for x in r["readings"])
        print(f"{pattern:7s} {'2 MB' if huge else '4 KB'} pages, prefetch {pf:5d}: median {r['median'] / 1e9:5.1f} "
              f"GB/s (readings {readings}; by CPU time {r['median_cpu'] / 1e9:.1f})",
              flush=True)


if __name__ == "__main__":
    main()
