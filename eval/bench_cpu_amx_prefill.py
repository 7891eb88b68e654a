"""Where a 512-token prefill spends its time on an AMX CPU, and which kernel its 4-bit dense projections should take
(issue 16, session 26: the 2-bit plan's prefill fell 1941 -> 998 tok/s when its 4-bit attention left the int4 layout).

One process, one checkpoint, wall time (run it pinned: `taskset -c 0,1`):
1. kernel against kernel on the checkpoint's own 4-bit dense projections (PackedLinear) at `--rows` rows:
   packed_amx (our packing, the default) and int4_amx_dense (the blocked int4 copy, cpu_kernels.int4_mm), median of 5;
2. the whole prefill (`--rows` tokens, median of `--repeats` forwards) with the dense 4-bit projections on each of
   them, interleaved, and each module kind's wall time in one more forward (forward hooks);
3. the same after a CpuDecoder was built (it moves the streamed weights onto 2 MB pages, kernels/huge_pages.py: what
   eval/bench_cpu.py's warm-up does before it times the prefill).

    taskset -c 0,1 python eval/bench_cpu_amx_prefill.py /tmp/bench-cpu/b-2-densematch-head8 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict

import torch

import moecompress
from moecompress.runtime.experts.packed_group import PackedGroup
from moecompress.runtime.experts.packed_linear import PackedLinear
from moecompress.runtime.kernels import kernel_registry as kr

CONFIGS = {"packed_amx": "0", "int4_amx_dense": "1"}  # MOECOMPRESS_AMX_DENSE_INT4


def use(model, config: str) -> None:
    os.environ[kr.AMX_DENSE_INT4_ENV] = CONFIGS[config]
    for m in model.modules():
        if isinstance(m, PackedGroup):
            m._kernel_cache.clear()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernels(model, rows: int) -> dict:
    """ms per call of each kernel on each distinct 4-bit dense projection shape."""
    out, seen = {}, set()
    for name, m in model.named_modules():
        if not isinstance(m, PackedLinear) or m.bits != 4 or (m.out_features, m.in_features) in seen:
            continue
        seen.add((m.out_features, m.in_features))
        x = torch.randn(rows, m.in_features).to(torch.bfloat16)
        row = {}
        for kernel in (kr.PACKED_AMX, kr.INT4_DENSE):
            if not (kernel.available() and kr._lowbit_shapes(m, torch.bfloat16)):
                continue
            kernel.run(m, x, [0], [rows])  # warm-up (and the int4 copy, made once)
            row[kernel.name] = 1000 * median_time(lambda: kernel.run(m, x, [0], [rows]), 5)
        out[f"{name} {m.out_features}x{m.in_features}"] = row
        print(f"  {name} {m.out_features}x{m.in_features} @ {rows} rows: "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in row.items()), flush=True)
    return out


def breakdown(model, ids) -> dict:
    """Wall seconds per module kind in one forward (outermost module of each kind only)."""
    kinds = {"dense projections": lambda m: isinstance(m, PackedLinear),
             "experts": lambda m: type(m).__name__ == "PackedExperts",
             "attention block": lambda m: type(m).__name__.endswith("Attention"),
             "moe block": lambda m: "Moe" in type(m).__name__ and "Block" in type(m).__name__,
             "lm_head": lambda m: False}
    spent, starts, handles = defaultdict(float), {}, []
    for name, m in model.named_modules():
        kind = next((k for k, test in kinds.items() if test(m)), None)
        if name == "lm_head":
            kind = "lm_head"
        if kind is None:
            continue
        handles.append(m.register_forward_pre_hook(lambda mod, args, k=kind: starts.__setitem__(id(mod), time.perf_counter())))
        handles.append(m.register_forward_hook(
            lambda mod, args, out, k=kind: spent.__setitem__(k, spent[k] + time.perf_counter() - starts[id(mod)])))
    t0 = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    spent["whole forward"] = time.perf_counter() - t0
    for h in handles:
        h.remove()
    return {k: round(1000 * v, 1) for k, v in spent.items()}


def phase(model, ids, repeats: int, label: str) -> dict:
    res: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for c in CONFIGS:  # warm-up: kernels, int4 copy, allocator
        use(model, c)
        model(ids, use_cache=True, logits_to_keep=1)
    for _ in range(repeats):
        for c in CONFIGS:
            use(model, c)
            t0 = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            res[c].append(time.perf_counter() - t0)
    out = {}
    for c in CONFIGS:
        use(model, c)
        out[c] = {"prefill_tok_s": ids.shape[1] / statistics.median(res[c]),
                  "runs_ms": [round(1000 * t) for t in res[c]], "ms_by_module": breakdown(model, ids)}
        print(f"[{label}] {c:15s} prefill {out[c]['prefill_tok_s']:7.0f} tok/s  runs {out[c]['runs_ms']} ms  "
              f"by module {out[c]['ms_by_module']}", flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = moecompress.from_pretrained(args.checkpoint, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.rows), generator=torch.Generator().manual_seed(0))
    result = {"checkpoint": args.checkpoint, "threads": args.threads, "rows": args.rows, "load": os.getloadavg()}
    with torch.no_grad():
        result["kernels_ms"] = kernels(model, args.rows)
        result["file_pages"] = phase(model, ids, args.repeats, "weights as loaded")
        from moecompress.runtime.cpu_step import CpuDecoder

        CpuDecoder(model, 64, 1)  # moves the streamed weights onto huge pages, as bench_cpu's warm-up does
        result["huge_pages"] = phase(model, ids, args.repeats, "after CpuDecoder")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
