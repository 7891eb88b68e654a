"""CPU time of one 512-token prefill, four ways in one process, interleaved (1 thread: robust on a loaded machine).

- old:   the tiles + at::mm prefill kernel on AVX2 (the registry before session 22) and PackedExperts' general path;
- q8:    session 22: int8 activations on AVX2 through the decode kernels for in_features >= 512 (tiles below),
         general path;
- fused: q8 plus the one-call MoE prefill layer (runtime/experts/cpu_prefill.py), the decode kernels inside;
- gemm:  now: the register-blocked GEMM (csrc/lowbit/gemm.h) for slots of >= gemm_min_rows rows, every in_features,
         in the projections and in the one-call MoE layer.

    OMP_NUM_THREADS=1 .venv/bin/python eval/bench_cpu_prefill.py /tmp/moecompress-bench-cpu/b-4-densematch-head8 3

The checkpoint: any moecompress directory (eval/bench_cpu.py leaves its models in its --workdir).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

import moecompress
from moecompress.runtime.experts.packed_group import PackedGroup
from moecompress.runtime.kernels import cpu_lowbit
from moecompress.runtime.kernels import kernel_registry as kr


def main(directory: str, rounds: int) -> None:
    torch.set_num_threads(1)
    model = moecompress.from_pretrained(directory, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    saved = {k: v for k, v in kr.KERNELS.items() if k[0] == "cpu:avx2" and k[2] == "prefill"}
    min_in, min_rows = kr.Q8_PREFILL_MIN_IN, cpu_lowbit.gemm_min_rows()

    def setup(conf: str) -> None:
        for key, kernels in saved.items():
            kr.KERNELS[key] = (kr.TILE_MM["cpu:avx2"],) if conf == "old" else kernels
        kr.Q8_PREFILL_MIN_IN = min_in if conf == "gemm" else 512
        cpu_lowbit.gemm_min_rows(min_rows if conf == "gemm" else 10**9)
        for m in model.modules():
            if isinstance(m, PackedGroup):
                m._kernel_cache.clear()
            m.__dict__.pop("_cpu_moe_fused", None)
        os.environ["MOECOMPRESS_CPU_PREFILL_FUSED"] = "1" if conf in ("fused", "gemm") else "0"

    confs = ("old", "q8", "fused", "gemm")
    res: dict[str, list[float]] = {c: [] for c in confs}
    with torch.no_grad():
        for c in confs:  # warm-up: kernels, allocator, weights paged in
            setup(c)
            model(ids[:, :64], use_cache=True, logits_to_keep=1)
        for _ in range(rounds):
            for c in confs:
                setup(c)
                t0 = time.process_time()
                model(ids, use_cache=True, logits_to_keep=1)
                res[c].append(time.process_time() - t0)
    base = statistics.median(res["old"])
    for c in confs:
        m = statistics.median(res[c])
        print(f"{os.path.basename(directory.rstrip('/')):28s} {c:6s} CPU ms (median of {rounds}) {1000 * m:7.0f}  "
              f"{base / m:.2f}x less than old   runs {[round(1000 * x) for x in res[c]]}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
