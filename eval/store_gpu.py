"""The expert store's GPU tier (bench_store.py --tier gpu): experts in pinned CPU memory, the fast tier a slot table
of preallocated device pools (StoreConfig(tier="pinned", gpu_slots=True); runtime/store/slots.py), on a lent GPU.

Time: a random-init Qwen3-MoE with Qwen3-30B-A3B's MoE dims (hidden 2048, 128 experts of width 768, top-8), 4 decoder
layers, RTN 4-bit experts (group 128, min-max), bf16 -- store_time.py's model, built on the GPU machine by this script
(initialised and quantized on the GPU; its 1.2 GiB checkpoint cannot travel there). One process holds the fully
resident model (every expert on the GPU, the CUDA pair path: runtime/cuda) and the store's model (the same kernels
over the slot pools, the non-resident experts read by the kernels from the pinned host copy, no host sync:
runtime/store/gpu_layer.py) and decodes random tokens with both, alternating step by step, each step timed between two
torch.cuda.synchronize() (store_time.interleaved). Budgets 25/50/75/100 % of the experts' bytes. Stall = the compute
stream's time in the host-copy launches (CUDA events): what the misses cost; copy ms = the side stream's time copying
missed and prefetched experts into slots (hidden behind the compute). The session-23 per-expert path (gpu_slots=False:
one expert at a time, a host sync per layer) as an A/B row at 50 %.

Hit rates: refmoe-qwen3 (RTN 4-bit, group 64: bench_edge.export_4bit's checkpoint), bf16 on the GPU, decoding eval
text one token at a time with a KV cache (teacher forcing). Its checkpoint, the tokenized texts, the routing
statistics (measured on calibration text) and the 2-bit copies (RTN of the float weights) are made on the CPU box
(`--gpu-prepare DIR`) and travel in DIR.

    .venv/bin/python eval/bench_store.py --gpu-prepare .store_carry                     # on the CPU box
    python3 eval/bench_store.py --tier gpu --gpu-data .store_carry --out-dir $OUT          # on the GPU machine
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

import store_time

BUDGETS = (0.25, 0.5, 0.75, 1.0)
GRAPHS = dict(gpu_graphs=True)  # each layer call one CUDA graph replay (runtime/store/slot_graphs.py)
# router prefetch + refine + precision gate with the prediction computed inside each layer's graph (session 27)
PREDICT_IN_GRAPH = dict(policy="lru", prefetch="router", prefetch_refine=True, prefetch_min_precision=0.5,
                        graph_prediction=True, **GRAPHS)
CONFIGS = [  # (name, StoreConfig fields besides the budget and tier, budget shares it runs at (None: all))
    # session 25's rows: every layer call's launches from the decode thread (gpu_graphs=False)
    ("on demand (every use from the pinned host copy)", dict(policy="demand", gpu_graphs=False), (0.5,)),
    ("LRU", dict(policy="lru", gpu_graphs=False), None),
    ("pin + LRU", dict(policy="lru", pin_share=0.5, gpu_graphs=False), None),
    ("pin + prefetch (router + refine, precision >= 0.5) (CPU default)", dict(store_time.DEFAULT, gpu_graphs=False),
     None),
    ("LRU, per-expert path (session 23: no slot table)", dict(policy="lru", gpu_slots=False), (0.5,)),
    # session 26: each layer call one graph replay (the GPU tier's default since)
    ("on demand, graphs", dict(policy="demand", **GRAPHS), None),
    ("LRU, graphs", dict(policy="lru", **GRAPHS), None),
    ("pin + LRU, graphs", dict(policy="lru", pin_share=0.5, **GRAPHS), None),
    ("pin + prefetch (router + refine, precision >= 0.5), graphs", dict(store_time.DEFAULT, graph_prediction=False,
                                                                         **GRAPHS), None),
    # session 27: layer l+1's router prediction inside layer l's graph (runtime/store/graph_predict.py)
    ("prefetch in graph (router + refine, precision >= 0.5)", dict(PREDICT_IN_GRAPH, pin_share=0.0), None),
    ("pin 0.25 + prefetch in graph", dict(PREDICT_IN_GRAPH, pin_share=0.25), None),
    ("pin + prefetch in graph (GPU default)", dict(PREDICT_IN_GRAPH, pin_share=0.5), None),
]
# STORE_GPU_PROFILE=1: per layer call, the wall (and CPU) time of the experts call and of the slot path's steps
PROFILE = os.environ.get("STORE_GPU_PROFILE") == "1"
# STORE_GPU_REPEAT=N: run the selected rows N times, in turn (A/B spread inside one call)
REPEAT = int(os.environ.get("STORE_GPU_REPEAT", "1"))
HIT_CONFIGS = [(n, f, s) for n, f, s in CONFIGS if "per-expert" not in n] + [
    ("pin + prefetch (paths)", dict(policy="lru", pin_share=0.5, prefetch="paths"), (0.5,))]


def model_config(layers: int, small: bool = False):
    """Qwen3-30B-A3B's MoE dims (bench_runtime.build_random_30b_dims) with `layers` layers; small: toy dims (a CPU
    check of this script)."""
    from transformers import Qwen3MoeConfig

    h, w, e, k, heads, kv = (2048, 768, 128, 8, 32, 4) if not small else (256, 128, 16, 4, 4, 2)
    return Qwen3MoeConfig(vocab_size=8192, hidden_size=h, intermediate_size=3 * h, moe_intermediate_size=w,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=128,
                          num_experts=e, num_experts_per_tok=k, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], max_position_embeddings=4096, tie_word_embeddings=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6}, dtype="bfloat16")


def build_checkpoint(out: Path, layers: int, device: str, small: bool = False) -> Path:
    """Random init on `device`, RTN 4-bit experts (group 128, min-max ranges) quantized there, exported (dense bf16)."""
    from transformers import AutoModelForCausalLM

    from moecompress.arch.adapters import describe
    from moecompress.artifacts.bit_plan import BitPlan
    from moecompress.export.checkpoint import export_checkpoint
    from moecompress.quantize.stage import QuantizeOptions, quantize_model

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(layers, small), dtype=torch.bfloat16)
    layout = describe(model)
    plan = BitPlan.uniform(layout, 4, group_size=128)
    quantized = quantize_model(model, layout, plan, None, QuantizeOptions(method="rtn", clip="minmax"), progress=False)
    export_checkpoint(model.to("cpu"), layout, plan, quantized, out, overwrite=True)
    return out


def prepare(directory: Path, args, tools) -> None:
    """CPU box: what the hit-rate part needs on the GPU machine, per model of --models, into `directory` (a folder
    that travels): NAME-rtn4/ (the checkpoint, tokenizer included) and NAME.pt (texts, statistics, copies)."""
    for name in args.models.split(","):
        _prepare_model(directory, name, args, tools)


def _prepare_model(directory: Path, name: str, args, tools) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bench_edge

    src = tools.SHARED / "models" / name
    ckpt = bench_edge.export_4bit(str(src), Path(args.work))
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ckpt, directory / f"{name}-rtn4", dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(src)
    calib = tools.docs(tools.SHARED / "data/corpus/calib.jsonl.gz", tok, args.calib_docs, args.length)
    texts = tools.docs(tools.SHARED / "data/corpus/eval.jsonl.gz", tok, args.docs, args.length)
    resident = tools.load(ckpt, torch.float32)
    stats = tools.routing_stats(resident, calib, stepwise=True)  # decode kernels only (no prefill path)
    copies = {}  # only the rows with low-bit copies use them
    if any("copy_threshold" in f for _, f, _ in HIT_CONFIGS):
        float_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        copies = tools.rtn_copies(float_model, resident, 2, 64, False)
    torch.save({"texts": texts, "stats": (stats.mass, stats.tokens, stats.paths), "copies": copies},
               directory / f"{name}.pt")


def _load(ckpt: Path, device: str):
    import moecompress

    kw = {"device_map": device} if device != "cpu" else {}
    return moecompress.from_pretrained(ckpt, dtype=torch.bfloat16, verify=False, **kw).eval()


def _tier(device: str) -> str:
    return "pinned" if device != "cpu" else "file"  # cpu: a check of this script without a GPU


def _config(budget: int, device: str, fields: dict | None = None):
    """The store of a row: the slot table unless the row says gpu_slots=False (the session-23 per-expert path)."""
    from moecompress.runtime.store import StoreConfig

    return StoreConfig(budget=budget, tier=_tier(device), **{"gpu_slots": True, **(fields or {})})


def _rows(budgets, configs, repeat: int = 1):
    for _ in range(repeat):
        for share in budgets:
            for name, fields, shares in configs:
                if shares is None or share in shares:
                    yield share, name, fields


class Profile:
    """Per layer call, the wall seconds (and the calling thread's CPU seconds where asked) of wrapped functions:
    the experts call of each model (PackedExperts.forward: the resident layer's CUDA path or the store's) and the
    slot path's steps. Wall minus CPU in the store's experts call = time the decode thread waited (the GIL, the
    table's lock). Eval-only: the wrappers are class attributes set for one row and removed after it."""

    def __init__(self):
        from moecompress.runtime.experts.packed_experts import PackedExperts
        from moecompress.runtime.store import deferred, gpu_layer, slot_graphs, slot_path, slots, store

        self.samples: dict[str, list[tuple[float, float]]] = {}
        self.undo = []
        self._wrap(PackedExperts, "forward", lambda m, *a: "experts (store)" if m.expert_store is not None
                   else "experts (resident)", cpu=True)
        self._wrap(store.ExpertStore, "forward", "store.forward")
        self._wrap(slot_path.SlotPath, "forward", "slot_path.forward", cpu=True)
        self._wrap(slots.SlotTable, "lookups", "eager: lookups")
        self._wrap(gpu_layer.SlotLayers, "forward", "eager: plans' launches")
        self._wrap(slot_path, "to_host", "to_host (per copy)", static=True)
        self._wrap(deferred.Bookkeeper, "submit", "submit")
        self._wrap(slot_graphs.GraphCall, "load", "graph: input copies")
        self._wrap(slot_graphs.GraphCall, "replay", "graph: replay + out copy")
        self._wrap(slot_graphs.GraphCall, "capture", "graph: capture check")
        self._wrap(slot_path.SlotPath, "account", "bookkeeping thread: account", cpu=True)

    def _wrap(self, owner, attr, name, cpu=False, static=False):
        orig = owner.__dict__[attr]
        samples = self.samples

        def wrapper(*a, **k):
            w0, c0 = time.perf_counter(), time.thread_time() if cpu else 0.0
            try:
                return orig(*a, **k)
            finally:
                w, c = time.perf_counter() - w0, (time.thread_time() - c0) if cpu else float("nan")
                samples.setdefault(name if isinstance(name, str) else name(*a), []).append((w, c))

        setattr(owner, attr, staticmethod(wrapper) if static and isinstance(owner, type) else wrapper)
        self.undo.append((owner, attr, orig))

    def close(self) -> dict:
        for owner, attr, orig in reversed(self.undo):
            setattr(owner, attr, orig)
        out = {}
        for name, xs in self.samples.items():
            half = xs[len(xs) // 2:]  # the steady half of the row
            out[name] = {"calls": len(xs), "wall_us_median": 1e6 * statistics.median(w for w, _ in half),
                         "wall_us_mean": 1e6 * statistics.fmean(w for w, _ in half),
                         "cpu_us_median": 1e6 * statistics.median(c for _, c in half)}
        return out


def run_time(args, tools, save) -> dict:
    """Every budget x CONFIGS on the 30B-dims model, store and resident alternating step by step."""
    from moecompress.runtime.experts.packed_experts import PackedExperts
    from moecompress.runtime.store import attach_store, detach_store

    device, t0 = args.device, time.time()
    ckpt = build_checkpoint(Path(args.work) / ("gpu-30b-dims-4l-4" + ("-small" if args.gpu_small else "")), 4,
                            device, args.gpu_small)
    built = time.time() - t0
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8192, (1, args.big_tokens + 1), generator=gen).to(device)
    calib = [torch.randint(0, 8192, (1, 64), generator=gen).to(device)]
    resident = _load(ckpt, device)
    stats = tools.routing_stats(resident, calib, stepwise=True)  # decode kernels only (no prefill path)
    t1 = time.time()
    copies = None  # of the main copies' dequantized weights, for rows with copies only
    if any("copy_threshold" in f for _, f, _ in CONFIGS):
        copies = tools.rtn_copies(None, resident, 2, 128, False)
    copies_s = time.time() - t1
    model = _load(ckpt, device)
    modules = [m for m in model.modules() if isinstance(m, PackedExperts)]
    total = store_time.expert_bytes(ckpt)
    res = {"model": "random-init Qwen3-30B-A3B MoE dims, 4 layers (time)", "device": _device_name(device),
           "expert_bytes": total, "tokens": args.big_tokens, "build_s": built, "copies_s": copies_s, "rows": []}
    warm = attach_store(model, ckpt, _config(total, device), stats=stats,
                        copies={})
    tier = warm.cache.tier
    try:  # compile the kernels of both paths (Triton) before the rows
        store_time.interleaved(resident, model, warm, ids[:, :5], exact=False)
    finally:
        detach_store(modules)
    res["warm_s"] = time.time() - t0 - built - copies_s
    configs = [c for c in CONFIGS if not args.configs or c[0] in args.configs]  # --configs: only these rows
    for share, name, fields in _rows(args.budgets, configs, REPEAT):
        budget = int(share * total)
        config = _config(budget, device, fields)
        t2 = time.time()
        profile = Profile() if PROFILE else None
        try:
            own_tier = fields.get("gpu_slots", True) is False  # the session-23 path: its own PinnedTier
            store = attach_store(model, ckpt, config, stats=stats, copies=copies if "copy_threshold" in fields else {},
                                 tier=None if own_tier else tier)
            tier = tier if own_tier else store.cache.tier
            attach_s = time.time() - t2
            try:
                store.reset_counters()
                r = store_time.interleaved(resident, model, store, ids, exact="copy_threshold" not in fields)
                r.update({k: v for k, v in store.counters().items() if k not in r})
            finally:
                detach_store(modules)
        except Exception as exc:  # one row's failure must not lose the others (one device call)
            r = {"error": f"{type(exc).__name__}: {exc}"}
            attach_s = None
        if profile is not None:
            r["profile"] = profile.close()
        res["rows"].append({"config": name, "share": share, "budget": budget, "attach_s": attach_s, **r})
        print(f"{share:.0%} {name}: " + _fmt_time(res["rows"][-1]), flush=True)
        for pname, p in r.get("profile", {}).items():
            print(f"    {pname}: {p['wall_us_median']:.1f} us median wall ({p['wall_us_mean']:.1f} mean), cpu "
                  f"{p['cpu_us_median']:.1f} us, {p['calls']} calls", flush=True)
        save(res)
    return res


def run_hits(args, tools, save, name: str = "refmoe-qwen3") -> dict:
    """Hit rates (and time per token, Δppl) of reference model `name` on the GPU tier, from --gpu-data."""
    from moecompress.format.expert_stats import ExpertStats
    from moecompress.runtime.experts.packed_experts import PackedExperts
    from moecompress.runtime.store import attach_store, detach_store

    device = args.device
    data = torch.load(Path(args.gpu_data) / f"{name}.pt")
    ckpt = Path(args.gpu_data) / f"{name}-rtn4"
    texts = [t.to(device) for t in data["texts"]]
    stats = ExpertStats.from_counts(*data["stats"])
    resident = _load(ckpt, device)
    base = tools.decode(resident, texts)
    del resident
    model = _load(ckpt, device)
    modules = [m for m in model.modules() if isinstance(m, PackedExperts)]
    probe = attach_store(model, ckpt, _config(1 << 50, device), stats=stats,
                         copies={})
    total, tier = sum(probe.cache.layout.nbytes.values()), probe.cache.tier
    detach_store(modules)
    res = {"model": name, "device": _device_name(device), "expert_bytes": total, "resident": base,
           "tokens": base["tokens"], "rows": []}
    configs = [c for c in HIT_CONFIGS if not args.configs or c[0] in args.configs]  # --configs: only these rows
    for share, row, fields in _rows([b for b in args.budgets if b < 1], configs):
        budget = int(share * total)
        try:
            config = _config(budget, device, fields)
            store = attach_store(model, ckpt, config, stats=stats,
                                 copies=data["copies"] if "copy_threshold" in fields else {}, tier=tier)
            try:
                store.reset_counters()
                r = tools.decode(model, texts)
                r.update(store.counters())
            finally:
                detach_store(modules)
            r.update(time_vs_resident=r["time_per_token_s"] / base["time_per_token_s"],
                     dppl_pct=100 * (r["ppl"] / base["ppl"] - 1))
        except Exception as exc:
            r = {"error": f"{type(exc).__name__}: {exc}"}
        res["rows"].append({"config": row, "share": share, "budget": budget, **r})
        print(f"{name} {share:.0%} {row}: " + (r.get("error") or tools.fmt(r)), flush=True)
        save(res)
    return res


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device != "cpu" else "cpu (a check of the script, not the GPU tier)"


def _fmt_time(r: dict) -> str:
    if "error" in r:
        return r["error"]
    st = r["steady"]
    copy = st.get("copy_s_per_token")
    return (f"steady {st['ratio']:.2f}x ({1000 * st['store_s']:.2f} vs {1000 * st['resident_s']:.2f} ms/token) hit "
            f"{st['hit_rate']:.3f} served {st['served_rate']:.3f} stall {1000 * st['stall_s_per_token']:.2f} ms/token "
            f"copies {'-' if copy is None else f'{1000 * copy:.2f}'} ms/token {st['bytes_per_token'] / 2**20:.1f} "
            f"MiB/token; cold {r['cold']['ratio']:.2f}x; max |Δlogit| {r['max_logit_diff']:.3g} equal "
            f"{r.get('logits_equal')} slots {r.get('slot_device_bytes')} graph_error {r.get('graph_error')} graph_waits "
            f"{r.get('graph_waits')} decode-thread cpu {1000 * st['store_cpu_s']:.2f} vs {1000 * st['resident_cpu_s']:.2f} "
            f"ms/token, background {1000 * st['background_cpu_s']:.2f} ms/token")


def markdown(results: dict, command: str) -> str:
    mib = 2 ** 20
    lines = ["# Tiered expert store, GPU tier: pinned CPU memory -> device slot table (issue 12)", "",
             f"`{command}`", "", __doc__.split("\n\n")[1].replace("\n", " "), ""]
    t = results.get("time")
    if t:
        full = next((r["steady"]["store_s"] for r in t["rows"] if r["share"] == 1.0 and "steady" in r), None)
        lines += [f"## {t['model']} -- {t['device']}", "",
                  f"Expert bytes {t['expert_bytes'] / mib:.0f} MiB; {t['tokens']} tokens per row (cold start: the "
                  f"first half, steady state: the second). Hidden copy time = 1 - (store ms - store ms at 100 %) / "
                  "copy ms (1: the copies cost no step time; 0: fully serial).", "",
                  "| budget | policy | steady: time / token vs resident | store ms | resident ms | hit rate | served "
                  "| MiB copied / token | copy ms / token (side stream) | stall ms / token | copy time hidden | "
                  "cold start: vs resident | prefetch accuracy | max abs logit diff vs resident | memory (experts) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            if "error" in r:
                lines.append(f"| {100 * r['share']:.0f} % | {r['config']} | error: {r['error'][:150]} |")
                continue
            st, acc = r["steady"], r["prefetch_accuracy"]
            copy = st.get("copy_s_per_token")
            hidden = "-"
            if full is not None and copy:
                hidden = f"{1 - max(0.0, st['store_s'] - full) / copy:.2f}"
            mem = (r["budget"] + (0 if r["copies_in_budget"] else r["copy_bytes"])) / t["expert_bytes"]
            lines.append(f"| {100 * r['share']:.0f} % | {r['config']} | {st['ratio']:.2f}x | {1000 * st['store_s']:.2f} "
                         f"| {1000 * st['resident_s']:.2f} | {st['hit_rate']:.3f} | {st['served_rate']:.3f} | "
                         f"{st['bytes_per_token'] / mib:.1f} | {'-' if copy is None else f'{1000 * copy:.2f}'} | "
                         f"{1000 * st['stall_s_per_token']:.2f} | {hidden} | {r['cold']['ratio']:.2f}x | "
                         f"{'-' if acc is None else f'{acc:.2f}'} | {r['max_logit_diff']:.3g} | {mem:.0%} |")
        lines.append("")
    for h in results.get("hits") or []:
        lines += [f"## {h['model']} (hit rates) -- {h['device']}", "",
                  f"{h['tokens']} eval tokens; fully resident {1000 * h['resident']['time_per_token_s']:.2f} ms per "
                  f"token, ppl {h['resident']['ppl']:.3f}.", "",
                  "| budget | policy | hit rate | served | KiB copied / token | prefetch accuracy | stall ms / token | "
                  "time / token vs resident | Δppl % |", "|---|---|---|---|---|---|---|---|---|"]
        for r in h["rows"]:
            if "error" in r:
                lines.append(f"| {100 * r['share']:.0f} % | {r['config']} | error: {r['error'][:150]} |")
                continue
            acc = r["prefetch_accuracy"]
            lines.append(f"| {100 * r['share']:.0f} % | {r['config']} | {r['hit_rate']:.3f} | {r['served_rate']:.3f} | "
                         f"{r['bytes_per_token'] / 1024:.1f} | {'-' if acc is None else f'{acc:.2f}'} | "
                         f"{1000 * r['stall_s_per_token']:.2f} | {r['time_vs_resident']:.2f}x | {r['dppl_pct']:+.2f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def run(args, tools, command: str) -> None:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, type(None)))}}

    def save(part):
        if "random-init" in part["model"]:
            results["time"] = part
        else:  # one entry per reference model
            hits = results.setdefault("hits", [])
            hits[:] = [h for h in hits if h["model"] != part["model"]] + [part]
        (out / f"{args.out}.json").write_text(json.dumps(results, indent=1, default=str))
        (out / f"{args.out}.md").write_text(markdown(results, command))

    for part in args.gpu_parts:
        t0 = time.time()
        try:
            if part == "time":
                run_time(args, tools, save)
            else:
                for name in args.models.split(","):
                    if (Path(args.gpu_data) / f"{name}.pt").exists():
                        run_hits(args, tools, save, name)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            print(f"part {part} failed: {exc}", flush=True)
        print(f"== part {part}: {time.time() - t0:.0f} s", flush=True)
    if results.get("hits"):  # hit rate vs budget per policy (bench_store.plot's form)
        tools.plot([{**h, "copy_bytes": None} for h in results["hits"]], out / f"{args.out}_hit_rate.png")
