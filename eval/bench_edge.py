"""Edge deployment benchmark: each placement on its real execution model, bytes, round trips and modeled time.

Each reference model is RTN-quantized to 4-bit experts (group 64) and exported; its exact stored bytes by layer are
what placement sees. For every server count (equal memory per server: all dense weights + `--slack` x its share of
the expert bytes), placements are made from the routing of the calibration split and measured by replaying
the routing of held-out eval text through moecompress/execution/replay.py -- the counters the runtime produces on the
same text. Expert model (home = server 0, which alone holds the dense weights): contiguous, round_robin,
greedy_balanced, affinity (ours), affinity + hot-expert replicas. Pipeline model: all_servers (the classic layout)
and fewest_servers. Time model (execution/timing.py): measured compute on the critical path + one-way hops x
latency + bytes / bandwidth, LAN (1 Gbit/s, 0.5 ms) and WAN (100 Mbit/s, 5 ms), with 1 and 8 concurrent sequences.

Compute: per decoder layer and per MoE experts block, measured (thread CPU time) with forward hooks on the exported
checkpoint loaded by the runtime (moecompress.from_pretrained: the packed 4-bit modules every rank runs, bf16, 1
thread) in one process, as a ComputeProfile (decode: shard/profile.measure_profile, what `moecompress profile`
writes, with the expert model's dispatch measured on the runtime's own dispatcher; prefill: layers only, no
dispatch); timing.profile_compute puts it on the critical path of each placement (the code `moecompress shard --mode
auto` plans with): expert-model ranks compute their share of each layer's experts time (by routed pairs, the home's
own share overlapping the others', as the dispatcher does) plus their requests' decoding/encoding, the home the
rest plus its routing and each request's handling; pipeline stages one after the other. eval/bench_edge_sim.py
compares this compute with the runtime's own simulation.

"auto: ..." rows: what `moecompress shard` (default --mode auto) chooses for each link profile and batch, from the
calibration trace and the measured profile (a baseline is kept unless another candidate is modeled faster by more
than 2 %, shard/choose.py), then replayed on the held-out text like every other row. The last table
per server count compares it with the best baseline (expert contiguous / round_robin / greedy_balanced, pipeline
all_servers): chosen with the matching --link/--batch, chosen without --link (planned for LAN and WAN together:
the smallest worst ratio to the best baseline over both, shard/choose.py) at that batch, and with the plain
defaults (no --link, --batch 1).

    .venv/bin/python eval/bench_edge.py        # writes eval/results/edge.{md,json}
    .venv/bin/python eval/bench_edge.py --big --samples 32 --seq-len 128 --eval-samples 16 --eval-len 128 --reps 3
        # random-init model with Qwen3-30B-A3B's MoE dims, 4 layers, untrained routing: eval/results/edge_30b.{md,json}
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moecompress.arch.adapters import describe  # noqa: E402
from moecompress.calibrate.options import CalibrationOptions  # noqa: E402
from moecompress.calibrate.run import calibrate  # noqa: E402
from moecompress.execution.replay import Call, replay  # noqa: E402
from moecompress.execution.timing import PROFILES, ComputeProfile, modeled_time, profile_compute  # noqa: E402
from moecompress.shard import ServerSpec, place, replicate_hot, traffic_row  # noqa: E402
from moecompress.shard.command import checkpoint_layer_sizes, routing_stats  # noqa: E402
from moecompress.shard.choose import decide, for_link, time_candidates  # noqa: E402
from moecompress.shard.compare import BASELINES  # noqa: E402
from moecompress.shard.profile import measure_profile  # noqa: E402

CONFIGS = [  # (row name, mode, method, replicas, balance)
    ("expert: contiguous", "expert", "contiguous", False, "total"),
    ("expert: round_robin", "expert", "round_robin", False, "total"),
    ("expert: greedy_balanced", "expert", "greedy_balanced", False, "total"),
    ("expert: affinity (ours)", "expert", "affinity", False, "total"),
    ("expert: affinity + replicas", "expert", "affinity", True, "total"),
    ("expert: affinity, layer balance", "expert", "affinity", False, "layer"),
    ("pipeline: all_servers", "pipeline", "all_servers", False, "total"),
    ("pipeline: fewest_servers", "pipeline", "fewest_servers", False, "total"),
]
BATCHES = (1, 8)
BIG_NOTE = ("Random-init Qwen3-MoE with Qwen3-30B-A3B's MoE dims (hidden 2048, 128 experts of width 768, top-8, "
            "32/4 heads of 128), {layers} decoder layers, vocab 8192 (refmoe-qwen3's tokenizer); 4-bit RTN experts "
            "(group 128), dense weights bf16. ROUTING IS NOT TRAINED: its random routers route the real text "
            "near uniformly (recorded with the bf16 model), so the expert model's placements find little co-activation structure; the compute "
            "per layer is that of the real dims. Decode only. {layers} layers: a real 48-layer model has "
            "48/{layers}x the per-token compute and (expert model) up to 48/{layers}x the round trips; the "
            "pipeline's hops per token depend on its stages, not on depth.\n")


def export_4bit(model_path: str, work: Path) -> Path:
    """RTN 4-bit experts, group 64, exported once into `work` (reused when present)."""
    from transformers import AutoModelForCausalLM

    from moecompress.artifacts.bit_plan import BitPlan
    from moecompress.export.checkpoint import export_checkpoint
    from moecompress.quantize.stage import QuantizeOptions, quantize_model

    out = work / f"{Path(model_path).name}-rtn4"
    if not (out / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
        layout = describe(model)
        plan = BitPlan.uniform(layout, 4, group_size=64)
        quantized = quantize_model(model, layout, plan, None, QuantizeOptions(method="rtn"), progress=False)
        export_checkpoint(model, layout, plan, quantized, out, overwrite=True)
    return out


def measure_compute(model, layout, batch: int, new_tokens: int, context: int, reps: int) -> dict:
    """CPU seconds of this thread per forward call (torch runs on it alone: 1 thread): total, per decoder layer [D],
    per MoE experts block [L]; the fastest of `reps` calls. CPU time, not wall time, so that other work on a shared
    machine (which preempts this process) is not counted as compute."""
    layers = model.get_submodule(layout.decoder_layers_path)
    experts = [model.get_submodule(m.experts_path) for m in layout.moe_layers]
    marks: dict[tuple, float] = {}
    handles = []
    for kind, mods in (("layer", list(layers)), ("moe", experts)):
        for i, mod in enumerate(mods):
            handles.append(mod.register_forward_pre_hook(lambda *_, k=(kind, i): marks.__setitem__((*k, 0), time.thread_time())))
            handles.append(mod.register_forward_hook(lambda *_, k=(kind, i): marks.__setitem__(
                (*k, 1), marks.get((*k, 1), 0.0) + time.thread_time() - marks[(*k, 0)])))
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    totals, layer_t, moe_t = [], [], []
    with torch.no_grad():
        for _ in range(reps):
            past = None
            if new_tokens == 1:  # a decode step after `context` tokens of cache
                out = model(torch.randint(0, vocab, (batch, context), generator=gen), use_cache=True)
                past = out.past_key_values
            ids = torch.randint(0, vocab, (batch, new_tokens), generator=gen)
            for key in [k for k in marks if k[2] == 1]:
                marks[key] = 0.0
            start = time.thread_time()
            model(ids, past_key_values=past, use_cache=past is not None)
            totals.append(time.thread_time() - start)
            layer_t.append([marks.get(("layer", i, 1), 0.0) for i in range(len(layers))])
            moe_t.append([marks.get(("moe", i, 1), 0.0) for i in range(len(experts))])
    for h in handles:
        h.remove()
    best = int(np.argmin(totals))
    return {"total": float(totals[best]), "layers": layer_t[best], "moe": moe_t[best]}


def as_profile(compute: dict, batch: int, context: int, moe_decoder_layers) -> ComputeProfile:
    """measure_compute's result as the ComputeProfile that `moecompress shard` plans with (execution/timing.py)."""
    return ComputeProfile(batch=batch, context=context, layer_seconds=tuple(compute["layers"]),
                          moe_seconds=tuple(compute["moe"]), moe_decoder_layers=tuple(moe_decoder_layers),
                          head_seconds=max(compute["total"] - sum(compute["layers"]), 0.0),
                          source="bench_edge: runtime model, thread CPU time, min of reps")


def calls_for(trace: np.ndarray, batch: int, kind: str) -> tuple[np.ndarray, list[Call]]:
    """trace [n, S, L, k] of n sequences -> (experts [T, L, k] in call order, calls): decode steps or prefills of
    `batch` sequences at a time."""
    n, S = trace.shape[:2]
    groups = [trace[g:g + batch] for g in range(0, n - batch + 1, batch)]
    if kind == "prefill":
        return np.concatenate([g.reshape(-1, *trace.shape[2:]) for g in groups]), [Call(batch, S, S)] * len(groups)
    experts = np.concatenate([g.transpose(1, 0, 2, 3).reshape(-1, *trace.shape[2:]) for g in groups])
    return experts, [Call(batch, 1, j + 1) for _ in groups for j in range(S)]


def run_model(path: str, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    checkpoint = export_4bit(path, Path(args.work))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return place_and_replay(Path(path).name, model, tokenizer, checkpoint, args, CONFIGS, ("decode", "prefill"), t0)


def build_big(args) -> tuple[Path, Path]:
    """A random-init Qwen3-MoE with Qwen3-30B-A3B's MoE dims (the config of bench_runtime.build_random_30b_dims:
    hidden 2048, 128 experts of width 768, top-8, 32/4 heads of 128) with `args.big_layers` decoder layers, vocab
    8192 = refmoe-qwen3's tokenizer, whose files it gets; RTN 4-bit experts (group 128, min-max ranges, dense weights
    bf16) exported by bench_cpu.export_plans."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "eval"))
    import bench_cpu
    import bench_runtime

    work = Path(args.work)
    dims = work / "big-30b-dims-bf16"  # bench_runtime's model (2 layers): its config gives the dims
    if not (dims / "config.json").exists():
        bench_runtime.build_random_30b_dims(dims, vocab=8192)
    bf16 = work / f"big-30b-dims-{args.big_layers}l-bf16"
    if not (bf16 / "config.json").exists():
        config = AutoConfig.from_pretrained(dims)
        config.num_hidden_layers = args.big_layers
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(bf16)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (bf16 / name).write_bytes((Path(args.tokenizer) / name).read_bytes())
    checkpoint = bench_cpu.export_plans(bf16, work, f"big-30b-dims-{args.big_layers}l", ["4"],
                                        bench_cpu.GROUP_SIZE["b"], "16")["4"]
    return bf16, checkpoint


def run_big(args) -> dict:
    """--big: the expert model's and the pipeline's placements on the random-init 30B-A3B-dims model; routing of its
    untrained routers on real text (near uniform)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    bf16, checkpoint = build_big(args)
    model = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16).eval()  # routing in bf16: 5 GB less
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if len(tokenizer) > model.config.vocab_size:
        raise SystemExit(f"tokenizer has {len(tokenizer)} ids, the model's vocab is {model.config.vocab_size}")
    configs = [c for c in CONFIGS if c[4] == "total"]  # every placement but the layer-balance variant
    res = place_and_replay(f"random-init Qwen3-MoE, 30B-A3B MoE dims, {args.big_layers} layers (routing NOT trained)", model,
                           tokenizer, checkpoint, args, configs, ("decode",), t0)
    res["routing_trained"] = False
    return res


def place_and_replay(name: str, model, tokenizer, checkpoint: Path, args, configs, kinds, t0: float) -> dict:
    """Routing of `model` (calibration split: placement; held-out eval: replay), compute of the runtime model
    loaded from `checkpoint`, and every configuration at every server count."""
    import moecompress

    layout = describe(model)
    calib = calibrate(model, tokenizer, args.calib, CalibrationOptions(samples=args.samples, seq_len=args.seq_len,
                                                                       hessians=False, progress=False, trace=True))
    held = calibrate(model, tokenizer, args.eval, CalibrationOptions(samples=args.eval_samples, seq_len=args.eval_len,
                                                                     hessians=False, progress=False, trace=True,
                                                                     seed=1))
    T = held.trace_indices.shape[0]
    if T != args.eval_samples * args.eval_len:
        raise SystemExit(f"eval trace has {T} tokens, expected {args.eval_samples} x {args.eval_len} (padding?)")
    trace = held.trace_indices.numpy().astype(np.int64).reshape(args.eval_samples, args.eval_len,
                                                                 *held.trace_indices.shape[1:])
    stats = routing_stats(calib)
    sizes = checkpoint_layer_sizes(checkpoint)
    hidden = model.config.hidden_size
    del model
    runtime_model = moecompress.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    # decode: `moecompress profile`'s own measurement (dispatch included); prefill: per layer only (no dispatch)
    decode = {b: measure_profile(checkpoint, batch=b, context=args.eval_len, reps=args.reps, model=runtime_model)
              for b in BATCHES if "decode" in kinds}
    compute = {(kind, b): measure_compute(runtime_model, layout, b, args.eval_len, args.eval_len, args.reps)
               for kind in kinds for b in BATCHES if kind == "prefill"}
    compute.update({("decode", b): {"total": p.head_seconds + sum(p.layer_seconds), "layers": list(p.layer_seconds),
                                    "moe": list(p.moe_seconds), "profile": p.to_json()} for b, p in decode.items()})
    del runtime_model
    print(f"{name}: routing + compute measured in {time.time() - t0:.0f}s", flush=True)
    replays = {(kind, b): calls_for(trace, b, kind) for kind in kinds for b in BATCHES}
    result = {"model": name, "hidden_size": hidden, "dense_bytes": sizes.dense_bytes,
              "expert_bytes": int(sizes.expert_bytes.sum()), "eval_tokens": T, "calib_tokens": calib.num_tokens,
              "compute": {f"{k}-{b}": v for (k, b), v in compute.items()}, "servers": {}}
    profiles = {key: as_profile(c, key[1], args.eval_len, sizes.moe_decoder_layers) for key, c in compute.items()}
    profiles.update({("decode", b): p for b, p in decode.items()})
    calib_trace = calib.trace_indices.numpy().astype(np.int64)

    def evaluate(p, row_name: str, mode: str, balance: str) -> dict:
        row = {"name": row_name, "mode": mode, "method": p.method, "balance_rule": balance}
        for (kind, b), (experts, calls) in replays.items():
            c = replay(p, experts, calls, hidden, 2, sizes.moe_decoder_layers)
            tr = traffic_row(p, c, sizes.moe_decoder_layers)
            crit = profile_compute(p, c, profiles[(kind, b)])
            key = f"{kind}-{b}"
            row[key] = {"bytes_per_token": tr["bytes_per_token"], "round_trips_per_call": tr["hops_per_call"] / 2,
                        "hops_per_call": tr["hops_per_call"], "balance": tr["balance"],
                        "layer_balance": tr["layer_balance"], "compute_per_call": crit}
            for prof in PROFILES.values():
                t = modeled_time(c, prof, crit * c.calls)
                if kind == "decode":
                    row[key][f"{prof.name}_ms_per_token"] = 1e3 * t.seconds / c.calls
                else:
                    row[key][f"{prof.name}_tokens_per_s"] = c.tokens / t.seconds
        row.update(copies=tr["copies"], stages=tr["stages"], max_server_bytes=tr["max_server_bytes"])
        return row

    for n in args.servers:
        memory = int(sizes.dense_bytes + args.slack * sizes.expert_bytes.sum() / n)
        rows = []
        for row_name, mode, method, replicas, balance in configs:
            spec = ServerSpec(memory_bytes=(memory,) * n, mode=mode, balance=balance, replicate_dense=False)
            p = place(stats, sizes, spec, method, replicate=False)
            if replicas:
                p = replicate_hot(p, stats, spec)
            rows.append(evaluate(p, row_name, mode, balance))
        # what `moecompress shard` (--mode auto) chooses, from the calibration trace and the measured profile:
        # for each batch, planned for each link alone (--link X) and for both (no --link: the default); every
        # candidate is replayed once and timed on both links; the chosen are then measured on the held-out replay
        auto, chosen = {}, {}
        links = tuple(PROFILES.values())
        for b in BATCHES:
            spec = ServerSpec(memory_bytes=(memory,) * n, replicate_dense=False)
            cands, placed, steps = time_candidates(stats, sizes, spec, calib_trace, args.seq_len, hidden, 2,
                                                   profiles[("decode", b)], links, replicate=True)
            for key, rows_for, plan in [(f"{lk.name}-{b}", for_link(cands, lk.name), (lk,)) for lk in links] + [
                    (f"both-{b}", cands, links)]:
                report = decide(rows_for, plan)
                label = f"auto: {report['chosen']}"
                if label not in chosen:
                    chosen[label] = evaluate(placed[report["chosen"]], label, placed[report["chosen"]].mode,
                                             "total")
                auto[key] = {"chosen": label, "report": {**report, "batch": b, "trace_steps": steps}}
        result["servers"][str(n)] = {"memory_bytes": memory, "rows": rows, "auto_rows": list(chosen.values()),
                                     "auto": auto, "default": default_check(rows, chosen, auto)}
        print(f"  {n} servers done ({time.time() - t0:.0f}s)", flush=True)
    return result


def default_check(rows: list[dict], chosen: dict, auto: dict) -> dict:
    """Modeled decode time (held-out replay) of what `shard` chooses against the best baseline, per profile and
    batch: `matched` = chosen with that --link/--batch; `robust` = without --link (planned for LAN and WAN), that
    --batch; `default` = the plain defaults (no --link, --batch 1)."""
    baselines = [r for r in rows if r["method"] in BASELINES]
    out = {}
    for b in BATCHES:
        for prof in PROFILES:
            key, metric = f"decode-{b}", f"{prof}_ms_per_token"
            best = min(baselines, key=lambda r: r[key][metric])
            entry = {"best_baseline": best["name"], "best_baseline_ms": best[key][metric]}
            for which, cond in (("matched", f"{prof}-{b}"), ("robust", f"both-{b}"), ("default", "both-1")):
                r = chosen[auto[cond]["chosen"]]
                entry[which] = {"name": r["name"], "ms": r[key][metric],
                                "faster_by": 1 - r[key][metric] / best[key][metric]}
            out[f"{prof}-{b}"] = entry
    return out


def markdown(results: list[dict]) -> str:
    lines = []
    for res in results:
        for n, block in res["servers"].items():
            lines += [f"\n**{res['model']}, {n} servers**, {block['memory_bytes'] / 2**20:.2f} MiB each "
                      f"(dense {res['dense_bytes'] / 2**20:.2f} MiB, experts {res['expert_bytes'] / 2**20:.2f} MiB "
                      "at 4-bit)", "",
                      "| configuration | bytes/token (decode, B=1) | round trips / decoded token | balance summed / "
                      "worst layer | decode ms/token LAN B=1 / B=8 | decode ms/token WAN B=1 / B=8 | prefill tok/s LAN "
                      "B=1 / B=8 | prefill tok/s WAN B=1 / B=8 |", "|---|---|---|---|---|---|---|---|"]
            for r in block["rows"] + block["auto_rows"]:
                d1, d8 = r["decode-1"], r["decode-8"]
                p1, p8 = r.get("prefill-1"), r.get("prefill-8")
                bal = p8 or d8  # routed-pair balance: of the prefill replay, else (--big) of the decode replay
                prefill = (f"{p1['lan_tokens_per_s']:.0f} / {p8['lan_tokens_per_s']:.0f} | "
                           f"{p1['wan_tokens_per_s']:.0f} / {p8['wan_tokens_per_s']:.0f}") if p8 else "- | -"
                lines.append(
                    f"| {r['name']} | {d1['bytes_per_token']:.0f} | {d1['round_trips_per_call']:.2f} | "
                    f"{bal['balance']:.2f} / {bal['layer_balance']:.2f} | {d1['lan_ms_per_token']:.2f} / "
                    f"{d8['lan_ms_per_token']:.2f} | {d1['wan_ms_per_token']:.2f} / {d8['wan_ms_per_token']:.2f} | "
                    f"{prefill} |")
            lines += ["", "`moecompress shard` (--mode auto) vs the best baseline, modeled decode ms/token on the "
                      "held-out replay (chosen from the calibration trace); 'faster by' < 0: slower:", "",
                      "| link, B | best baseline | with that --link/--batch | faster by | no --link (LAN+WAN), that "
                      "--batch | faster by | plain defaults (no --link, B=1) | faster by |",
                      "|---|---|---|---|---|---|---|---|"]
            for k, v in block["default"].items():
                cells = " | ".join(f"{v[w]['name']} {v[w]['ms']:.2f} | {v[w]['faster_by']:+.1%}"
                                   for w in ("matched", "robust", "default"))
                lines.append(f"| {k} | {v['best_baseline']} {v['best_baseline_ms']:.2f} | {cells} |")
            for b in BATCHES:
                rep = block["auto"][f"both-{b}"]["report"]
                verdict = ("within the tie of the best baseline on both links" if rep["robust"] else
                           f"NO candidate within {rep['tie']:.0%} of the best baseline on both links: minimax regret, "
                           f"worst {rep['worst_ratio'] - 1:+.1%} on {rep['worst_link']}")
                lines.append(f"\nNo --link, B={b}, on the calibration trace: {rep['chosen']}, {verdict}.")
    return "\n".join(lines) + "\n"


def check_real_run(model_path: str, args) -> dict:
    """The edge runtime's real run (gloo processes on this machine) against the replay of the same text: the
    counters must be equal. Expert model: ours + replicas, 2 servers; pipeline: all_servers, 2 servers."""
    from transformers import AutoTokenizer

    from moecompress.runtime.edge import deploy
    from moecompress.shard.bundles import write_bundles

    checkpoint = export_4bit(model_path, Path(args.work))
    sizes = checkpoint_layer_sizes(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    calib = calibrate(model_path, tokenizer, args.calib, CalibrationOptions(samples=32, seq_len=128, hessians=False,
                                                                            progress=False))
    stats = routing_stats(calib)
    import gzip

    with gzip.open(args.eval, "rt") as f:
        texts = [json.loads(next(f))["text"][:400] for _ in range(2)]
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=48)
    memory = int(sizes.dense_bytes + args.slack * sizes.expert_bytes.sum() / 2)
    out = {}
    for mode, method in (("expert", "affinity"), ("pipeline", "all_servers")):
        spec = ServerSpec(memory_bytes=(memory,) * 2, mode=mode, replicate_dense=False)
        p = place(stats, sizes, spec, method, replicate=True)
        target = Path(args.work) / f"real-{Path(model_path).name}-{mode}"
        write_bundles(checkpoint, p, target, overwrite=True)
        with deploy(target, simulate=False, timeout=120, record=True) as d:  # float32: 4-byte payloads
            d(batch["input_ids"], batch["attention_mask"])
            d.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=8, stop_at_eos=False)
            counts = d.counters.counts()
            experts, _, calls = d.trace()
        if experts is None:  # the pipeline records no routing; its counts depend on the calls only
            k = json.loads((checkpoint / "config.json").read_text())["num_experts_per_tok"]
            experts = np.zeros((sum(b * n for b, n, _ in calls), p.num_layers, k), dtype=np.int64)
        replayed = replay(p, experts, [Call(*c) for c in calls], sizes_hidden(checkpoint), 4,
                          sizes.moe_decoder_layers).counts()
        out[mode] = {"equal": replayed == counts, "calls": counts["calls"], "tokens": counts["tokens"],
                     "bytes": int(np.sum(counts["bytes"])), "replayed_bytes": int(np.sum(replayed["bytes"])),
                     "hops": int(np.sum(counts["hops"]))}
        print(mode, out[mode], flush=True)
    return out


def sizes_hidden(checkpoint: Path) -> int:
    config = json.loads((checkpoint / "config.json").read_text())
    return int(config.get("hidden_size") or config["text_config"]["hidden_size"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(str(ROOT.parent / f"shared/models/{m}")
                                                 for m in ("refmoe-qwen3", "refmoe-olmoe")))
    ap.add_argument("--calib", default=str(ROOT.parent / "shared/data/corpus/calib.jsonl.gz"))
    ap.add_argument("--eval", default=str(ROOT.parent / "shared/data/corpus/eval.jsonl.gz"))
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences (placement)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=32, help="held-out sequences replayed")
    ap.add_argument("--eval-len", type=int, default=128, help="tokens per held-out sequence (prompt = decode length)")
    ap.add_argument("--servers", default="2,4")
    ap.add_argument("--slack", type=float, default=1.25)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    ap.add_argument("--work", default="/tmp/moecompress-bench-edge", help="exported 4-bit checkpoints (reused)")
    ap.add_argument("--big", action="store_true", help="only: a random-init model with Qwen3-30B-A3B's MoE dims (2 "
                    "layers, untrained routing on real text), decode only (writes edge_30b.{md,json})")
    ap.add_argument("--big-layers", type=int, default=4, help="--big: decoder layers (a 2-layer pipeline cannot "
                    "fit a stage in 4 servers' equal memory: one layer holds half the experts)")
    ap.add_argument("--tokenizer", default=str(ROOT.parent / "shared/models/refmoe-qwen3"), help="--big: tokenizer")
    ap.add_argument("--real-run", action="store_true", help="only: the runtime's real run (gloo processes) vs the "
                    "replay, on refmoe-qwen3 (writes edge_real_run.json)")
    args = ap.parse_args()
    args.servers = [int(x) for x in args.servers.split(",")]
    torch.set_num_threads(1)
    t0 = time.time()
    if args.real_run:
        res = check_real_run(args.models.split(",")[0], args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "edge_real_run.json").write_text(json.dumps(res, indent=1))
        return
    results = [run_big(args)] if args.big else [run_model(m, args) for m in args.models.split(",")]
    stem = "edge_30b" if args.big else "edge"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results) + f"\n({time.time() - t0:.0f}s; torch {torch.__version__}, 1 thread; placed from " \
        f"{args.samples} x {args.seq_len} calibration tokens, replayed {args.eval_samples} x {args.eval_len} held-out " \
        "eval tokens)\n"
    if args.big:
        text = BIG_NOTE.format(layers=args.big_layers) + text
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
