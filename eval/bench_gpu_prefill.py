"""Prefill of one MoE layer on a GPU (issue 14, session 27): where the time goes, and dequantize-then-GEMM
(runtime/cuda/dequant.py) against the fused kernel (hopper.py on sm90) and transformers' bf16 experts, same run.

    PYTHONPATH=. python eval/bench_gpu_prefill.py --warm CASE      # compile one case's kernels (parallel warm-up)
    PYTHONPATH=. python eval/bench_gpu_prefill.py --out $OUT --deadline 100   # gpu_prefill.md / .json (~2.5 min)

Cases: Mixtral-8x7B (hidden 4096, 8 experts of 14336, top-2) at 2,048 tokens, mix 25 % 2 / 50 % 3 / 25 % 4-bit and
uniform 4-bit (group 128, random packed weights: eval/bench_gpu.py's layers); for the rule (launch.prefill_dequant),
Mixtral mix at 1,024 and 512 tokens and Qwen3-30B-A3B mix at 2,048 (256 / 128 / 128 rows per expert). Each call of a
setting gets one of 2 routings (the calls alternate). Timing: CUDA-graph replays of both calls (bf16 "eager": eager,
it syncs), ROUNDS interleaved rounds (every
setting once per round, in order), REPEATS replays per round between CUDA events; the median of the rounds.
Components (Mixtral, same rounds, eager): the dequantization of both projections alone; grouped_mm alone on the
dequantized weights (gate_up, gate, down); per-expert torch.mm alone; one dense bf16 matmul of the same FLOPs (the
GEMM ceiling at these sizes). Check: each setting's output against the fused path's (norm-relative difference).
Profile (torch.profiler, one call of the fused and grouped settings): device µs per kernel name.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
sys.path.insert(0, str(ROOT))
from bench_gpu import GROUP_SIZE, MIXES, SHAPES, bf16_experts, bits_for, routings, runner  # noqa: E402
from bench_gpu_trace import Setting  # noqa: E402
from test_cuda_kernels import random_experts  # noqa: E402  (bench_gpu put tests/ on the path)


CASES = [("mixtral-8x7b", "mix 2/3/4", 2048), ("mixtral-8x7b", "4-bit", 2048), ("mixtral-8x7b", "mix 2/3/4", 1024),
         ("mixtral-8x7b", "mix 2/3/4", 512), ("qwen3-30b-a3b", "mix 2/3/4", 2048)]
SETTINGS = {"fused (hopper.py)": dict(PREFILL_DEQUANT=False),
            "dequant grouped": dict(PREFILL_DEQUANT=True, PREFILL_DEQUANT_MIN_ROWS=0, PREFILL_DEQUANT_MAX_BITS=16)}
# session 27's run also timed two forms since removed from dequant.py (its docstring): "dequant grouped overlap" (the
# down projection dequantized on a side stream) and "dequant experts" (one torch.mm per expert after a host sync)
EAGER_ONLY = {"bf16 eager"}
DEQUANT_TILES = [(32, 256, 4), (128, 128, 8), (64, 256, 8)]  # dequant.py's tile (rows, K, warps) candidates
ROUNDS, REPEATS = 5, 3


def sync():
    torch.cuda.synchronize()


def time_us(run, n_calls: int) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.no_grad():
        a.record()
        for _ in range(REPEATS):
            run()
        b.record()
        sync()
    return a.elapsed_time(b) * 1000 / REPEATS / n_calls


def components(layer, inputs, top_k: int) -> dict:
    """Eager runners of the parts of the dequantize-then-GEMM path (one routing: the first)."""
    from moecompress.runtime.cuda import dequant

    x, idx, w = inputs[0]
    first, down = layer.gate_up, layer.down
    order, _, counts, offs, _ = dequant._route(layer, idx.reshape(-1))
    xs = x[order // top_k].contiguous()
    w1 = dequant._dequantize_all(first, x.dtype, x.device)
    w2 = dequant._dequantize_all(down, x.dtype, x.device)
    host_counts = counts.tolist()

    def grouped():
        h = layer._gate_fn(layer, torch._grouped_mm(xs, w1.transpose(-2, -1), offs=offs))
        return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)

    def per_expert():
        row = 0
        for p, c in enumerate(host_counts):
            if c:
                h = layer._gate_fn(layer, xs[row:row + c] @ w1[p].t())
                h @ w2[p].t()
                row += c

    dense_a = torch.randn(xs.shape[0], w1.shape[2], device=x.device).to(x.dtype)
    dense_b1, dense_b2 = w1[0], w2[0]  # one expert's weights: [N1, K1], [N2, K2]

    def dense():
        h = layer._gate_fn(layer, dense_a @ dense_b1.t())
        h @ dense_b2.t()

    def deq(tile=None):
        saved = dequant.DEQUANT_BN, dequant.DEQUANT_BK, dequant.DEQUANT_WARPS
        if tile:
            dequant.DEQUANT_BN, dequant.DEQUANT_BK, dequant.DEQUANT_WARPS = tile
        try:
            dequant._dequantize_all(first, x.dtype, x.device)
            dequant._dequantize_all(down, x.dtype, x.device)
        finally:
            dequant.DEQUANT_BN, dequant.DEQUANT_BK, dequant.DEQUANT_WARPS = saved

    moved = sum(t.nbytes for m in (first, down) for g in m.children() for t in g.buffers()) + w1.nbytes + w2.nbytes
    tiles = {f"part: dequantize both projections, tile {bn}x{bk} w{wp}": (lambda t=(bn, bk, wp): deq(t), moved)
             for bn, bk, wp in DEQUANT_TILES}
    for _, (fn, _) in tiles.items():
        fn()  # compile outside the timed rounds
    return {f"part: dequantize both projections (default tile {dequant.DEQUANT_BN}x{dequant.DEQUANT_BK} "
            f"w{dequant.DEQUANT_WARPS})": (deq, moved), **tiles,
            "part: grouped_mm on dequantized weights": (grouped, None),
            "part: per-expert torch.mm on dequantized weights": (per_expert, None),
            "part: one dense bf16 matmul, same FLOPs": (dense, None)}


def run_case(model: str, mix: str, tokens: int, rows: list, profile: bool) -> None:
    shape = SHAPES[model]
    experts, config = bf16_experts(shape)
    layer = random_experts(shape["experts"], shape["hidden"], shape["inter"], bits_for(shape["experts"], MIXES[mix]),
                           group_size=GROUP_SIZE, device="cuda", template=experts)
    inputs = routings(tokens, shape, 2)
    calls = [lambda x=x, i=i, w=w: layer(x, i, w) for x, i, w in inputs]
    runners, outs, info = {}, {}, {}
    for label, setting in SETTINGS.items():
        with Setting(**setting):
            try:
                with torch.no_grad():
                    outs[label] = calls[0]().float()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with torch.no_grad():
                    calls[0]()
                sync()
                info[label] = {"workspace_MB": (torch.cuda.max_memory_allocated() - base) / 1e6}
                runners[label] = runner(calls, graph=label not in EAGER_ONLY)
            except Exception as exc:  # noqa: BLE001 (report, go on with the other settings)
                print(f"{model} {mix} T={tokens} {label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                info[label] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    ref = outs.get("fused (hopper.py)")
    for label, out in outs.items():
        if ref is not None:
            info[label]["rel_diff_vs_fused"] = float((out - ref).norm() / ref.norm())
    for impl in ("grouped_mm", "eager") if shape["experts"] <= 64 else ("grouped_mm",):  # (eager: a loop of 128)
        config._experts_implementation = impl
        bcalls = [lambda x=x, i=i, w=w, impl=impl: experts(x, i, w.to(x.dtype)) for x, i, w in inputs]
        label = f"bf16 {impl}"
        try:
            runners[label] = runner(bcalls, graph=label not in EAGER_ONLY)
            info[label] = {}
        except Exception as exc:  # noqa: BLE001
            print(f"{label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    config._experts_implementation = "grouped_mm"
    n_calls = {label: len(calls) for label in runners}
    if model == "mixtral-8x7b" and tokens == 2048:
        for label, (fn, moved) in components(layer, inputs, shape["top_k"]).items():
            runners[label] = fn
            n_calls[label] = 1
            info[label] = {"bytes_moved_MB": moved / 1e6} if moved else {}
    times = {label: [] for label in runners}
    settings = {label: SETTINGS.get(label, {}) for label in runners}
    for _ in range(ROUNDS):
        for label, run in runners.items():
            with Setting(**settings[label]):
                times[label].append(time_us(run, n_calls[label]))
    flops = 2 * tokens * shape["top_k"] * 3 * shape["hidden"] * shape["inter"]
    bf16_best = min(statistics.median(times[k]) for k in ("bf16 grouped_mm", "bf16 eager") if k in times)
    for label, ts in times.items():
        us = statistics.median(ts)
        row = dict(model=model, mix=mix, tokens=tokens, setting=label, us=us, us_min=min(ts), us_max=max(ts),
                   rounds=len(ts), vs_bf16_best=bf16_best / us, TFLOPs=flops / us / 1e6, **info.get(label, {}))
        if "bytes_moved_MB" in row:
            row["GBps"] = row["bytes_moved_MB"] / us * 1e3
        rows.append(row)
        print(f"{model:14s} {mix:9s} T={tokens:5d} {label:48s} {us:9.1f} us ({min(ts):.0f}-{max(ts):.0f})  "
              f"x{bf16_best / us:.3f} of bf16 best  {info.get(label, {})}", flush=True)
    if profile:
        rows.append(dict(model=model, mix=mix, tokens=tokens, setting="profile", kernels=profiles(calls, settings)))
    del runners, layer, experts, calls
    gc.collect()
    torch.cuda.empty_cache()


def profiles(calls, settings: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for label in SETTINGS:
        with Setting(**settings.get(label, SETTINGS[label])), torch.no_grad():
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                calls[0]()
                sync()
        per = {}
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if t and t > 0:
                per[e.key[:90]] = [e.count, round(t, 1)]
        out[label] = dict(sorted(per.items(), key=lambda kv: -kv[1][1])[:12])
    return out


def report(rows: list, info: dict) -> str:
    lines = ["# Prefill of one MoE layer: dequantize-then-GEMM against the fused kernel and bf16 "
             "(`eval/bench_gpu_prefill.py`)", "",
             f"Device: {info.get('gpu')}; torch {info.get('torch')}, Triton {info.get('triton')}, transformers "
             f"{info.get('transformers')}. {ROUNDS} interleaved rounds x {REPEATS} replays of 2 calls (2 routings); "
             f"median (min-max) µs per call; graph-replayed except eager-only settings.", "",
             "| model | bits | tokens | setting | µs per call (min-max) | bf16 best / this | TFLOP/s | workspace MB "
             "| rel. diff vs fused |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["setting"] == "not run (deadline)":
            lines.append(f"| {r['model']} | {r['mix']} | {r['tokens']} | not run (the call's deadline) | | | | | |")
        if r["setting"] == "failed":
            lines.append(f"| {r['model']} | {r['mix']} | {r['tokens']} | failed: {r['error'][:150]} | | | | | |")
        if r["setting"] in ("profile", "not run (deadline)", "failed"):
            continue
        extra = f" ({r['GBps']:.0f} GB/s)" if "GBps" in r else ""
        lines.append(f"| {r['model']} | {r['mix']} | {r['tokens']} | {r['setting']}{extra} | {r['us']:.0f} "
                     f"({r['us_min']:.0f}-{r['us_max']:.0f}) | {r['vs_bf16_best']:.3f}x | {r['TFLOPs']:.0f} | "
                     f"{r.get('workspace_MB', float('nan')):.0f} | {r.get('rel_diff_vs_fused', float('nan')):.1e} |")
    for r in rows:
        if r["setting"] == "profile":
            lines += ["", f"Profile, {r['model']} {r['mix']} T={r['tokens']} (one call; kernel: count, device µs):"]
            for label, per in r["kernels"].items():
                lines.append(f"- {label}: " + "; ".join(f"`{k}` {c} / {t:.0f}" for k, (c, t) in per.items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results")
    parser.add_argument("--name", default="gpu_prefill")
    parser.add_argument("--deadline", type=float, default=1e9, help="seconds: no new case starts after this")
    parser.add_argument("--cases", type=int, nargs="*", help="indices into CASES (default all)")
    parser.add_argument("--warm", type=int, help="compile case CASES[i]'s kernels for every setting and exit")
    args = parser.parse_args(argv)
    if args.warm is not None:
        model, mix, tokens = CASES[args.warm]
        shape = SHAPES[model]
        layer = random_experts(shape["experts"], shape["hidden"], shape["inter"],
                               bits_for(shape["experts"], MIXES[mix]), group_size=GROUP_SIZE, device="cuda")
        x, idx, w = routings(tokens, shape, 1)[0]
        for label, setting in SETTINGS.items():
            with Setting(**setting), torch.no_grad():
                layer(x, idx, w)
        sync()
        print(f"warm {CASES[args.warm]}: done", flush=True)
        return
    t0 = time.time()
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "transformers": __import__("transformers").__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list = []
    for i in args.cases if args.cases is not None else range(len(CASES)):
        if time.time() - t0 > args.deadline:
            print(f"deadline: case {CASES[i]} not run", flush=True)
            rows.append(dict(model=CASES[i][0], mix=CASES[i][1], tokens=CASES[i][2], setting="not run (deadline)"))
            continue
        try:
            run_case(*CASES[i], rows, profile=i == 0)
        except Exception as exc:  # noqa: BLE001 (a failed case is reported; the others still run)
            print(f"case {CASES[i]}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            rows.append(dict(model=CASES[i][0], mix=CASES[i][1], tokens=CASES[i][2], setting="failed",
                             error=f"{type(exc).__name__}: {str(exc)[:300]}"))
            gc.collect()
            torch.cuda.empty_cache()
        (args.out / f"{args.name}.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))
        (args.out / f"{args.name}.md").write_text(report(rows, info))
    print(report(rows, info))


if __name__ == "__main__":
    main()
