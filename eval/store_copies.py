"""The low-bit copies' threshold chosen on calibration text, then Δppl and hit rates on evaluation text
(bench_store.py --copies).

Per reference model (RTN 4-bit checkpoint, group 64, bench_edge.export_4bit) at one expert budget (default 50 % of
the experts' bytes; the copies come on top of it, as in store_time.py's copies rows): the default store (pin 0.5 +
LRU + router prefetch with the second prediction) plus resident low-bit copies (RTN of the float model's weights,
group 64, 2 and 3 bits) in HOBBIT's mode (StoreConfig.copy_fetch: a miss under the threshold is computed by its copy
and its full expert read in the background for the next use; a read in flight is not waited for). The threshold is
relative (copy_relative: a multiple of the token's mean top-k routing weight, so one unit serves refmoe-qwen3's
renormalised top-4 and refmoe-olmoe's raw softmax weights).

Choice, on calibration text only: decode CALIB docs of calib.jsonl.gz (after the ones the routing statistics were
measured on) with the thresholds of the grid in ascending order, up to the first whose Δppl on that text exceeds
`--target` (0.4 %: a margin under the 0.5 % goal); the chosen threshold per model and bit-width is the last one
within it. Evaluation text (eval.jsonl.gz) is
decoded once per chosen threshold, never used to choose. Teacher forcing, one token at a time with a KV cache;
Δppl = ppl(store) / ppl(fully resident) - 1 on the same tokens.

--copy-shares S..: copies of a subset only, counted inside the budget (session 25): the exact store at the budget
decodes the calibration text the routing statistics come from and counts each expert's misses; copies are kept for
the experts with the most misses per copy byte within S x the experts' bytes (the slots get the rest of the budget).
"""
from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import torch

THRESHOLDS = (0.25, 0.5, 0.75, 1.0, 1000.0)  # x the token's mean top-k weight; 1000: every miss
EXACT = dict(policy="lru", pin_share=0.5, prefetch="router", prefetch_refine=True, prefetch_min_precision=0.5)


MODES = {  # --copies-mode: how a use below the threshold is decided
    # HOBBIT: a miss (or a read in flight) under the threshold runs on the copy, the full expert is read for next time;
    # which uses are misses depends on the reads' timing, so Δppl does too
    "fetch": dict(copy_fetch=True),
    # every use under the threshold runs on the copy, resident or not; the pinned experts keep no copies: Δppl
    # depends on the routing alone (reproducible), the copies' memory is that of the unpinned experts
    "deterministic": dict(copy_deterministic=True),
}


def copies_config(threshold: float, mode: str = "fetch") -> dict:
    return dict(EXACT, copy_threshold=threshold, copy_relative=True, copies_in_budget=False, **MODES[mode])


def miss_counts(ckpt, dtype, texts, budget: int, stats, tools) -> Counter:
    """(layer, expert) -> misses of the exact store (EXACT at `budget`) decoding `texts` (calibration text)."""
    from moecompress.runtime.store import StoreConfig, attach_store

    model = tools.load(ckpt, dtype)
    store = attach_store(model, ckpt, StoreConfig(budget=budget, **EXACT), stats=stats, copies={})
    counts: Counter = Counter()
    classify = store.cache.classify

    def counting(requests, **kw):  # this one store's cache only (a measurement)
        kinds = classify(requests, **kw)
        counts.update(key for (key, _), kind in zip(requests, kinds) if kind == "miss")
        return kinds

    store.cache.classify = counting
    try:
        tools.decode(model, texts)
    finally:
        store.close()
    return counts


def select_copies(copies: dict, counts: Counter, limit: int) -> tuple[dict, int]:
    """The copies (attach_store's form) of the experts with the most misses per copy byte within `limit` bytes, and
    their bytes."""
    from moecompress.runtime.store.attach import _without

    nbytes: Counter = Counter()  # (layer, expert) -> its copy's bytes (all projections)
    for layer, by_proj in copies.items():
        for d in by_proj.values():
            ids = list(d.get("experts", range(d["qweight"].shape[0])))
            for name in ("qweight", "scales", "zeros"):
                if name in d:
                    row = d[name][0].numel() * d[name].element_size()
                    nbytes.update({(layer, e): row for e in ids})
    keep, used = set(), 0
    for key in sorted(nbytes, key=lambda k: (-counts.get(k, 0) / nbytes[k], k)):
        if counts.get(key, 0) and used + nbytes[key] <= limit:
            keep.add(key)
            used += nbytes[key]
    return _without(copies, set(nbytes) - keep), used


def run_copies(name: str, args, tools) -> dict:
    """tools: bench_store's (docs, routing_stats, rtn_copies, decode, load, store_run, SHARED)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bench_edge
    from moecompress.runtime.store import StoreConfig, attach_store

    src = tools.SHARED / "models" / name
    ckpt = bench_edge.export_4bit(str(src), Path(args.work))
    tok = AutoTokenizer.from_pretrained(src)
    calib_all = tools.docs(tools.SHARED / "data/corpus/calib.jsonl.gz", tok, args.calib_docs + args.ppl_docs,
                           args.length)
    stats_docs, calib = calib_all[:args.calib_docs], calib_all[args.calib_docs:]
    evals = tools.docs(tools.SHARED / "data/corpus/eval.jsonl.gz", tok, args.ppl_docs, args.length)
    dtype = torch.float32
    resident = tools.load(ckpt, dtype)
    stats = tools.routing_stats(resident, stats_docs)
    float_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    copies = {b: tools.rtn_copies(float_model, resident, b, 64, False) for b in args.copy_bits}
    del float_model
    base = {"calib": tools.decode(resident, calib), "eval": tools.decode(resident, evals)}
    probe = attach_store(resident, ckpt, StoreConfig(budget=1 << 50), stats=stats, copies={})
    total = sum(probe.cache.layout.nbytes.values())
    probe.close()
    del resident
    budget = int(args.copies_budget * total)
    rows = []

    def row(text: str, config: dict, bits: int | None, threshold: float | None) -> dict:
        t0 = time.time()
        texts = calib if text == "calib" else evals
        r = tools.store_run(ckpt, dtype, texts, StoreConfig(budget=budget, **config), stats,
                            copies[bits] if bits else None)
        r.update(text=text, bits=bits, threshold=threshold, dppl_pct=100 * (r["ppl"] / base[text]["ppl"] - 1),
                 time_vs_resident=r["time_per_token_s"] / base[text]["time_per_token_s"], wall_s=time.time() - t0)
        print(name, text, bits, threshold, f"dppl {r['dppl_pct']:+.3f} % hit {r['hit_rate']:.3f} served "
              f"{r['served_rate']:.3f} subs {r['substitutions']} / {r['uses']} ({r['wall_s']:.0f} s)", flush=True)
        rows.append(r)
        return r

    row("eval", EXACT, None, None)
    chosen = {}
    if args.copy_shares:  # subsets by calibration misses per byte, inside the budget
        counts = miss_counts(ckpt, dtype, stats_docs, budget, stats, tools)
        full = copies
        copies, copy_bytes = {}, {}
        for bits in args.copy_bits:
            for share in args.copy_shares:
                key = f"{bits}@{share}"
                copies[key], copy_bytes[key] = select_copies(full[bits], counts, int(share * total))
                chosen[key] = None
                for t in THRESHOLDS:
                    config = dict(copies_config(t, args.copies_mode), copies_in_budget=True)
                    if row("calib", config, key, t)["dppl_pct"] > args.target:
                        break
                    chosen[key] = t
                if chosen[key] is not None:
                    row("eval", dict(copies_config(chosen[key], args.copies_mode), copies_in_budget=True), key,
                        chosen[key])
        return {"model": name, "checkpoint": str(ckpt), "expert_bytes": total, "budget": budget,
                "mode": args.copies_mode, "share": args.copies_budget, "target_pct": args.target, "chosen": chosen,
                "copy_bytes": copy_bytes, "copy_shares": args.copy_shares, "misses_counted": sum(counts.values()),
                "resident": base, "rows": rows, "tokens": {k: v["tokens"] for k, v in base.items()}}
    for bits in args.copy_bits:
        chosen[bits] = None
        for t in THRESHOLDS:  # ascending: more substitutions each; stop at the first over the target
            if row("calib", copies_config(t, args.copies_mode), bits, t)["dppl_pct"] > args.target:
                break
            chosen[bits] = t
        if chosen[bits] is not None:
            row("eval", copies_config(chosen[bits], args.copies_mode), bits, chosen[bits])
    return {"model": name, "checkpoint": str(ckpt), "expert_bytes": total, "budget": budget, "mode": args.copies_mode,
            "share": args.copies_budget, "target_pct": args.target, "chosen": chosen,
            "copy_bytes": {b: sum(t.numel() * t.element_size() for by in c.values() for d in by.values()
                                  for k, t in d.items() if k != "bits") for b, c in copies.items()},
            "resident": base, "rows": rows, "tokens": {k: v["tokens"] for k, v in base.items()}}


def markdown(results: list[dict]) -> list[str]:
    lines = ["# Low-bit copies in the expert store: threshold chosen on calibration text (issue 12)", "",
             __doc__.split("\n\n", 1)[1].strip(), ""]
    for res in results:
        mib = 2 ** 20
        lines += [f"## {res['model']}", "",
                  f"Expert bytes {res['expert_bytes'] / mib:.1f} MiB, budget {100 * res['share']:.0f} % "
                  f"({res['budget'] / mib:.1f} MiB) + copies "
                  + ", ".join(f"{str(b).replace('@', '-bit subset ')}{'' if '@' in str(b) else '-bit'} "
                              f"{v / mib:.1f} MiB ({v / res['expert_bytes']:.0%})"
                              for b, v in res["copy_bytes"].items())
                  + f"; tokens: calibration {res['tokens']['calib']}, evaluation {res['tokens']['eval']}; "
                  f"fully resident ppl {res['resident']['calib']['ppl']:.3f} (calibration text), "
                  f"{res['resident']['eval']['ppl']:.3f} (evaluation text). Mode: {res.get('mode', 'fetch')}. "
                  f"Chosen (Δppl <= "
                  f"{res['target_pct']} % on calibration text): "
                  + ", ".join(f"{b}-bit: {'none' if t is None else t}" for b, t in res["chosen"].items()), "",
                  "| text | copies | threshold (x mean top-k weight) | hit rate | served | substituted uses | "
                  "bytes fetched / token | Δppl % | memory (experts) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            thr = "-" if r["threshold"] is None else ("every miss" if r["threshold"] >= 1000 else f"{r['threshold']}")
            inside = r.get("copies_in_budget") and r["bits"]
            mem = res["budget"] + (r.get("copy_bytes", res["copy_bytes"][r["bits"]]) if r["bits"] and not inside
                                   else 0)
            what = "-" if not r["bits"] else str(r["bits"]).replace("@", "-bit, subset ") + ("" if inside else "-bit")
            lines.append(f"| {r['text']} | {what} | {thr} | "
                         f"{r['hit_rate']:.3f} | {r['served_rate']:.3f} | "
                         f"{r['substitutions'] / max(1, r['uses']):.3f} | "
                         f"{r['bytes_per_token'] / 1024:.1f} KiB | {r['dppl_pct']:+.3f} | "
                         f"{mem / res['expert_bytes']:.0%} |")
        lines.append("")
    return lines
