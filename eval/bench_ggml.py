"""Kernel against kernel: llama.cpp's MoE mat-vec (ggml MUL_MAT_ID) and ours on the same Qwen3-30B-A3B expert shape.

llama.cpp's own `test-backend-ops perf` has a case for Qwen3-30B-A3B: 128 experts of 768 x 2048 (one of gate / up),
8 used per token, tokens per call bs = 1 .. 512 (here 1, 4, 8, 32 by default, `--batches`), weights at a ggml type,
activations float32. This script builds that tool next to the llama.cpp of eval/bench_cpu_llama.py (one extra CMake
target), runs it on the CPU backend, and times ours on the same shape and routing density: 128 random packed experts
of 768 x 2048 at `bits` (group 128, asymmetric), each token routed to 8 distinct random experts, the routed rows
computed with the kernel the registry picks for that many rows per expert (cpu_lowbit.decode below the tile
kernel's `min_rows` for the CPU's ISA, else the tiles + GEMM). Both are timed with one thread, as test-backend-ops
runs the CPU backend with half the cores (here: one); the machine's other processes disturb both alike.

    .venv/bin/python eval/bench_ggml.py                     # Q4_0/4-bit, Q8_0/8-bit, Q4_K/4-bit, Q6_K/8-bit
    .venv/bin/python eval/bench_ggml.py --out eval/results/ggml.md

Times: ggml's us/run (its own repeat loop); ours: the median of `--repeats` calls after 10 warm-up calls. Weight GB/s =
bytes of the distinct experts a call reads / time.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_cpu_llama as llama  # noqa: E402
from bench_kernels import make, timed  # noqa: E402

from moecompress.runtime.kernels import cpu_features, cpu_lowbit, kernel_registry  # noqa: E402

EXPERTS, USED, ROWS, COLS, GROUP = 128, 8, 768, 2048, 128
PAIRS = (("q4_0", 4), ("q8_0", 8), ("q4_K", 4), ("q6_K", 8))  # ggml type, our bits at or above its size
BATCHES = (1, 4, 8, 32)  # ggml's case also has 64..512 (minutes each at one thread)
WARMUP = 10


def build_tool(root: Path) -> Path:
    lib = llama.ensure_built(root)
    tool = lib.bin / "test-backend-ops"
    if not tool.exists():
        build = lib.bin.parent
        log = root / "build.log"
        llama._run(["cmake", "-S", lib.source, "-B", build, "-DLLAMA_BUILD_TESTS=ON"], log)
        llama._run(["cmake", "--build", build, "--config", "Release", "-j", "2", "--target", "test-backend-ops"], log)
    return tool


def ggml_times(tool: Path, types: list[str], batches: list[int]) -> dict[tuple[str, int], float]:
    """(ggml type, bs) -> microseconds per call of MUL_MAT_ID at the Qwen3-30B-A3B case."""
    pattern = (f"type_a=({'|'.join(types)}),type_b=f32,n_mats={EXPERTS},n_used={USED},b=0,m={ROWS},"
               f"n=({'|'.join(map(str, batches))}),k={COLS}")
    out = subprocess.run([tool, "perf", "-o", "MUL_MAT_ID", "-b", "CPU", "-p", pattern], capture_output=True,
                         text=True, timeout=1800).stdout
    times = {}
    for line in out.splitlines():
        m = re.search(r"MUL_MAT_ID\(type_a=(\w+),type_b=f32,n_mats=\d+,n_used=\d+,b=0,m=\d+,n=(\d+),k=\d+[^)]*\).*?"
                      r"([\d.]+) us/run", line)
        if m:
            times[(m.group(1), int(m.group(2)))] = float(m.group(3))
    return times


def ours(bits: int, bs: int, repeats: int, gen: torch.Generator) -> tuple[float, int, str]:
    """Seconds per call (median), bytes of the distinct experts read, kernel name."""
    q, scales, zeros = make(bits, EXPERTS, COLS, ROWS, GROUP, gen)  # random packed weights, as bench_kernels
    route = torch.stack([torch.randperm(EXPERTS, generator=gen)[:USED] for _ in range(bs)])  # [bs, 8]
    flat = route.reshape(-1)
    order = torch.argsort(flat, stable=True)
    slots, counts = torch.unique_consecutive(flat[order], return_counts=True)
    x = torch.randn(bs, COLS, generator=gen).to(torch.bfloat16)[order // USED].contiguous()
    isa = cpu_features.best_isa()
    rows = counts.float().mean().item()
    prefill = rows >= kernel_registry.TILE_MM[isa].min_rows
    slots, counts = slots.tolist(), counts.tolist()
    if prefill:
        fn = lambda: cpu_lowbit.prefill(x, q, scales, zeros, bits, GROUP, slots, counts, isa,  # noqa: E731
                                        cpu_features.compute_dtype())
    else:
        fn = lambda: cpu_lowbit.decode(x, q, scales, zeros, bits, GROUP, slots, counts, isa)  # noqa: E731
    for _ in range(WARMUP - 1):  # the first calls on fresh weights run up to 3x slower (measured): time warm calls,
        fn()                     # as ggml's own loop does (`timed` makes the last warm-up call)
    per_expert = q[0].numel() + scales[0].numel() * 2 + zeros[0].numel()
    return timed(fn, repeats), per_expert * len(slots), ("tiles + GEMM " if prefill else "int8 decode ") + isa


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-dir", default=str(llama.DEFAULT_DIR))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=None, help="also write the table here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    tool = build_tool(Path(args.llama_dir))
    ggml = ggml_times(tool, [t for t, _ in PAIRS], batches)
    gen = torch.Generator().manual_seed(0)
    lines = [f"CPU: {cpu_features.best_isa()} (torch {torch.__version__}), 1 thread; Qwen3-30B-A3B expert projection "
             f"{ROWS}x{COLS}, {EXPERTS} experts, top-{USED}; `python eval/bench_ggml.py`", "",
             "| tokens | ggml type | ggml µs | ours (bits, kernel) | ours µs | ours / ggml time | ours weight GB/s |",
             "|---|---|---|---|---|---|---|"]
    ours_cache: dict[tuple[int, int], tuple[float, int, str]] = {}
    for bs in batches:
        for gtype, bits in PAIRS:
            if (bits, bs) not in ours_cache:
                ours_cache[(bits, bs)] = ours(bits, bs, args.repeats, gen)
            sec, nbytes, kernel = ours_cache[(bits, bs)]
            g = ggml.get((gtype, bs))
            ratio = f"{sec * 1e6 / g:.2f}" if g else "n/a"
            lines.append(f"| {bs} | {gtype} | {g if g else 'not run'} | {bits}-bit, {kernel} | {sec * 1e6:.0f} | {ratio} "
                         f"| {nbytes / sec / 1e9:.1f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
