"""GPU benchmark of the packed-expert kernels (moecompress/runtime/cuda/) against transformers' bf16 experts.

Run on a CUDA machine (results: eval/results/gpu.md, copied from --out):

    PYTHONPATH=. python eval/bench_gpu.py --out $OUT --skip tinygemm    # everything below (about 5 minutes)
    PYTHONPATH=. python eval/bench_gpu.py --out $OUT --skip tinygemm variants            # layer table (~1 min)
    PYTHONPATH=. python eval/bench_gpu.py --out $OUT --skip tinygemm layers --sweeps tables prefill   # sweeps
    PYTHONPATH=. python eval/bench_gpu.py --out $OUT --quick            # Qwen3 shape only in the layer table
    PYTHONPATH=. python eval/bench_gpu.py --out $OUT --skip tinygemm layers --sweeps adopt   # candidate defaults
    PYTHONPATH=. python eval/bench_gpu.py --out $OUT --skip tinygemm --sweeps hopper --tokens 2048  # session 23:
        # the Hopper prefill kernel against packed_kernel, then the prefill table (~2.5 min with `--warm hopper:LABEL`
        # per setting in parallel first: .gpu_carry/s23/run3.sh; eval/results/gpu_hopper.md is its gpu.md)
    PYTHONPATH=. python eval/bench_gpu.py --out $OUT --skip tinygemm --sweeps prefill   # session 22's gpu.md (~1 min
        # after `--warm prefill:LABEL` per setting in parallel: .gpu_carry/s22/run2.sh)

1. Ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 matmul, measured here.
2. Sweeps (Qwen3 and Mixtral layers; --sweeps picks them): "pair": the pair path's tile (columns per program,
   warps, groups per program = split of K, lop3 on/off), pair path against the routing-table path at 4 and 16
   tokens; "tables": Mixtral at 16 tokens, the pair path against the routing-table path's decode tiles (the tables
   path then takes layers above 2 pairs per expert if it wins); "prefill": tiles per row-block height, the SiLU gate
   fused into the first projection or not (`--warm prefill:LABEL` compiles one setting); "hopper": the sm90 prefill
   kernel (hopper.py) against packed_kernel, graph-replayed, with each setting's output against packed_kernel's
   (`--warm hopper:LABEL`); "adopt"
   (not in the default list): candidate defaults against the current ones on every decode shape, with a verdict.
   The setting with the lowest geometric mean of each sweep is used for the rest of the run (printed; launch.py's
   defaults are the ones chosen on an H200). Also the pair path against the tables path at real sizes (rel. diff).
3. MoE layers with real sizes: Qwen3-30B-A3B (hidden 2048, 128 experts of 768, top-8) and Mixtral-8x7B (hidden
   4096, 8 experts of 14336, top-2), bit mix 25 % 2 / 50 % 3 / 25 % 4-bit (per expert, both projections) and
   uniform 4-bit, group 128, random packed weights: decode 1/4/16 tokens and prefill 2048 tokens. Each timed call
   gets a different routing (16 routings rotated: the active experts change, so they come from HBM, not the 60 MB
   L2). Every shape is timed eager and as CUDA-graph replays of the back-to-back calls (16 decode, 2 prefill).
   Baseline: transformers' Qwen3MoeExperts in bf16 with each experts implementation (grouped_mm, batched_mm where it
   fits in memory, eager), graph-captured where it captures; the fastest counts ("speedup"); "speedup eager" is
   ours eager against bf16's fastest eager (a model's prefill runs eagerly). Floor: packed bytes of the distinct active
   experts / measured copy bandwidth. Memory: resident bytes of a layer's experts (torch.cuda.memory_allocated) vs
   their packed bytes; the transient workspace of a call.
End to end (models, forward and generation, eager and CUDA graph): eval/bench_gpu_e2e.py.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from test_cuda_kernels import random_experts  # noqa: E402  (the tests' random layer builder)

from moecompress.runtime.cuda import launch  # noqa: E402

SHAPES = {"qwen3-30b-a3b": dict(hidden=2048, experts=128, inter=768, top_k=8),
          "mixtral-8x7b": dict(hidden=4096, experts=8, inter=14336, top_k=2)}
MIXES = {"mix 2/3/4": (0.25, 0.5, 0.25), "4-bit": (0.0, 0.0, 1.0)}
GROUP_SIZE = 128
ROTATE = 16


def bits_for(n: int, mix: tuple[float, float, float], seed: int = 0) -> list[int]:
    counts = [round(n * f) for f in mix]
    counts[1] = n - counts[0] - counts[2]
    bits = [2] * counts[0] + [3] * counts[1] + [4] * counts[2]
    random.Random(seed).shuffle(bits)
    return bits


def sync():
    torch.cuda.synchronize()


def runner(calls, graph: bool):
    """A function running `calls` once each, back to back: a CUDA-graph replay of all of them, or eagerly (each call
    run once first: compiles, warms the allocator)."""
    with torch.no_grad():
        for c in calls:
            c()
        sync()
        if not graph:
            return lambda: [c() for c in calls]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(stream)
        sync()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in calls:
                c()
        sync()
        return g.replay


def time_calls(calls, graph: bool, repeats: int = 7) -> float:
    """Median microseconds per call of running `calls` back to back, eagerly or as one CUDA graph of all of them."""
    run = runner(calls, graph)
    with torch.no_grad():
        run()
        sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            run()
            end.record()
            sync()
            times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times)


def ceilings() -> dict:
    a = torch.randint(0, 255, (2 << 30,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = time_calls([lambda: b.copy_(a)], graph=False, repeats=10)
    del a, b
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_us = time_calls([lambda: x @ y], graph=False, repeats=10)
    del x, y
    torch.cuda.empty_cache()
    return {"gpu": torch.cuda.get_device_name(), "copy_GBps": 2 * (2 << 30) / us / 1e3,
            "bf16_TFLOPs": 2 * 8192 ** 3 / mm_us / 1e6, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "transformers": __import__("transformers").__version__}


def routings(tokens: int, shape: dict, n: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(n):
        logits = torch.randn(tokens, shape["experts"], device="cuda", generator=gen)
        w, idx = torch.softmax(logits, -1).topk(shape["top_k"], dim=-1)
        x = torch.randn(tokens, shape["hidden"], device="cuda", generator=gen).to(torch.bfloat16)
        out.append((x, idx, (w / w.sum(-1, keepdim=True)).float()))
    return out


def packed_bytes_per_expert(layer) -> dict[int, int]:
    per = {}
    for name in layer.proj_names:
        for group in getattr(layer, name).children():
            n = len(group.experts)
            size = sum(b.nbytes for b in group.buffers()) // max(1, n)
            for e in group.experts:
                per[e] = per.get(e, 0) + size
    return per


def bf16_experts(shape: dict):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=shape["hidden"], moe_intermediate_size=shape["inter"],
                            num_experts=shape["experts"], num_experts_per_tok=shape["top_k"], hidden_act="silu")
    with torch.device("cuda"):
        experts = Qwen3MoeExperts(config).to(torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, shape["hidden"] ** -0.5)
        experts.down_proj.normal_(0, shape["inter"] ** -0.5)
    return experts, config


def _try_graph(calls) -> float | None:
    """time_calls as one CUDA graph, None where the calls do not capture."""
    try:
        return time_calls(calls, graph=True)
    except Exception:  # noqa: BLE001 (not capturable: eager only)
        torch.cuda.synchronize()
        return None


def time_bf16(experts, config, shape, inputs, tokens) -> dict:
    """Every transformers experts implementation that fits; graph replay where it captures."""
    results = {}
    expert_bytes = 3 * shape["hidden"] * shape["inter"] * 2
    for impl in ("grouped_mm", "batched_mm", "eager"):
        if impl == "batched_mm" and tokens * shape["top_k"] * expert_bytes > 24e9:
            continue  # gathers one weight copy per (token, expert) pair
        if impl == "eager" and tokens > 1 and shape["experts"] > 64:
            continue
        config._experts_implementation = impl
        calls = [lambda x=x, i=i, w=w: experts(x, i, w.to(x.dtype)) for x, i, w in inputs]
        try:
            eager = time_calls(calls, graph=False)
        except Exception as exc:  # noqa: BLE001 (report, do not stop the benchmark)
            results[impl] = {"error": f"{type(exc).__name__}: {str(exc)[:100]}"}
            continue
        graph = _try_graph(calls) if impl != "eager" else None  # eager syncs on the host: not capturable
        results[impl] = {"eager_us": eager, "graph_us": graph}
        gc.collect()
        torch.cuda.empty_cache()
    return results


def layer_rows(args, peak, rows: list, write=lambda: None) -> list[dict]:
    for model, shape in SHAPES.items():
        experts, config = bf16_experts(shape)
        for mix_name, mix in MIXES.items():
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            layer = random_experts(shape["experts"], shape["hidden"], shape["inter"], bits_for(shape["experts"], mix),
                                   group_size=GROUP_SIZE, device="cuda", template=experts)
            sync()
            resident = torch.cuda.memory_allocated() - before
            per_expert = packed_bytes_per_expert(layer)
            packed = sum(per_expert.values())
            for tokens in args.tokens:
                inputs = routings(tokens, shape, ROTATE if tokens <= 16 else 2)
                active = statistics.mean(sum(per_expert[e] for e in set(i.flatten().tolist())) for _, i, _ in inputs)
                calls = [lambda x=x, i=i, w=w: layer(x, i, w) for x, i, w in inputs]
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                eager = time_calls(calls, graph=False)
                workspace = torch.cuda.max_memory_allocated() - base
                graph = _try_graph(calls)
                ours = graph if graph is not None else eager
                bf16 = time_bf16(experts, config, shape, inputs, tokens)
                best = min(((k, min(t for t in (v["eager_us"], v["graph_us"]) if t)) for k, v in bf16.items()
                            if "eager_us" in v), key=lambda kv: kv[1])
                floor = active / (peak * 1e3)
                row = dict(model=model, mix=mix_name, tokens=tokens, ours_eager_us=eager, ours_graph_us=graph,
                           bf16=bf16, bf16_best=best[0], bf16_best_us=best[1], speedup=best[1] / ours,
                           active_MB=active / 1e6, floor_us=floor, over_floor=ours / floor,
                           bw_fraction=active / (ours * 1e3) / peak, resident_MB=resident / 1e6,
                           packed_MB=packed / 1e6, workspace_MB=workspace / 1e6)
                bf16_eager = min(v["eager_us"] for v in bf16.values() if "eager_us" in v)
                row["speedup_eager"] = bf16_eager / eager  # eager against eager (prefill runs eagerly in a model)
                if tokens > 16:
                    flops = 2 * tokens * shape["top_k"] * 3 * shape["hidden"] * shape["inter"]
                    row["ours_TFLOPs"] = flops / ours / 1e6
                    row["bf16_TFLOPs"] = flops / best[1] / 1e6
                rows.append(row)
                write()
                print(f"{model:14s} {mix_name:9s} T={tokens:5d} ours {ours:9.1f} us (eager {eager:9.1f}) "
                      f"bf16 {best[0]} {best[1]:9.1f} us  x{row['speedup']:.2f}  floor {floor:7.1f} us "
                      f"bw {row['bw_fraction']:.2f}", flush=True)
            del layer
            gc.collect()
            torch.cuda.empty_cache()
        del experts
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def _layer(model: str, mix: str, template=None):
    shape = SHAPES[model]
    return random_experts(shape["experts"], shape["hidden"], shape["inter"], bits_for(shape["experts"], MIXES[mix]),
                          group_size=GROUP_SIZE, device="cuda", template=template)


def _sweep(name: str, settings: dict, cases: list, rows: list, scores: dict | None = None,
           graph: bool | None = None, check: bool = False) -> dict:
    """Time every setting (a dict of launch attributes) on every case (model, mix, tokens); set launch to the
    setting with the lowest geometric mean over the cases and return it (scores: filled with each setting's µs per
    case, in the order of cases). graph: time CUDA-graph replays (default: up to 16 tokens). check: each setting's
    output against the first setting's on the first input (norm-relative difference, a row of the table)."""
    saved = {k: getattr(launch, k) for k in next(iter(settings.values()))}
    score = {}
    for model, mix, tokens in cases:
        layer = _layer(model, mix)
        inputs = routings(tokens, SHAPES[model], ROTATE if tokens <= 16 else 2)
        calls = [lambda x=x, i=i, w=w: layer(x, i, w) for x, i, w in inputs]
        first = None
        for label, setting in settings.items():
            for k, v in setting.items():
                setattr(launch, k, v)
            try:
                if check:
                    with torch.no_grad():
                        out = calls[0]().float()
                    first = out if first is None else first
                    diff = float((out - first).norm() / first.norm())
                    rows.append(dict(tokens=tokens, variant=f"{name}: {label} vs {next(iter(settings))}, rel. "
                                                            f"difference ({model}, {mix})", us=diff))
                    print(f"{name} {label} {model} {mix}: rel diff {diff:.2e}", flush=True)
                us = time_calls(calls, graph=tokens <= 16 if graph is None else graph)
            except Exception as exc:  # noqa: BLE001 (a setting that does not compile or run: reported, skipped)
                print(f"{name} {label} {model} {mix} T={tokens}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                us = float("inf")
            score.setdefault(label, []).append(us)
            if us != float("inf"):
                rows.append(dict(tokens=tokens, variant=f"{name}: {label} ({model}, {mix})", us=us))
            print(f"{name:8s} {label:28s} {model:14s} {mix:9s} T={tokens:5d} {us:9.1f} us", flush=True)
            for k, v in saved.items():
                setattr(launch, k, v)
        del layer, calls
        gc.collect()
        torch.cuda.empty_cache()
    if scores is not None:
        scores.update(score)
    ok = {k: statistics.geometric_mean(v) for k, v in score.items() if all(t != float("inf") for t in v)}
    if not ok:
        print(f"{name}: no setting ran", flush=True)
        return None
    best = min(ok, key=ok.get)
    for k, v in settings[best].items():
        setattr(launch, k, v)
    rows.append(dict(tokens=0, variant=f"{name}: chosen {best}", us=float("nan")))
    print(f"{name}: chosen {best} {settings[best]}", flush=True)
    return settings[best]


def variant_rows(args) -> list[dict]:
    """Tile sweeps (args.sweeps); the best setting of each sweep becomes launch's default for the rest of the run."""
    rows = []
    if "pair" in args.sweeps:
        _pair_sweeps(rows)
    if "tables" in args.sweeps:
        _tables_sweep(rows)
    if "prefill" in args.sweeps:
        _prefill_sweep(rows)
    if "adopt" in args.sweeps:
        _adopt_sweep(rows)
    if "hopper" in args.sweeps:
        _sweep("hopper", hopper_settings(), PREFILL_CASES, rows, graph=True, check=True)
    return rows


# the Hopper prefill (hopper.wgmma_kernel, session 23) against packed_kernel: tile rows (BNT, two tiles per
# program), warps, stages of x's cp.async pipeline, the largest row block
# session 23 (H200, graph µs, Qwen3 mix / 4-bit, Mixtral mix / 4-bit). Call 1, words from global memory half a step
# ahead: packed_kernel 1453 / 1249 / 7594 / 6297; 128 w8 s3 1278 / 1123 / 5765 / 4934; 64 w4 s3 (one warpgroup)
# 1393 / 1241 / 5644 / 4988; s4 1278 / 1132 / 5738 / 4965; blocks of 64 rows 1206 / 1148 / 6514 / 6058. Call 2,
# words by cp.async into shared memory (3 bits too): 128 w8 s3 1290 / 1000 / 6205 / 4491, s4 1300 / 1001 / 6179 /
# 4417, rows 64 1420 / 1140 / 8093 / 6213; the 3-bit words went back to registers afterwards (hopper.py). Call 3:
# packed_kernel 1450 / 1249 / 7546 / 6257, 128 w8 s4 1259 / 990 / 6026 / 4389. gpu2 helper: dequantization into
# 1.0's mantissa (launch.HOPPER_MANTISSA) against the magic-number form (the first setting: the check's reference,
# equal bit for bit; measured so): 1192 / 971 / 5545 / 4301 -> 1098 / 881 / 4765 / 3660 (gpu_hopper_mantissa.md);
# ("packed_kernel": (None, 0, True, False) times packed_kernel; "magic": MANTISSA False). Session 24, call 1: each
# tile's wgmma in two halves (a "split" setting, since removed: launch.py's note) 1110 / 882 / 4810 / 3680 -> 1120 /
# 909 / 5080 / 4040 (eval/results/gpu_hopper_split.md); call 2: split K of the down projection
# (launch.HOPPER_SPLIT_K) against none (the first setting: the check's reference), eval/results/gpu.md
HOPPER_SETTINGS = {"hopper 128 w8 s4": (launch.Config(128, 128, 8, 4), 128, True, False),  # (config, max rows,
                   "hopper 128 w8 s4 split-k": (launch.Config(128, 128, 8, 4), 128, True, True)}  # MANTISSA, SPLIT_K)


def hopper_settings() -> dict:
    return {label: dict(HOPPER_PREFILL=False) if config is None else
            dict(HOPPER_PREFILL=True, HOPPER=config, HOPPER_MAX_ROWS=rows, HOPPER_MANTISSA=mantissa,
                 HOPPER_SPLIT_K=split_k)
            for label, (config, rows, mantissa, split_k) in HOPPER_SETTINGS.items()}


PREFILL_CASES = [(model, mix, 2048) for model in SHAPES for mix in MIXES]


def warm(label: str) -> None:
    """Compile one setting's kernels ("prefill:LABEL" of prefill_settings):
    one call per prefill case; fills Triton's disk cache, so that several settings compile in parallel processes
    before the timed run."""
    kind, label = label.split(":", 1) if ":" in label else ("prefill", label)
    tall = label in PREFILL_TALL
    setting = hopper_settings()[label] if kind == "hopper" else prefill_settings(tall)[label]
    for k, v in setting.items():
        setattr(launch, k, v)
    cases = PREFILL_CASES if kind == "hopper" else [c for c in PREFILL_CASES if (c[0] == "mixtral-8x7b") == tall]
    for model, mix, tokens in cases:
        layer = _layer(model, mix)
        x, idx, w = routings(tokens, SHAPES[model], 1)[0]
        with torch.no_grad():
            layer(x, idx, w)
        sync()
        del layer
        gc.collect()
        torch.cuda.empty_cache()
    print(f"warm {label}: done", flush=True)


ADOPT_TOLERANCE = 1.02  # "no slower": within 2 % (graph-replay timings repeat within about that on an H200)


def _adopt_sweep(rows: list) -> None:
    """Whether the decode tile 64x128 and the rule "above PAIR_MAX_MEAN_ROWS = 2 rows per expert, the tables path"
    (with the 64x128 tile there: DECODE_DENSE) are no slower (ADOPT_TOLERANCE) than 32x256 and "pair path always" on
    every case: Qwen3-30B-A3B and Mixtral, mix and 4-bit, 4 and 16 tokens (1 token takes neither: the pair path or
    gemv). Session 21 on an H200: the rule ADOPT (worst 1.005x), the tile for every tables-path layer not (1.028x on
    Qwen3 mix at 4 tokens): launch.py has the rule with DECODE_DENSE. launch keeps its defaults afterwards; the
    verdicts are rows of the sweep table."""
    inf, every = float("inf"), (2, 3, 4, 8, 16)
    old, new = launch.Config(32, 256), launch.Config(64, 128)
    saved = dict(PAIR_TOKENS=launch.PAIR_TOKENS, PAIR_MAX_MEAN_ROWS=launch.PAIR_MAX_MEAN_ROWS,
                 DECODE=dict(launch.DECODE), DECODE_DENSE=dict(launch.DECODE_DENSE))
    tile = lambda c: dict(DECODE={b: c for b in every}, DECODE_DENSE={b: c for b in every})  # noqa: E731
    settings = {"pair path always (32x256)": dict(PAIR_TOKENS=16, PAIR_MAX_MEAN_ROWS=inf, **tile(old)),
                "PAIR_MAX_MEAN_ROWS 2 + 64x128": dict(PAIR_TOKENS=16, PAIR_MAX_MEAN_ROWS=2, **tile(new)),
                "tables path 32x256": dict(PAIR_TOKENS=0, PAIR_MAX_MEAN_ROWS=inf, **tile(old)),
                "tables path 64x128": dict(PAIR_TOKENS=0, PAIR_MAX_MEAN_ROWS=inf, **tile(new))}
    cases = [(model, mix, tokens) for model in SHAPES for mix in MIXES for tokens in (4, 16)]
    scores: dict = {}
    _sweep("adopt", settings, cases, rows, scores)
    for k, v in saved.items():
        setattr(launch, k, v)
    for name, (base, cand) in {"decode tile 64x128": ("tables path 32x256", "tables path 64x128"),
                               "PAIR_MAX_MEAN_ROWS 2 (+64x128)": ("pair path always (32x256)",
                                                                  "PAIR_MAX_MEAN_ROWS 2 + 64x128")}.items():
        ratios = [c / b for b, c in zip(scores.get(base, []), scores.get(cand, []))]
        worst = max(ratios) if ratios else inf
        verdict = "ADOPT" if len(ratios) == len(cases) and worst <= ADOPT_TOLERANCE else "keep default"
        for (model, mix, tokens), r in zip(cases, ratios):
            rows.append(dict(tokens=tokens, variant=f"adopt {name}: candidate / default ({model}, {mix})", us=r))
        rows.append(dict(tokens=0, variant=f"adopt {name}: worst ratio {worst:.3f} -> {verdict}", us=worst))
        print(f"adopt {name}: ratios {[round(r, 3) for r in ratios]} worst {worst:.3f} -> {verdict}", flush=True)


def _tables_sweep(rows: list) -> None:
    """Few large experts at 16 tokens (Mixtral: 4 rows per expert): the pair path re-reads an expert per pair; the
    routing-table path (packed_kernel, all rows of an expert in one block) with several decode tiles."""
    every = (2, 3, 4, 8, 16)
    tiles = {"32x256 w4 s3": launch.Config(32, 256), "64x128 w4 s3": launch.Config(64, 128),
             "64x256 w4 s2": launch.Config(64, 256, 4, 2), "128x128 w8 s3": launch.Config(128, 128, 8, 3)}
    inf = float("inf")
    settings = {"pair path": dict(PAIR_TOKENS=16, PAIR_MAX_MEAN_ROWS=inf, DECODE=dict(launch.DECODE),
                                  DECODE_DENSE=dict(launch.DECODE_DENSE))}
    settings.update({f"tables {name}": dict(PAIR_TOKENS=0, PAIR_MAX_MEAN_ROWS=inf, DECODE={b: c for b in every},
                                            DECODE_DENSE={b: c for b in every}) for name, c in tiles.items()})
    chosen = _sweep("mixtral 16", settings, [("mixtral-8x7b", "mix 2/3/4", 16), ("mixtral-8x7b", "4-bit", 16)],
                    rows)
    launch.PAIR_TOKENS = 16  # the tables path above 2 pairs per expert where it won, else the pair path always
    launch.PAIR_MAX_MEAN_ROWS = 2 if chosen is not None and chosen.get("PAIR_TOKENS") == 0 else inf


def _pair_sweeps(rows: list) -> None:
    pair = {f"BN {bn} w{w} {g} groups/program": dict(PAIR_BLOCK_N=bn, PAIR_WARPS=w, PAIR_GROUPS_PER_PROGRAM=g)
            for bn, w, g in ((16, 2, 4), (16, 4, 4), (32, 4, 4), (16, 2, 2), (32, 2, 2), (16, 2, 8))}
    pair["BN 16 w2 4 groups/program, no lop3"] = dict(PAIR_BLOCK_N=16, PAIR_WARPS=2, PAIR_GROUPS_PER_PROGRAM=4,
                                                      PAIR_ASM=False)
    # the pair path against the routing-table path at real sizes: the same function (rel. difference)
    layer = _layer("qwen3-30b-a3b", "mix 2/3/4")
    for tokens in (1, 16):
        x, idx, w = routings(tokens, SHAPES["qwen3-30b-a3b"], 1, seed=9)[0]
        saved = launch.PAIR_TOKENS
        try:
            with torch.no_grad():
                a = layer(x, idx, w).float()
                launch.PAIR_TOKENS = 0
                b = layer(x, idx, w).float()
            diff = float((a - b).norm() / b.norm())
        except Exception as exc:  # noqa: BLE001
            print(f"pair vs tables: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            diff = float("nan")
        launch.PAIR_TOKENS = saved
        rows.append(dict(tokens=tokens, variant="pair path vs tables path, rel. difference (qwen3 mix)", us=diff))
        print(f"pair vs tables T={tokens}: rel diff {diff:.2e}", flush=True)
    del layer
    if _sweep("pair", pair, [("qwen3-30b-a3b", "mix 2/3/4", 1), ("mixtral-8x7b", "mix 2/3/4", 1)], rows) is None:
        launch.PAIR_TOKENS = 0
    # the pair path against the routing-table path (packed_kernel, tensor cores) at 4 and 16 tokens
    inf = float("inf")
    _sweep("decode", {"pair path": dict(PAIR_TOKENS=16, PAIR_MAX_MEAN_ROWS=inf),
                      "tables path": dict(PAIR_TOKENS=0, PAIR_MAX_MEAN_ROWS=inf),
                      "pair path to 4 tokens": dict(PAIR_TOKENS=4, PAIR_MAX_MEAN_ROWS=inf)},
           [("qwen3-30b-a3b", "mix 2/3/4", 4), ("qwen3-30b-a3b", "mix 2/3/4", 16), ("mixtral-8x7b", "4-bit", 16)],
           rows)


# session 22 (H200, eager µs mix / 4-bit), call 2: short 128x128 w8 s3 1760 / 1630, gated 1750 / 1650, 256x128 w8
# s3 gated 1670 / 1460 (adopted); tall 128x64 w8 s3 7830 / 6480 (kept), gated 8490 / 6940, 256x64 gated 18830 / 16850.
# Call 3 (slower host): 256x128 gated 1985 / 1770, unfused 1880 / 1620, 256x64 gated 2000 / 1750 (graph-replayed in
# the layer table 256x128 gated and unfused were equal: 1446 / 1245 and 1444 / 1246); 256x128 s4: no shared memory
PREFILL_SHORT = {"256x128 w8 s3 gated": (launch.Config(256, 128, 8, 3), True),
                 "256x128 w8 s3": (launch.Config(256, 128, 8, 3), False),
                 "256x64 w8 s3 gated": (launch.Config(256, 64, 8, 3), True),
                 "128x128 w8 s3 gated": (launch.Config(128, 128, 8, 3), True)}
PREFILL_TALL = {"128x64 w8 s3": (launch.Config(128, 64, 8, 3), False),
                "128x64 w8 s4": (launch.Config(128, 64, 8, 4), False)}


def prefill_settings(tall: bool) -> dict:
    """packed_kernel's prefill tiles (BN x BK, warps, stages; gated: SiLU(gate) * up fused into the first
    projection, BN/2 columns of each half) for row blocks up to 128 (PREFILL) or of 256 (PREFILL_TALL)."""
    every = (2, 3, 4, 8, 16)
    name, flag = ("PREFILL_TALL", "PREFILL_TALL_GATED") if tall else ("PREFILL", "PREFILL_GATED")
    return {label: {name: {b: c for b in every}, flag: gated}
            for label, (c, gated) in (PREFILL_TALL if tall else PREFILL_SHORT).items()}


def _prefill_sweep(rows: list) -> None:
    """Tiles of the prefill path, per row-block height: PREFILL (blocks up to 128 rows: Qwen3-30B-A3B, 128 rows per
    expert on average at 2048 tokens) and PREFILL_TALL (blocks of 256: Mixtral, 512 rows per expert), the gate
    fused into the first projection or not (session 22; session 20 chose 128x128 and 128x64 among 4 + 3 tiles)."""
    _sweep("prefill", prefill_settings(False), [("qwen3-30b-a3b", mix, 2048) for mix in MIXES], rows)
    _sweep("prefill tall", prefill_settings(True), [("mixtral-8x7b", mix, 2048) for mix in MIXES], rows)


def tinygemm_rows() -> list[dict]:
    """PyTorch's int4 kernel (torch._weight_int4pack_mm, what torchao's int4 weight-only CUDA path calls): 4-bit
    group-128 experts of the Qwen3 shape, one call per active expert and projection (it has no grouped MoE form),
    graph-captured: what an existing int4 kernel gives at decode. Random weights (timing only)."""
    shape = SHAPES["qwen3-30b-a3b"]
    hidden, inter, n = shape["hidden"], shape["inter"], shape["experts"]

    def weight(out_f, in_f):
        packed = torch.randint(0, 255, (out_f, in_f // 2), dtype=torch.uint8, device="cuda")
        w = torch._convert_weight_to_int4pack(packed, 8)
        sz = torch.rand(in_f // GROUP_SIZE, out_f, 2, device="cuda").to(torch.bfloat16)
        return w, sz

    gate_up = [weight(2 * inter, hidden) for _ in range(n)]
    down = [weight(hidden, inter) for _ in range(n)]
    rows = []
    for tokens in (1, 16):
        calls = []
        for x, idx, w in routings(tokens, shape, ROTATE):
            pairs = {}
            for t, row in enumerate(idx.tolist()):
                for k, e in enumerate(row):
                    pairs.setdefault(e, []).append((t, k))
            plan = [(e, torch.tensor([t for t, _ in p], device="cuda"), w[[t for t, _ in p], [k for _, k in p]])
                    for e, p in pairs.items()]

            def call(x=x, plan=plan):
                out = torch.zeros(x.shape[0], hidden, device="cuda", dtype=torch.float32)
                for e, rows_e, w_e in plan:
                    h = torch._weight_int4pack_mm(x[rows_e], gate_up[e][0], GROUP_SIZE, gate_up[e][1])
                    g, u = h.chunk(2, -1)
                    y = torch._weight_int4pack_mm((torch.nn.functional.silu(g) * u).contiguous(), down[e][0],
                                                  GROUP_SIZE, down[e][1])
                    out.index_add_(0, rows_e, y.float() * w_e[:, None])
                return out
            calls.append(call)
        us = time_calls(calls, graph=True)
        rows.append(dict(tokens=tokens, variant="torch int4 tinygemm, per expert (4-bit)", us=us))
        print(f"tinygemm T={tokens} {us:.1f} us", flush=True)
    return rows


def report(info: dict, rows: list[dict], variants: list[dict], secs: float) -> str:
    lines = [f"# GPU kernels for packed experts: `python eval/bench_gpu.py`", "",
             f"Device: {info['gpu']}; torch {info['torch']}, Triton {info['triton']}, transformers "
             f"{info['transformers']}. Measured ceilings: copy {info['copy_GBps']:.0f} GB/s (read + write), bf16 "
             f"matmul {info['bf16_TFLOPs']:.0f} TFLOP/s. Group size {GROUP_SIZE}, asymmetric; {secs:.0f} s.", "",
             "## MoE layer (one call; CUDA-graph replay of 16 calls (decode) or 2 (prefill) with different "
             "routings, per call; bf16: its fastest implementation, graph or eager; speedup eager: eager against "
             "bf16's fastest eager)", "",
             "| model | bits | tokens | ours µs | ours eager µs | best bf16 (impl) µs | speedup | speedup eager "
             "| active MB | floor µs | ours / floor | bandwidth | resident / packed MB | workspace MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = r["ours_graph_us"] if r["ours_graph_us"] is not None else r["ours_eager_us"]
        extra = f" ({r['ours_TFLOPs']:.0f} vs {r['bf16_TFLOPs']:.0f} TFLOP/s)" if "ours_TFLOPs" in r else ""
        lines.append(f"| {r['model']} | {r['mix']} | {r['tokens']} | {ours:.1f} | {r['ours_eager_us']:.1f} | "
                     f"{r['bf16_best_us']:.1f} ({r['bf16_best']}) | {r['speedup']:.2f}x{extra} | "
                     f"{r.get('speedup_eager', float('nan')):.2f}x | {r['active_MB']:.1f} | "
                     f"{r['floor_us']:.1f} | {r['over_floor']:.1f}x | {100 * r['bw_fraction']:.0f} % | "
                     f"{r['resident_MB']:.1f} / {r['packed_MB']:.1f} | {r['workspace_MB']:.1f} |")
    lines += ["", "bf16 implementations (µs, eager / graph):", ""]
    for r in rows:
        impls = "; ".join(f"{k} {v.get('eager_us', 0):.1f} / {v.get('graph_us') or float('nan'):.1f}" if "eager_us" in v
                          else f"{k} {v['error']}" for k, v in r["bf16"].items())
        lines.append(f"- {r['model']} {r['mix']} T={r['tokens']}: {impls}")
    if variants:
        lines += ["", "## Sweeps (µs per layer call; decode graph-replayed; the chosen setting is used below)", "",
                  "| tokens | variant | µs |", "|---|---|---|"]
        lines += [f"| {v['tokens']} | {v['variant']} | {v['us']:.3g} |" for v in variants]
        if "chosen" in info:
            lines += ["", f"Settings chosen by the sweeps and used for every table of this run: {info['chosen']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results")
    parser.add_argument("--quick", action="store_true", help="Qwen3 shape only in the layer table")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 2048])
    parser.add_argument("--skip", nargs="*", default=[], choices=["layers", "variants", "tinygemm"])
    parser.add_argument("--warm", help="compile this prefill setting's kernels and exit (parallel warm-up)")
    parser.add_argument("--sweeps", nargs="*", default=["pair", "tables", "prefill"],
                        choices=["pair", "tables", "prefill", "adopt", "hopper"],
                        help="the sweeps of the variants stage")
    args = parser.parse_args(argv)
    if args.warm:
        return warm(args.warm)
    t0 = time.time()
    info = ceilings()
    print(info, flush=True)
    peak = info["copy_GBps"]
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu-quick" if args.quick else "gpu"
    rows, variants = [], []

    def write():  # after every stage: a run stopped at its time limit still leaves what it measured
        (args.out / f"{name}.json").write_text(json.dumps(dict(info=info, layers=rows, variants=variants),
                                                          indent=1))
        text = report(info, rows, variants, time.time() - t0)
        (args.out / f"{name}.md").write_text(text)
        return text

    if "tinygemm" not in args.skip:
        try:
            variants += tinygemm_rows()
        except Exception as exc:  # noqa: BLE001 (report and go on)
            print(f"tinygemm: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    if "variants" not in args.skip:
        variants += variant_rows(args)
        info["chosen"] = dict(pair_block_n=launch.PAIR_BLOCK_N, pair_warps=launch.PAIR_WARPS,
                              pair_tokens=launch.PAIR_TOKENS, pair_max_mean_rows=launch.PAIR_MAX_MEAN_ROWS,
                              decode=str(launch.DECODE[4]), prefill=str(launch.PREFILL[4]),
                              prefill_tall=str(launch.PREFILL_TALL[4]),
                              prefill_max_rows=launch.PREFILL_MAX_ROWS, prefill_gated=launch.PREFILL_GATED,
                              prefill_tall_gated=launch.PREFILL_TALL_GATED, hopper_prefill=launch.HOPPER_PREFILL,
                              hopper=str(launch.HOPPER), hopper_max_rows=launch.HOPPER_MAX_ROWS,
                              hopper_mantissa=launch.HOPPER_MANTISSA)
    write()
    if args.quick:
        SHAPES.pop("mixtral-8x7b")
    if "layers" not in args.skip:
        layer_rows(args, peak, rows, write)
    print(write())


if __name__ == "__main__":
    main()
