"""Time per token of the tiered expert store vs the fully resident model, and process RSS (bench_store.py --time).

Model: a random-init Qwen3-MoE with Qwen3-30B-A3B's MoE dims (hidden 2048, 128 experts of width 768, top-8), 4
decoder layers, RTN 4-bit experts (group 128), bf16 (bench_edge.build_big's checkpoint: 1206 MiB of experts). Its
routing is untrained (near uniform): hit rates here are what a budget share gives without popularity, the worst case.

Timing: ONE process holds the fully resident model and the store's model side by side and decodes the same random
tokens with both, one token at a time with a KV cache, alternating resident / store step by step (interleaved: load
changes hit both alike). Per row: the median over the tokens (the first WARMUP tokens of each row excluded) of the
per-step ratio store / resident, and both medians. Disk tier: the checkpoint's safetensors read with O_DIRECT. Both
take the fused CPU decode call (cpu_moe). Exact rows check every step's logits for equality with the resident's.

RSS: each configuration in a fresh subprocess (load + the same decode), VmHWM (peak RSS) after loading and at the end,
and RssAnon/RssFile at the end, from /proc/self/status.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

WARMUP = 2  # decode steps per row not timed (the store's cache starts cold after the pinning)

CONFIGS = [  # name -> StoreConfig fields besides the budget
    ("LRU", dict(policy="lru")),
    ("pin + prefetch (router)", dict(policy="lru", pin_share=0.5, prefetch="router")),
    ("+ 2-bit copies (w < 0.1)", dict(policy="lru", pin_share=0.5, prefetch="router", copy_threshold=0.1,
                                      copies_in_budget=False)),
]


def _status() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out


def _step(model, ids, t, past):
    start = time.perf_counter()
    out = model(ids[:, t:t + 1], cache=past, use_cache=True)
    return out, time.perf_counter() - start


def interleaved(resident, model, ids: torch.Tensor, exact: bool) -> dict:
    """Decode ids [1, N] with both models, alternating; per-step times, ratio median, logits equality."""
    past_r = past_s = None
    tr, ts, equal, nll_r, nll_s = [], [], True, 0.0, 0.0
    with torch.no_grad():
        for t in range(ids.shape[1] - 1):
            out_r, a = _step(resident, ids, t, past_r)
            out_s, b = _step(model, ids, t, past_s)
            past_r, past_s = out_r.past_key_values, out_s.past_key_values
            equal &= bool(torch.equal(out_r.logits, out_s.logits))
            nll_r -= float(torch.log_softmax(out_r.logits[0, -1].float(), -1)[ids[0, t + 1]])
            nll_s -= float(torch.log_softmax(out_s.logits[0, -1].float(), -1)[ids[0, t + 1]])
            if t >= WARMUP:
                tr.append(a)
                ts.append(b)
    n = ids.shape[1] - 1
    return {"resident_s": statistics.median(tr), "store_s": statistics.median(ts),
            "ratio": statistics.median(b / a for a, b in zip(tr, ts)), "timed_tokens": len(tr),
            "logits_equal": equal if exact else None, "dnll_per_token": (nll_s - nll_r) / n}


def run_time(args, load, routing_stats, rtn_copies) -> dict:
    """Every budget x CONFIGS on the 30B-dims model; one store model re-attached per row (attach -> run -> detach)."""
    import argparse

    import bench_edge
    from moecompress.runtime.store import StoreConfig, attach_store, detach_store
    from moecompress.runtime.packed_experts import PackedExperts

    ns = argparse.Namespace(work=args.work, big_layers=4, tokenizer=str(args.shared / "models/refmoe-qwen3"))
    _, ckpt = bench_edge.build_big(ns)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8192, (1, args.big_tokens + 1), generator=gen)
    calib = [torch.randint(0, 8192, (1, 64), generator=gen)]
    load_avg = [os.getloadavg()[0]]  # 1-minute load average at the start and the end (a 2-core box: > 2 is loaded)
    resident = load(ckpt, torch.bfloat16)
    t0 = time.time()
    stats = routing_stats(resident, calib)
    cached = Path(ckpt).parent / f"{Path(ckpt).name}-copies2.pt"  # made once (minutes at these dims)
    if cached.exists():
        copies = torch.load(cached)
    else:
        copies = rtn_copies(None, resident, 2, 128, False)  # of the main copies' dequantized weights
        torch.save(copies, cached)
    print(f"stats + copies {time.time() - t0:.0f} s", flush=True)
    model = load(ckpt, torch.bfloat16)
    modules = [m for m in model.modules() if isinstance(m, PackedExperts)]
    rows, total = [], expert_bytes(ckpt)
    for share in args.budgets:
        for name, fields in CONFIGS:
            budget = int(share * total)
            store = attach_store(model, ckpt, StoreConfig(budget=budget, **fields), stats=stats,
                                 copies=copies if "copy_threshold" in fields else {})
            try:
                store.reset_counters()
                r = interleaved(resident, model, ids, exact="copy_threshold" not in fields)
                r.update(store.counters())
            finally:
                detach_store(modules)
            rows.append({"config": name, "share": share, "budget": budget, **r})
            print(f"{share:.0%} {name}: {r['ratio']:.2f}x ({1000 * r['store_s']:.0f} vs {1000 * r['resident_s']:.0f} "
                  f"ms/token) hit {r['hit_rate']:.3f} served {r['served_rate']:.3f} stall "
                  f"{1000 * r['stall_s_per_token']:.1f} ms/token, {r['bytes_per_token'] / 2**20:.1f} MiB/token, "
                  f"equal {r['logits_equal']}", flush=True)
    del model, resident
    rss = run_rss(args, ckpt, args.budgets)
    load_avg.append(os.getloadavg()[0])
    return {"model": "random-init Qwen3-30B-A3B MoE dims, 4 layers (time)", "checkpoint": str(ckpt),
            "expert_bytes": total, "rows": rows, "rss": rss, "tokens": args.big_tokens, "threads": args.threads,
            "load_average": load_avg, "cpus": os.cpu_count()}


def run_rss(args, ckpt: Path, budgets: list[float]) -> list[dict]:
    """Process RSS per configuration, each in a fresh subprocess (this file run as a script)."""
    out = []
    for share in [None, *budgets]:
        cmd = [sys.executable, __file__, "--rss-child", str(ckpt), str(args.big_tokens), str(args.threads),
               "" if share is None else str(share)]
        got = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        out.append(json.loads(got))
        print("rss", out[-1], flush=True)
    return out


def expert_bytes(ckpt: Path) -> int:
    """Bytes of the routed experts' tensors in the checkpoint's files (what a 100 % budget holds)."""
    from moecompress.format.spec import read_spec
    from moecompress.runtime.store.tiers import tensor_index

    paths = tuple(f"{p}." for p in read_spec(ckpt).experts)
    return sum(torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
               for name, (_, _, dtype, shape) in tensor_index(ckpt).items() if name.startswith(paths))


def _rss_child(ckpt: str, tokens: int, threads: int, share: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import moecompress
    from moecompress.runtime.store import StoreConfig

    torch.set_num_threads(threads)
    ckpt = Path(ckpt)
    kw = {}
    if share:
        kw["store"] = StoreConfig(budget=int(float(share) * expert_bytes(ckpt)), policy="lru", prefetch="router")
    model = moecompress.from_pretrained(ckpt, dtype=torch.bfloat16, verify=False, **kw).eval()
    after_load = _status()
    ids = torch.randint(0, 8192, (1, tokens + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        past = None
        for t in range(tokens):
            out = model(ids[:, t:t + 1], cache=past, use_cache=True)
            past = out.past_key_values
    end = _status()
    res = {"share": float(share) if share else None, "peak_after_load": after_load["VmHWM"], "peak": end["VmHWM"],
           "anon": end["RssAnon"], "file": end["RssFile"]}
    if share:
        res["budget"] = kw["store"].budget
    else:  # a few tokens touch only some experts: the fully resident model's RSS once every expert was used
        for t in model.buffers():  # read one element of every page of every packed tensor
            if t.numel():
                t.detach().reshape(-1)[::max(1, 4096 // t.element_size())].float().sum()
        res["peak_all_touched"] = _status()["VmHWM"]
    print(json.dumps(res))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
    _rss_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])


def markdown(res: dict) -> list[str]:
    mib = 2 ** 20
    lines = [f"## {res['model']}", "",
             f"Expert bytes {res['expert_bytes'] / mib:.0f} MiB; {res['tokens']} decode tokens per row ({WARMUP} "
             f"warm-up steps not timed), {res['threads']} threads, interleaved with the fully resident model in one "
             "process (eval/store_time.py). Ratio: median over tokens of store / resident step time.", ""]
    if "load_average" in res:
        avg, cpus = res["load_average"], res["cpus"]
        loaded = max(avg) > 0.75 * cpus
        lines += [f"Machine: {cpus} CPUs, 1-minute load average {avg[0]:.1f} at the start, {avg[1]:.1f} at the end"
                  + (": **LOADED** (other jobs shared the CPUs; times are noisy, ratios less so)." if loaded else "."),
                  ""]
    lines += [
             "| budget | policy | time / token vs resident | store ms | resident ms | hit rate | served | stall ms / token "
             "| MiB read / token | prefetch accuracy | logits equal resident | memory (experts) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        acc = r["prefetch_accuracy"]
        mem = (r["budget"] + (0 if r["copies_in_budget"] else r["copy_bytes"])) / res["expert_bytes"]
        eq = {True: "yes", False: "NO", None: "- (copies)"}[r["logits_equal"]]
        lines.append(f"| {100 * r['share']:.0f} % | {r['config']} | **{r['ratio']:.2f}x** | {1000 * r['store_s']:.0f} | "
                     f"{1000 * r['resident_s']:.0f} | {r['hit_rate']:.3f} | {r['served_rate']:.3f} | "
                     f"{1000 * r['stall_s_per_token']:.1f} | {r['bytes_per_token'] / mib:.1f} | "
                     f"{'-' if acc is None else f'{acc:.2f}'} | {eq} | {mem:.0%} |")
    lines += ["", "Process RSS (a fresh process per row: load, then the same decode; VmHWM = peak):", "",
              "| experts | budget | peak RSS after load | peak RSS | anonymous at end | file-backed at end |",
              "|---|---|---|---|---|---|"]
    for r in res["rss"]:
        what = "fully resident" if r["share"] is None else f"store, {100 * r['share']:.0f} %"
        budget = "-" if r["share"] is None else f"{r['budget'] / mib:.0f} MiB"
        lines.append(f"| {what} | {budget} | {r['peak_after_load'] / mib:.0f} MiB | {r['peak'] / mib:.0f} MiB | "
                     f"{r['anon'] / mib:.0f} MiB | {r['file'] / mib:.0f} MiB |")
        if "peak_all_touched" in r:
            lines.append(f"| fully resident, every expert used once | - | - | {r['peak_all_touched'] / mib:.0f} MiB "
                         "| - | - |")
    return lines + [""]
