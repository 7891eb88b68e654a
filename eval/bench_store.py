"""The tiered expert store (issue 12): hit rates, bytes fetched, prefetch accuracy, time per token and the low-bit
copies' perplexity cost, decoding eval.jsonl.gz one token at a time with a KV cache (teacher forcing: the text's own
next token is fed, its log-probability gives the perplexity).

Part 1, reference models (refmoe-qwen3, refmoe-olmoe; RTN 4-bit experts, group 64, bench_edge.export_4bit's
checkpoints): expert budgets of 25/50/75 % of the experts' bytes; policies: load on demand (nothing kept beyond the
running layer), LRU, LFU, popularity-weighted, pinning (routing mass per byte, half the cache) + LRU, pinning +
prefetch (layer l+1's router on layer l's hidden state, or the activation paths), + 2-bit low-bit copies (RTN of the
model's own float weights, group 64) for misses routed below a threshold. The statistics (mass, paths) are
measured here on calib.jsonl.gz (these checkpoints predate expert_stats.safetensors); evaluation text is never used
for them. Disk tier: the checkpoint's safetensors read with O_DIRECT (page cache bypassed).

Part 2 (--time): time per token vs fully resident and process RSS on a random-init model with Qwen3-30B-A3B's MoE
dims, budgets 25/50/75 %, exact policies and with low-bit copies: see eval/store_time.py (interleaved with the
resident model in one process, 64 tokens per row reported as cold start (first half) and steady state (second
half); RSS in fresh subprocesses, `--no-rss` skips them).

Part 3 (--copies): the low-bit copies' threshold chosen on calibration text, Δppl on eval text (store_copies.py).
Part 4 (--tier gpu, on a GPU machine): the pinned-memory -> GPU tier, time on the 30B-dims model and hit rates on
refmoe-qwen3 (store_gpu.py; --gpu-prepare makes what the hit rates need on the CPU box).

    .venv/bin/python eval/bench_store.py --models refmoe-qwen3,refmoe-olmoe      # -> eval/results/store*.{json,md,png}
    .venv/bin/python eval/bench_store.py --time                                 # -> eval/results/store_time.{json,md}
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))

import moecompress  # noqa: E402
from moecompress.format.expert_stats import ExpertStats  # noqa: E402
from moecompress.quantize.rtn import quantize_rtn  # noqa: E402
from moecompress.runtime.experts.packed_experts import PackedExperts  # noqa: E402
from moecompress.runtime.store import StoreConfig, attach_store  # noqa: E402

RESULTS = ROOT / "eval" / "results"
SHARED = ROOT.parent / "shared"


def docs(path: Path, tokenizer, n: int, length: int) -> list[torch.Tensor]:
    out = []
    with gzip.open(path, "rt") as f:
        for line in f:
            ids = tokenizer(json.loads(line)["text"], return_tensors="pt").input_ids[:, :length]
            if ids.shape[1] == length:
                out.append(ids)
            if len(out) == n:
                break
    return out


def experts_modules(model) -> list[PackedExperts]:
    return [m for m in model.modules() if isinstance(m, PackedExperts)]


def routing_stats(model, texts: list[torch.Tensor], stepwise: bool = False) -> ExpertStats:
    """mass, tokens and layer-to-layer paths of the model's routing on `texts` (calibration text); stepwise: one token
    at a time with a KV cache (the same routing, no prefill kernels)."""
    mods = experts_modules(model)
    E = mods[0].num_experts
    L = len(mods)
    mass, tokens, paths = torch.zeros(L, E, dtype=torch.float64), torch.zeros(L, E), torch.zeros(max(L - 1, 0), E, E)
    seen: list = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((args[1].cpu(), args[2].cpu()))) for m in mods]
    with torch.no_grad():
        for ids in texts:
            seen.clear()
            if stepwise:
                past = None
                for t in range(ids.shape[1]):
                    past = model(ids[:, t:t + 1], past_key_values=past, use_cache=True).past_key_values
                steps = [seen[i:i + L] for i in range(0, len(seen), L)]  # per step: every layer's call
                seen[:] = [(torch.cat([s[layer][0] for s in steps]), torch.cat([s[layer][1] for s in steps]))
                           for layer in range(L)]
            else:
                model(ids)
            onehot = []
            for layer, (idx, w) in enumerate(seen):
                a = torch.zeros(idx.shape[0], E).scatter_(1, idx, 1.0)
                mass[layer] += torch.zeros(idx.shape[0], E, dtype=torch.float64).scatter_(1, idx, w.double()).sum(0)
                tokens[layer] += a.sum(0)
                onehot.append(a)
            for layer in range(L - 1):
                paths[layer] += onehot[layer].t() @ onehot[layer + 1]
    for h in hooks:
        h.remove()
    return ExpertStats.from_counts(mass, tokens, paths)


def rtn_copies(float_model, model, bits: int, group_size: int, symmetric: bool) -> dict:
    """Low-bit copies of every expert: RTN of the float model's weights (or, without one, of the main copies'
    dequantized weights), in attach_store's `copies` form."""
    from moecompress.arch.adapters import describe, proj_weights

    copies = {}
    if float_model is not None:
        layout = describe(float_model)
        for layer, m in enumerate(layout.moe_layers):
            experts = float_model.get_submodule(m.experts_path)
            copies[layer] = {}
            for p in m.projs:
                qw = quantize_rtn(proj_weights(experts, m, p.name).detach().float(), bits, group_size, symmetric)
                copies[layer][p.name] = {"bits": bits, "qweight": qw.packed(), "scales": qw.scales, "zeros": qw.zeros}
        return copies
    for layer, mod in enumerate(experts_modules(model)):
        copies[layer] = {}
        for proj in mod.proj_names:
            groups = list(getattr(mod, proj).children())
            first = groups[0]
            parts = {}
            for g in groups:  # a few experts at a time: a whole dequantized group is GiBs at 30B dims
                for i in range(0, len(g.experts), 8):
                    slots = list(range(i, min(i + 8, len(g.experts))))
                    qw = quantize_rtn(g.dequantized(slots, torch.float32), bits, group_size, symmetric)
                    packed = qw.packed()  # once per chunk
                    for j, s in enumerate(slots):
                        parts[g.experts[s]] = (packed[j], qw.scales[j], qw.zeros[j])
            order = [parts[e] for e in range(mod.num_experts)]
            copies[layer][proj] = {"bits": bits, **{k: torch.stack([p[n] for p in order])
                                                    for n, k in enumerate(("qweight", "scales", "zeros"))}}
    return copies


def decode(model, texts: list[torch.Tensor]) -> dict:
    """Teacher-forced decoding one token at a time with a KV cache: per-token seconds and the NLL."""
    times, nll, n = [], 0.0, 0
    with torch.no_grad():
        for ids in texts:
            past = None
            for t in range(ids.shape[1] - 1):
                start = time.perf_counter()
                out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
                times.append(time.perf_counter() - start)
                past = out.past_key_values
                nll -= float(torch.log_softmax(out.logits[0, -1].float(), -1)[ids[0, t + 1]])
                n += 1
    return {"time_per_token_s": statistics.median(times), "ppl": math.exp(nll / n), "tokens": n}


def load(ckpt: Path, dtype):
    return moecompress.from_pretrained(ckpt, dtype=dtype, verify=False).eval()


def store_run(ckpt: Path, dtype, texts, config: StoreConfig, stats, copies=None) -> dict:
    model = load(ckpt, dtype)
    store = attach_store(model, ckpt, config, stats=stats, copies=copies if config.copy_threshold is not None else {})
    try:
        store.reset_counters()
        res = decode(model, texts)
        res.update(store.counters())
    finally:
        store.close()
    return res


CONFIGS = {  # name -> StoreConfig fields besides the budget
    "on demand": dict(policy="demand"),
    "LRU": dict(policy="lru"),
    "LFU": dict(policy="lfu"),
    "popularity": dict(policy="popularity"),
    "pin + LRU": dict(policy="lru", pin_share=0.5),
    "prefetch (router), no pin": dict(policy="lru", prefetch="router"),
    "pin + prefetch (router)": dict(policy="lru", pin_share=0.5, prefetch="router"),
    "pin 0.4 + prefetch (router)": dict(policy="lru", pin_share=0.4, prefetch="router"),
    "pin + prefetch (router), width 3": dict(policy="lru", pin_share=0.5, prefetch="router", prefetch_width=3),
    "pin + prefetch (router, score >= 2/E)": dict(policy="lru", pin_share=0.5, prefetch="router", prefetch_floor=2.0),
    "pin + prefetch (router, precision >= 0.3)": dict(policy="lru", pin_share=0.5, prefetch="router",
                                                      prefetch_min_precision=0.3),
    "pin + prefetch (router, precision >= 0.5)": dict(policy="lru", pin_share=0.5, prefetch="router",
                                                      prefetch_min_precision=0.5),
    "pin + prefetch (router + refine, precision >= 0.5) (default)": dict(
        policy="lru", pin_share=0.5, prefetch="router", prefetch_refine=True, prefetch_min_precision=0.5),
    "pin 0.25 + prefetch (router + refine, precision >= 0.5)": dict(
        policy="lru", pin_share=0.25, prefetch="router", prefetch_refine=True, prefetch_min_precision=0.5),
    "no pin + prefetch (router + refine, precision >= 0.5)": dict(
        policy="lru", pin_share=0.0, prefetch="router", prefetch_refine=True, prefetch_min_precision=0.5),
    "cyclic": dict(policy="cyclic"),
    "pin + cyclic + prefetch (router)": dict(policy="cyclic", pin_share=0.5, prefetch="router"),
    "pin + prefetch (paths)": dict(policy="lru", pin_share=0.5, prefetch="paths"),
    # the copies (about half the main copies' bytes at 2 vs 4 bits) do not fit inside a 25-50 % budget: they come
    # on top of it here, and the table gives the total memory
    "pin + prefetch + 2-bit copies": dict(policy="lru", pin_share=0.5, prefetch="router", prefetch_refine=True,
                                          prefetch_min_precision=0.5, copy_threshold=None, copies_in_budget=False),
}


def run_model(name: str, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bench_edge

    src = SHARED / "models" / name
    ckpt = bench_edge.export_4bit(str(src), Path(args.work))
    tok = AutoTokenizer.from_pretrained(src)
    calib = docs(SHARED / "data/corpus/calib.jsonl.gz", tok, args.calib_docs, args.length)
    texts = docs(SHARED / "data/corpus/eval.jsonl.gz", tok, args.docs, args.length)
    dtype = torch.float32
    resident = load(ckpt, dtype)
    stats = routing_stats(resident, calib)
    float_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    copies = rtn_copies(float_model, resident, 2, 64, False)
    del float_model
    base_before = decode(resident, texts)
    probe = attach_store(resident, ckpt, StoreConfig(budget=1 << 50), stats=stats, copies={})
    total = sum(probe.cache.layout.nbytes.values())
    copy_bytes = sum(t.numel() * t.element_size() for by in copies.values() for d in by.values()
                     for k, t in d.items() if k != "bits")
    probe.close()
    del resident
    rows = []
    for share in args.budgets:
        budget = int(share * total)
        for cname, fields in CONFIGS.items():
            if args.configs and cname not in args.configs:
                continue
            fields = dict(fields)
            if "copy_threshold" in fields:
                for thr in args.thresholds:
                    fields["copy_threshold"] = thr
                    r = store_run(ckpt, dtype, texts, StoreConfig(budget=budget, **fields), stats, copies)
                    rows.append({"config": f"{cname} (w < {thr})", "share": share, "budget": budget, **r})
                    print(name, share, rows[-1]["config"], fmt(rows[-1]), flush=True)
                continue
            r = store_run(ckpt, dtype, texts, StoreConfig(budget=budget, **fields), stats)
            rows.append({"config": cname, "share": share, "budget": budget, **r})
            print(name, share, cname, fmt(rows[-1]), flush=True)
    base_after = decode(load(ckpt, dtype), texts)
    base_t = (base_before["time_per_token_s"] + base_after["time_per_token_s"]) / 2
    for r in rows:
        r["time_vs_resident"] = r["time_per_token_s"] / base_t
        r["dppl_pct"] = 100 * (r["ppl"] / base_before["ppl"] - 1)
    return {"model": name, "checkpoint": str(ckpt), "expert_bytes": total, "copy_bytes": copy_bytes,
            "resident": {"before": base_before, "after": base_after}, "rows": rows,
            "docs": len(texts), "length": args.length}


def fmt(r: dict) -> str:
    acc = r["prefetch_accuracy"]
    return (f"hit {r['hit_rate']:.3f} served {r['served_rate']:.3f} bytes/tok {r['bytes_per_token']:.0f} "
            f"prefetch acc {'-' if acc is None else f'{acc:.2f}'} t/tok {1000 * r['time_per_token_s']:.1f} ms "
            f"stall/tok {1000 * r['stall_s_per_token']:.1f} ms ppl {r['ppl']:.3f} subs {r['substitutions']}")


def markdown(results: list[dict]) -> str:
    lines = ["# Tiered expert store (issue 12)", "",
             "Generated by `eval/bench_store.py` (see its docstring for the setup). Hit rate: expert uses served by a "
             "resident exact copy; served: hits + low-bit substitutions. Time per token: median over the run's tokens, "
             "relative to the fully resident model measured before and after (2-core shared machine: noisy).", ""]
    for res in results:
        base = res["resident"]
        lines += [f"## {res['model']}", "",
                  f"Expert bytes {res['expert_bytes'] / 2**20:.1f} MiB"
                  + (f", 2-bit copies {res['copy_bytes'] / 2**20:.1f} MiB (on top of the budget in the copies rows)" if res.get("copy_bytes") else "")
                  + f"; fully resident: {1000 * base['before']['time_per_token_s']:.1f} / "
                  f"{1000 * base['after']['time_per_token_s']:.1f} ms per token (before / after), "
                  f"ppl {base['before']['ppl']:.3f}.", "",
                  "| budget | policy | hit rate | served | read in flight at use | bytes fetched / token | prefetch accuracy "
                  "| stall ms / token | time / token vs resident | Δppl % | substitutions | memory (experts) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            acc = r["prefetch_accuracy"]
            late = r.get("late_prefetches", 0) / max(1, r.get("uses", 0))  # prefetched, read not finished at use
            lines.append(f"| {100 * r['share']:.0f} % | {r['config']} | {r['hit_rate']:.3f} | {r['served_rate']:.3f} | "
                         f"{late:.3f} | {r['bytes_per_token'] / 1024:.1f} KiB | {'-' if acc is None else f'{acc:.2f}'} | "
                         f"{1000 * r['stall_s_per_token']:.2f} | {r['time_vs_resident']:.2f}x | "
                         f"{r.get('dppl_pct', float('nan')):+.2f} | {r['substitutions']} | "
                         f"{(r['budget'] + (0 if r['copies_in_budget'] else r['copy_bytes'])) / res['expert_bytes']:.0%} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [r for r in results if "copy_bytes" in r]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, res in zip(axes[0], models):
        configs = dict.fromkeys(r["config"] for r in res["rows"])
        for c in configs:
            pts = sorted((r["share"], r["hit_rate"]) for r in res["rows"] if r["config"] == c)
            ax.plot([100 * s for s, _ in pts], [h for _, h in pts], marker="o", label=c)
        ax.axhline(0.9, color="grey", ls=":", lw=1)
        ax.set(title=res["model"], xlabel="expert budget (% of expert bytes)", ylabel="hit rate (exact, resident)",
               ylim=(0, 1.02))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="refmoe-qwen3")
    ap.add_argument("--budgets", type=float, nargs="+", help="shares of the experts' bytes (default 0.25 0.5 0.75; "
                    "--tier gpu: and 1.0)")
    ap.add_argument("--tier", choices=("disk", "gpu"), default="disk",
                    help="gpu: the pinned-memory -> GPU tier on a GPU machine (store_gpu.py)")
    ap.add_argument("--gpu-prepare", metavar="DIR", help="only: write what --tier gpu's hit rates need into DIR")
    ap.add_argument("--gpu-data", metavar="DIR", help="--tier gpu: the folder --gpu-prepare wrote")
    ap.add_argument("--gpu-parts", nargs="+", default=["time", "hits"], choices=("time", "hits"))
    ap.add_argument("--gpu-small", action="store_true", help="--tier gpu: toy dims instead of 30B-A3B's (a check)")
    ap.add_argument("--device", default="cuda", help="--tier gpu: cpu runs the script on the file tier (a check)")
    ap.add_argument("--out-dir", default=str(RESULTS), help="--tier gpu: where OUT.md/json go")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--calib-docs", type=int, default=16)
    ap.add_argument("--length", type=int, default=65)
    ap.add_argument("--time", "--big", action="store_true", dest="time",
                    help="part 2: time per token and RSS on the 30B-dims model (store_time.py)")
    ap.add_argument("--big-tokens", type=int, default=64,
                    help="--time: decode tokens per row (the first half: cold start, the second: steady state)")
    ap.add_argument("--no-rss", action="store_false", dest="rss", help="--time: skip the RSS subprocesses")
    ap.add_argument("--time-copy-bits", type=int, default=2, help="--time: bits of the copies rows' RTN copies")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/moecompress-bench-edge")
    ap.add_argument("--out", default="store")
    ap.add_argument("--configs", nargs="+", help="only these of CONFIGS")
    ap.add_argument("--merge", nargs="+", help="only: write OUT.md/_hit_rate.png from these result JSON files")
    ap.add_argument("--copies", action="store_true",
                    help="part 3: the copies' threshold chosen on calibration text, Δppl on eval text "
                         "(store_copies.py)")
    ap.add_argument("--copy-bits", type=int, nargs="+", default=[2, 3], help="--copies: bit-widths of the copies")
    ap.add_argument("--copies-budget", type=float, default=0.5, help="--copies: budget share")
    ap.add_argument("--copy-shares", type=float, nargs="+", default=[],
                    help="--copies: copies of the experts with the most calibration misses per byte only, within "
                         "these shares of the experts' bytes, inside the budget (store_copies.select_copies)")
    ap.add_argument("--ppl-docs", type=int, default=16, help="--copies: docs of each text for Δppl")
    ap.add_argument("--target", type=float, default=0.4, help="--copies: highest Δppl %% on calibration text")
    ap.add_argument("--copies-mode", choices=("fetch", "deterministic"), default="fetch",
                    help="--copies: store_copies.MODES")
    ap.add_argument("--time-copy-thresholds", type=float, nargs="+", default=[],
                    help="--time: also rows with deterministic copies (copy_deterministic) at these thresholds "
                         "(x the token's mean top-k weight)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    if args.gpu_prepare or args.tier == "gpu":
        import types

        import store_gpu

        tools = types.SimpleNamespace(docs=docs, routing_stats=routing_stats, rtn_copies=rtn_copies, decode=decode,
                                      load=load, fmt=fmt, plot=plot, SHARED=SHARED)
        if args.gpu_prepare:
            store_gpu.prepare(Path(args.gpu_prepare), args, tools)
            return
        args.budgets = args.budgets or list(store_gpu.BUDGETS)
        args.out = args.out if args.out != "store" else "store_gpu"
        store_gpu.run(args, tools, " ".join(sys.argv))
        return
    args.budgets = args.budgets or [0.25, 0.5, 0.75]
    if args.merge:
        results = []
        for f in args.merge:  # runs of one model (e.g. extra configurations) join its table
            for r in json.loads(Path(f).read_text())["results"]:
                same = [x for x in results if x["model"] == r["model"]]
                if same:
                    same[0]["rows"] = sorted(same[0]["rows"] + r["rows"], key=lambda row: row["share"])
                else:
                    results.append(r)
        (RESULTS / f"{args.out}.md").write_text(markdown(results))
        plot(results, RESULTS / f"{args.out}_hit_rate.png")
        return
    if args.time:
        import store_time

        args.shared, out = SHARED, args.out if args.out != "store" else "store_time"
        res = store_time.run_time(args, load, routing_stats, rtn_copies)
        (RESULTS / f"{out}.json").write_text(json.dumps({"args": {**vars(args), "shared": str(SHARED)},
                                                         "results": [res]}, indent=1))
        (RESULTS / f"{out}.md").write_text("\n".join(["# Tiered expert store: time per token and RSS (issue 12)", "",
                                                      f"`{' '.join(sys.argv)}`", "", *store_time.markdown(res)]))
        return
    if args.copies:
        import types

        import store_copies

        tools = types.SimpleNamespace(docs=docs, routing_stats=routing_stats, rtn_copies=rtn_copies, decode=decode,
                                      load=load, store_run=store_run, SHARED=SHARED)
        out = args.out if args.out != "store" else "store_copies"
        results = [store_copies.run_copies(m, args, tools) for m in args.models.split(",")]
        (RESULTS / f"{out}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
        (RESULTS / f"{out}.md").write_text("\n".join([f"`{' '.join(sys.argv)}`", "", *store_copies.markdown(results)]))
        return
    results = [run_model(m, args) for m in args.models.split(",")]
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    (RESULTS / f"{args.out}.md").write_text(markdown(results))
    plot(results, RESULTS / f"{args.out}_hit_rate.png")


if __name__ == "__main__":
    main()
