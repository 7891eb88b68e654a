"""Tile sweep of the W{2,3,4,8}A8 prefill (runtime/cuda/a8.py, issue 14, session 28) against bf16 grouped_mm and the
default packed path (hopper.py / dequant.py by launch's rules), same run, bench_gpu_prefill's cases and timing.

    PYTHONPATH=. python eval/bench_gpu_a8.py --warm I --of N      # compile every N-th config from I (parallel)
    PYTHONPATH=. python eval/bench_gpu_a8.py --out $OUT --deadline 150

Each case: CUDA-graph replays of 2 calls (2 routings), ROUNDS interleaved rounds x REPEATS replays, median µs per
call. Numerics per setting, first NUM_CHECK tokens: norm-relative difference against a float32 reference with the
exact weights (q - z) * s and no rounding to bf16 (`exact`), and against the default path's output (`vs default`).
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
from bench_gpu_prefill import CASES, time_us  # noqa: E402
from bench_gpu_trace import Setting  # noqa: E402
from test_cuda_kernels import random_experts  # noqa: E402

from moecompress.runtime.cuda.launch import A8Config  # noqa: E402

# (label, config, trans, magic): BM x BN x BK, warps, stages; T: y^T = W xq^T; magic: launch.A8_MAGIC (I2F when off)
CONFIGS = [(f"a8 {'T ' if t else ''}{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"
            f"{'' if m else ' I2F'}", c, t, m)
           for c, t, m in [(A8Config(64, 128, 128, 4, 3), False, True), (A8Config(64, 128, 128, 4, 3), False, False),
                           (A8Config(64, 128, 128, 4, 4), False, True), (A8Config(64, 256, 128, 8, 3), False, True),
                           (A8Config(64, 64, 128, 4, 3), False, True), (A8Config(128, 128, 128, 8, 3), False, True),
                           (A8Config(128, 64, 128, 4, 3), True, True), (A8Config(64, 128, 128, 4, 3), True, True),
                           (A8Config(128, 128, 128, 8, 3), True, True)]]
# session 28's first sweep (before the magic-number promotion and TRANS's own weight layout; I2F promotion) also
# timed 128x128x128 w8 s4, 128x256x128 w8 s3, 128x128x64 w8 s4, 128x128x128 w4 s3, 256x128x128 w8 s3 and T 128x256x128
# w8 s3: all slower than 64x128x128 w4 s3 on every case (eval/results/gpu_prefill_a8_s28.md)
ROUNDS, REPEATS, NUM_CHECK = 5, 3, 96


def a8_setting(config, trans, magic=True) -> dict:
    return dict(PREFILL_A8=True, PREFILL_A8_MIN_ROWS=0, A8=config, A8_TRANS=trans, A8_MAGIC=magic)


def build(model: str, mix: str, tokens: int, template=None):
    shape = SHAPES[model]
    layer = random_experts(shape["experts"], shape["hidden"], shape["inter"], bits_for(shape["experts"], MIXES[mix]),
                           group_size=GROUP_SIZE, device="cuda", template=template)
    return shape, layer, routings(tokens, shape, 2)


def exact(layer, x, idx, w) -> torch.Tensor:
    """float32, exact weights (q - z) * s, no bf16 rounding of h or y; [tokens, H]."""
    from moecompress.format.pack import dequantize

    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    ws = {}
    for proj in ("gate_up", "down"):
        for g in getattr(layer, proj).children():
            for slot, e in enumerate(g.experts):
                ws[proj, e] = (g, slot)

    def weight(proj, e):
        g, slot = ws[proj, e]
        z = None if g.symmetric else g.zeros[slot:slot + 1]
        return dequantize(g.qweight[slot:slot + 1], g.scales[slot:slot + 1], z, g.bits, g.group_size,
                          g.in_features, torch.float32)[0]

    for e in sorted({e for (_, e) in ws}):
        t, k = (idx == e).nonzero(as_tuple=True)
        if t.numel():
            hg, hu = (x[t].float() @ weight("gate_up", e).t()).chunk(2, dim=-1)
            out.index_add_(0, t, (torch.nn.functional.silu(hg) * hu @ weight("down", e).t()) * w[t, k, None])
    return out


def run_case(model, mix, tokens, rows, configs) -> None:
    experts, config = bf16_experts(SHAPES[model])
    shape, layer, inputs = build(model, mix, tokens, template=experts)
    calls = [lambda x=x, i=i, w=w: layer(x, i, w) for x, i, w in inputs]
    x0, i0, w0 = (t[:NUM_CHECK] for t in inputs[0])
    with torch.no_grad():
        ref = exact(layer, x0, i0, w0)
    settings = {"default (packed, bf16 MMA)": {}, **{label: a8_setting(c, t, m) for label, c, t, m in configs}}
    runners, info, default_out = {}, {}, None
    for label, setting in settings.items():
        with Setting(**setting):
            try:
                with torch.no_grad():
                    out = layer(x0, i0, w0).float()
                    full = calls[0]().float()
                if default_out is None:
                    default_out = full
                info[label] = dict(rel_exact=float((out - ref).norm() / ref.norm()),
                                   rel_vs_default=float((full - default_out).norm() / default_out.norm()))
                runners[label] = runner(calls, graph=True)
            except Exception as exc:  # noqa: BLE001
                print(f"{model} {mix} T={tokens} {label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                info[label] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    config._experts_implementation = "grouped_mm"
    bcalls = [lambda x=x, i=i, w=w: experts(x, i, w.to(x.dtype)) for x, i, w in inputs]
    try:
        runners["bf16 grouped_mm"] = runner(bcalls, graph=True)
        info["bf16 grouped_mm"] = {}
    except Exception as exc:  # noqa: BLE001
        print(f"bf16: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    times = {label: [] for label in runners}
    for _ in range(ROUNDS):
        for label, run in runners.items():
            times[label].append(time_us(run, len(calls)))
    bf16 = statistics.median(times["bf16 grouped_mm"]) if "bf16 grouped_mm" in times else float("nan")
    for label, ts in times.items():
        us = statistics.median(ts)
        row = dict(model=model, mix=mix, tokens=tokens, setting=label, us=us, us_min=min(ts), us_max=max(ts),
                   vs_bf16=bf16 / us, **info.get(label, {}))
        rows.append(row)
        print(f"{model:14s} {mix:9s} T={tokens:5d} {label:32s} {us:9.1f} us ({min(ts):.0f}-{max(ts):.0f}) "
              f"x{bf16 / us:.3f} of bf16  {info.get(label, {})}", flush=True)
    for label, i in info.items():
        if "error" in i:
            rows.append(dict(model=model, mix=mix, tokens=tokens, setting=label, **i))
    del runners, layer, experts, calls
    gc.collect()
    torch.cuda.empty_cache()


def report(rows: list, env: dict) -> str:
    lines = ["# W{2,3,4,8}A8 prefill tile sweep (`eval/bench_gpu_a8.py`)", "",
             f"Device: {env.get('gpu')}; torch {env.get('torch')}, Triton {env.get('triton')}. {ROUNDS} interleaved "
             f"rounds x {REPEATS} graph replays of 2 calls; median (min-max) µs per call. exact: norm-relative "
             f"difference to a float32 reference with exact weights, first {NUM_CHECK} tokens.", "",
             "| model | bits | tokens | setting | µs (min-max) | bf16 / this | rel. diff exact | vs default |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "us" not in r:
            lines.append(f"| {r['model']} | {r['mix']} | {r['tokens']} | {r['setting']}: "
                         f"{r.get('error', '')[:120]} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['mix']} | {r['tokens']} | {r['setting']} | {r['us']:.0f} "
                     f"({r['us_min']:.0f}-{r['us_max']:.0f}) | {r['vs_bf16']:.3f}x | "
                     f"{r.get('rel_exact', float('nan')):.1e} | {r.get('rel_vs_default', float('nan')):.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results")
    parser.add_argument("--name", default="gpu_prefill_a8_sweep")
    parser.add_argument("--deadline", type=float, default=1e9)
    parser.add_argument("--cases", type=int, nargs="*")
    parser.add_argument("--configs", type=int, nargs="*", help="indices into CONFIGS (default all)")
    parser.add_argument("--warm", type=int)
    parser.add_argument("--of", type=int, default=1)
    parser.add_argument("--best", action="store_true", help="print the fastest config on the first case as "
                        "MOECOMPRESS_A8_TILE's text, from --out's json")
    args = parser.parse_args(argv)
    configs = [CONFIGS[i] for i in args.configs] if args.configs is not None else CONFIGS
    cases = args.cases if args.cases is not None else range(len(CASES))
    if args.best:
        rows = json.loads((args.out / f"{args.name}.json").read_text())["rows"]
        first = [r for r in rows if "us" in r and r["setting"].startswith("a8")]
        first = [r for r in first if (r["model"], r["mix"], r["tokens"]) == (first[0]["model"], first[0]["mix"],
                                                                             first[0]["tokens"])]
        best = min(first, key=lambda r: r["us"])
        c, t, m = next((c, t, m) for label, c, t, m in CONFIGS if label == best["setting"])
        print(f"{c.block_m}x{c.block_n}x{c.block_k}:w{c.num_warps}:s{c.num_stages}{':t' if t else ''} "
              f"{int(m)}")
        return
    if args.warm is not None:
        mine = ([("default", None, None, None)] if args.warm == 0 else []) + configs[args.warm::args.of]
        for i in cases:
            shape, layer, inputs = build(*CASES[i])
            for label, c, t, m in mine:
                with Setting(**(a8_setting(c, t, m) if c is not None else {})), torch.no_grad():
                    try:
                        layer(*inputs[0])
                    except Exception as exc:  # noqa: BLE001
                        print(f"warm {CASES[i]} {label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            torch.cuda.synchronize()
            del layer, inputs
            torch.cuda.empty_cache()
        print(f"warm {args.warm}/{args.of}: done", flush=True)
        return
    t0 = time.time()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list = []
    for i in cases:
        if time.time() - t0 > args.deadline:
            rows.append(dict(model=CASES[i][0], mix=CASES[i][1], tokens=CASES[i][2], setting="not run (deadline)"))
            continue
        try:
            run_case(*CASES[i], rows, configs)
        except Exception as exc:  # noqa: BLE001
            print(f"case {CASES[i]}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            rows.append(dict(model=CASES[i][0], mix=CASES[i][1], tokens=CASES[i][2], setting="failed",
                             error=f"{type(exc).__name__}: {str(exc)[:300]}"))
            gc.collect()
            torch.cuda.empty_cache()
        (args.out / f"{args.name}.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
        (args.out / f"{args.name}.md").write_text(report(rows, env))
    print(report(rows, env))


if __name__ == "__main__":
    main()
