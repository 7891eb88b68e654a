"""Time per token of the tiered expert store vs the fully resident model, and process RSS (bench_store.py --time).

Model: a random-init Qwen3-MoE with Qwen3-30B-A3B's MoE dims (hidden 2048, 128 experts of width 768, top-8), 4
decoder layers, RTN 4-bit experts (group 128), bf16 (bench_edge.build_big's checkpoint: 1206 MiB of experts). Its
routing is untrained (near uniform): hit rates here are what a budget share gives without popularity, the worst case.

Timing: ONE process holds the fully resident model and the store's model side by side and decodes the same random
tokens with both, one token at a time with a KV cache, alternating resident / store step by step (interleaved: load
changes hit both alike). Every page of the resident model's buffers is read once before the first row (its
memory-mapped experts in RAM, as warm as the store's slots). Per row and per half of the run (cold start: the first
half, the store's cache starting from its pinned experts; steady state: the second half): the median per-step ratio
store / resident, both medians, and the store's counters of that half. Disk tier: the checkpoint's safetensors read
with O_DIRECT. Both take the fused CPU decode call (cpu_moe). Exact rows check every step's logits for equality.

RSS: each configuration in a fresh subprocess (load + the same decode, the default store), VmHWM (peak RSS) after
loading and at the end, RssAnon/RssFile at the end (/proc/self/status), smaps_rollup's Anonymous, and what the
anonymous memory holds beyond the loaded model's and the resident slots' bytes.

CPU: time.thread_time() of the compute thread per step, plus the store's reader and prefetch threads' CPU clocks
(ExpertStore.background_cpu_s), over the resident model's compute thread: with --threads 1 a measure that load does
not change much (wall ratios do).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moecompress.runtime.store.store import DEFAULT_COPY_THRESHOLD  # noqa: E402

PIN_PREFETCH = dict(policy="lru", pin_share=0.5, prefetch="router")
DEFAULT = dict(PIN_PREFETCH, prefetch_refine=True, prefetch_min_precision=0.5)
COPIES = dict(copy_relative=True, copy_fetch=True, copies_in_budget=False)  # copies on top of the budget
CONFIGS = [  # (name, StoreConfig fields besides the budget, budget shares it runs at (None: all))
    ("LRU", dict(policy="lru"), None),
    ("pin + prefetch (router), every prediction", dict(PIN_PREFETCH), (0.5,)),
    # the same without computing the resident experts while a miss is read (one call after every miss is in)
    ("pin + prefetch (router), no overlap", dict(PIN_PREFETCH, overlap=False), (0.5,)),
    ("pin + prefetch (router, score >= 2/E)", dict(PIN_PREFETCH, prefetch_floor=2.0), (0.5,)),
    ("pin + prefetch (router, precision >= 0.5)", dict(PIN_PREFETCH, prefetch_min_precision=0.5), (0.5,)),
    ("pin + prefetch (router + refine, precision >= 0.3)",
     dict(PIN_PREFETCH, prefetch_refine=True, prefetch_min_precision=0.3), (0.5,)),
    ("pin + prefetch (router + refine, precision >= 0.5) (default)", DEFAULT, None),
    ("+ 2-bit copies (w < 0.1)", dict(DEFAULT, copy_threshold=0.1, copies_in_budget=False), (0.5,)),
    # HOBBIT: a miss under the threshold runs on its copy and its full expert is read in the background; relative
    # thresholds (x the token's mean top-k weight) as chosen on calibration text (store_copies.py)
    (f"+ 2-bit copies, fetch (w < {DEFAULT_COPY_THRESHOLD[2]} x mean: default)",
     dict(DEFAULT, **COPIES, copy_threshold=DEFAULT_COPY_THRESHOLD[2]), None),
    ("+ 2-bit copies, fetch (every miss)", dict(DEFAULT, **COPIES, copy_threshold=1000.0), (0.5,)),
    ("pin + 2-bit copies, fetch (every miss), no prefetch", dict(policy="lru", pin_share=0.5, **COPIES,
                                                                copy_threshold=1000.0), (0.5,)),
]


def _status() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    for line in open("/proc/self/smaps_rollup"):  # anonymous pages of every mapping (heap, arenas, mmaps)
        if line.startswith("Anonymous:"):
            out["Anonymous"] = int(line.split()[1]) * 1024
    return out


def _step(model, ids, t, past):
    """One decode step: (output, wall seconds, this thread's CPU seconds)."""
    if ids.is_cuda:  # the GPU tier (store_gpu.py): time the step's work, not its launches
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.thread_time()
    out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, time.thread_time() - cpu


def warm_pages(model) -> int:
    """Read one element of every page of every buffer (the packed experts are memory-mapped from the checkpoint): the
    fully resident model then runs from pages in RAM, as warm as the store's slots. Returns the bytes touched."""
    total = 0
    for t in model.buffers():
        if t.numel():
            t.detach().reshape(-1)[::max(1, 4096 // t.element_size())].float().sum()
            total += t.numel() * t.element_size()
    return total


def _half(tr, ts, cr, cs, c0, c1, tokens) -> dict:
    """Times and store counters of one half of a row (c0, c1: store.counters() at its start and end; cr, cs: the
    compute thread's CPU seconds per step, resident and store). CPU ratio: the store's compute thread + its reader and
    prefetch threads over the resident model's compute thread (meaningful with one torch thread: the load-independent
    measure)."""
    uses = max(1, sum(c1[k] - c0[k] for k in ("hits", "misses", "substitutions")))
    background = c1["background_cpu_s"] - c0["background_cpu_s"]
    return {"resident_s": statistics.median(tr), "store_s": statistics.median(ts),
            "ratio": statistics.median(b / a for a, b in zip(tr, ts)),
            "cpu_ratio": (sum(cs) + background) / sum(cr), "resident_cpu_s": sum(cr) / tokens,
            "store_cpu_s": sum(cs) / tokens, "background_cpu_s": background / tokens,
            "ratio_of_means": sum(ts) / sum(tr), "tokens": tokens,
            "hit_rate": (c1["hits"] - c0["hits"]) / uses,
            "served_rate": (c1["hits"] + c1["substitutions"] - c0["hits"] - c0["substitutions"]) / uses,
            "stall_s_per_token": (c1["stall_s"] - c0["stall_s"]) / tokens,
            "bytes_per_token": (c1["bytes_fetched"] - c0["bytes_fetched"]) / tokens,
            # the GPU tier: time its side stream spent copying (store_gpu.py)
            "copy_s_per_token": None if c1.get("tier_busy_s") is None else
            (c1["tier_busy_s"] - c0["tier_busy_s"]) / tokens}


def interleaved(resident, model, store, ids: torch.Tensor, exact: bool) -> dict:
    """Decode ids [1, N] with both models, alternating step by step; per half of the run (cold start: the first half,
    steady state: the second) the median step times, the median per-step ratio and the store's counters; logits
    equality at every step (exact rows)."""
    past_r = past_s = None
    tr, ts, cr, cs, equal, nll_r, nll_s, diff = [], [], [], [], True, 0.0, 0.0, 0.0
    n = ids.shape[1] - 1
    half = n // 2
    marks = [store.counters()]
    with torch.no_grad():
        for t in range(n):
            if t == half:
                marks.append(store.counters())
            out_r, a, ca = _step(resident, ids, t, past_r)
            out_s, b, cb = _step(model, ids, t, past_s)
            past_r, past_s = out_r.past_key_values, out_s.past_key_values
            equal &= bool(torch.equal(out_r.logits, out_s.logits))
            diff = max(diff, float((out_r.logits.float() - out_s.logits.float()).abs().max()))
            nll_r -= float(torch.log_softmax(out_r.logits[0, -1].float(), -1)[ids[0, t + 1]])
            nll_s -= float(torch.log_softmax(out_s.logits[0, -1].float(), -1)[ids[0, t + 1]])
            tr.append(a)
            ts.append(b)
            cr.append(ca)
            cs.append(cb)
    marks.append(store.counters())
    cold = _half(tr[:half], ts[:half], cr[:half], cs[:half], marks[0], marks[1], half)
    steady = _half(tr[half:], ts[half:], cr[half:], cs[half:], marks[1], marks[2], n - half)
    return {"cold": cold, "steady": steady, "ratio": steady["ratio"], "store_s": steady["store_s"],
            "resident_s": steady["resident_s"], "logits_equal": equal if exact else None, "max_logit_diff": diff,
            "dnll_per_token": (nll_s - nll_r) / n}


def run_time(args, load, routing_stats, rtn_copies) -> dict:
    """Every budget x CONFIGS on the 30B-dims model; one store model re-attached per row (attach -> run -> detach)."""
    import argparse

    import bench_edge
    from moecompress.runtime.store import StoreConfig, attach_store, detach_store
    from moecompress.runtime.experts.packed_experts import PackedExperts

    ns = argparse.Namespace(work=args.work, big_layers=4, tokenizer=str(args.shared / "models/refmoe-qwen3"))
    _, ckpt = bench_edge.build_big(ns)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8192, (1, args.big_tokens + 1), generator=gen)
    calib = [torch.randint(0, 8192, (1, 64), generator=gen)]
    load_avg = [os.getloadavg()[0]]  # 1-minute load average at the start and the end (a 2-core box: > 2 is loaded)
    resident = load(ckpt, torch.bfloat16)
    warm_bytes = warm_pages(resident)
    t0 = time.time()
    stats = routing_stats(resident, calib)
    bits = args.time_copy_bits
    cached = Path(ckpt).parent / f"{Path(ckpt).name}-copies{bits}.pt"  # made once (minutes at these dims)
    if cached.exists():
        copies = torch.load(cached)
    else:
        copies = rtn_copies(None, resident, bits, 128, False)  # of the main copies' dequantized weights
        torch.save(copies, cached)
    print(f"stats + copies {time.time() - t0:.0f} s", flush=True)
    model = load(ckpt, torch.bfloat16)
    modules = [m for m in model.modules() if isinstance(m, PackedExperts)]
    rows, total = [], expert_bytes(ckpt)
    configs = CONFIGS + [(f"pin + prefetch + 2-bit copies, deterministic (w < {t} x mean)",
                          dict(DEFAULT, copy_relative=True, copy_deterministic=True, copies_in_budget=False,
                               copy_threshold=t), None) for t in getattr(args, "time_copy_thresholds", [])]
    for share in args.budgets:
        for name, fields, shares in configs:
            if (args.configs and name not in args.configs and "deterministic" not in name) or \
                    (shares is not None and share not in shares):
                continue
            if fields.get("copy_relative") and fields["copy_threshold"] == DEFAULT_COPY_THRESHOLD[2]:  # the default
                fields = dict(fields, copy_threshold=DEFAULT_COPY_THRESHOLD[bits])  # threshold of these copies
                name = name.replace(f"{DEFAULT_COPY_THRESHOLD[2]} x", f"{DEFAULT_COPY_THRESHOLD[bits]} x")
            name = name.replace("2-bit copies", f"{bits}-bit copies")
            budget = int(share * total)
            store = attach_store(model, ckpt, StoreConfig(budget=budget, **fields), stats=stats,
                                 copies=copies if "copy_threshold" in fields else {})
            try:
                store.reset_counters()
                r = interleaved(resident, model, store, ids, exact="copy_threshold" not in fields)
                r.update({k: v for k, v in store.counters().items() if k not in r})
            finally:
                detach_store(modules)
            rows.append({"config": name, "share": share, "budget": budget, **r})
            halves = (("cold", r["cold"]), ("steady", r["steady"]))
            print(f"{share:.0%} {name}: " + "; ".join(
                f"{part} {h['ratio']:.2f}x ({1000 * h['store_s']:.0f} vs {1000 * h['resident_s']:.0f} ms/token) "
                f"cpu {h['cpu_ratio']:.2f}x (bg {1000 * h['background_cpu_s']:.1f} ms/token) hit "
                f"{h['hit_rate']:.3f} served {h['served_rate']:.3f} stall {1000 * h['stall_s_per_token']:.1f} ms/token "
                f"{h['bytes_per_token'] / 2**20:.1f} MiB/token" for part, h in halves)
                + f"; equal {r['logits_equal']}", flush=True)
    del model, resident
    rss = run_rss(args, ckpt, args.budgets) if args.rss else []
    load_avg.append(os.getloadavg()[0])
    return {"model": "random-init Qwen3-30B-A3B MoE dims, 4 layers (time)", "checkpoint": str(ckpt),
            "expert_bytes": total, "resident_bytes_touched": warm_bytes, "rows": rows, "rss": rss, "tokens": args.big_tokens, "threads": args.threads,
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
    from moecompress.runtime.store.store import default_config

    torch.set_num_threads(threads)
    ckpt = Path(ckpt)
    kw = {}
    if share:
        kw["store"] = default_config(int(float(share) * expert_bytes(ckpt)), has_stats=False)  # no statistics here
    model = moecompress.from_pretrained(ckpt, dtype=torch.bfloat16, verify=False, **kw).eval()
    after_load = _status()
    ids = torch.randint(0, 8192, (1, tokens + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        past = None
        for t in range(tokens):
            out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
    end = _status()
    res = {"share": float(share) if share else None, "peak_after_load": after_load["VmHWM"], "peak": end["VmHWM"],
           "anon": end["RssAnon"], "file": end["RssFile"], "smaps_anonymous": end["Anonymous"],
           "anon_after_load": after_load["RssAnon"]}
    if share:
        res["budget"] = kw["store"].budget
        res["slot_bytes"] = model.expert_store.cache.used  # the experts resident at the end (what the budget counts)
    else:  # a few tokens touch only some experts: the fully resident model's RSS once every expert was used
        warm_pages(model)
        res["peak_all_touched"] = _status()["VmHWM"]
    print(json.dumps(res))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
    _rss_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])


def markdown(res: dict) -> list[str]:
    mib = 2 ** 20
    n = res["tokens"]
    lines = [f"## {res['model']}", "",
             f"Expert bytes {res['expert_bytes'] / mib:.0f} MiB; {n} decode tokens per row, {res['threads']} threads, "
             "store and fully resident model alternating step by step in one process (eval/store_time.py). Cold start: "
             f"the first {n // 2} tokens (the store's cache holds only its pinned experts at the start); steady state: "
             f"the last {n - n // 2}. Ratio: median over the half's tokens of store / resident step time. What is "
             "cached where: every page of the resident model's buffers was read before the first row "
             f"({res.get('resident_bytes_touched', 0) / mib:.0f} MiB: its memory-mapped experts are in RAM, page cache); "
             "the store's slots are RAM, its misses are read from the checkpoint file with O_DIRECT (the page cache "
             "bypassed: the disk, or what the virtual disk's host caches).", ""]
    if "load_average" in res:
        avg, cpus = res["load_average"], res["cpus"]
        loaded = max(avg) > 0.75 * cpus
        lines += [f"Machine: {cpus} CPUs, 1-minute load average {avg[0]:.1f} at the start, {avg[1]:.1f} at the end"
                  + (": **LOADED** (other jobs shared the CPUs; times are noisy, ratios less so)." if loaded else "."),
                  ""]
    lines += [
             "CPU: the store's compute thread + its reader and prefetch threads (thread CPU clocks) over the resident "
             "model's compute thread, steady state; load-independent with --threads 1 (with more torch threads the "
             "OpenMP workers are not counted).", "",
             "| budget | policy | steady: time / token vs resident | CPU vs resident | store ms | resident ms | hit rate | "
             "served | stall ms / token | MiB read / token | cold start: vs resident | hit rate | stall ms / token | "
             "prefetch accuracy | logits equal resident | memory (experts) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    best = {}  # budget share -> lowest steady ratio (bold: only the row that wins its budget)
    for r in res["rows"]:
        best[r["share"]] = min(best.get(r["share"], float("inf")), r["steady"]["ratio"])
    for r in res["rows"]:
        acc = r["prefetch_accuracy"]
        mem = (r["budget"] + (0 if r["copies_in_budget"] else r["copy_bytes"])) / res["expert_bytes"]
        eq = {True: "yes", False: "NO", None: "- (copies)"}[r["logits_equal"]]
        st, co = r["steady"], r["cold"]
        ratio = f"{st['ratio']:.2f}x"
        ratio = f"**{ratio}**" if st["ratio"] == best[r["share"]] else ratio
        lines.append(f"| {100 * r['share']:.0f} % | {r['config']} | {ratio} | {st.get('cpu_ratio', 0):.2f}x | "
                     f"{1000 * st['store_s']:.0f} | "
                     f"{1000 * st['resident_s']:.0f} | {st['hit_rate']:.3f} | {st['served_rate']:.3f} | "
                     f"{1000 * st['stall_s_per_token']:.1f} | {st['bytes_per_token'] / mib:.1f} | {co['ratio']:.2f}x | "
                     f"{co['hit_rate']:.3f} | {1000 * co['stall_s_per_token']:.1f} | "
                     f"{'-' if acc is None else f'{acc:.2f}'} | {eq} | {mem:.0%} |")
    if not res["rss"]:
        return lines + [""]
    lines += ["", "Process RSS (a fresh process per row: load, then the same decode; VmHWM = peak):", "",
              "| experts | budget | peak RSS after load | peak RSS | anonymous at end | file-backed at end | "
              "anonymous beyond load + slots |",
              "|---|---|---|---|---|---|---|"]
    for r in res["rss"]:
        what = "fully resident" if r["share"] is None else f"store, {100 * r['share']:.0f} %"
        budget = "-" if r["share"] is None else f"{r['budget'] / mib:.0f} MiB"
        lines.append(f"| {what} | {budget} | {r['peak_after_load'] / mib:.0f} MiB | {r['peak'] / mib:.0f} MiB | "
                     f"{r['anon'] / mib:.0f} MiB | {r['file'] / mib:.0f} MiB | "
                     + ("-" if "slot_bytes" not in r else
                        f"{(r['smaps_anonymous'] - r['anon_after_load'] - r['slot_bytes']) / mib:.1f} MiB") + " |")
        if "peak_all_touched" in r:
            lines.append(f"| fully resident, every expert used once | - | - | {r['peak_all_touched'] / mib:.0f} MiB "
                         "| - | - | - |")
    return lines + [""]
