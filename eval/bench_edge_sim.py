"""Compute per layer (what bench_edge.py and `moecompress shard --mode auto` charge) against the edge runtime's own
simulation: the same decode steps run through `deploy(..., simulate=True)` (N virtual servers in one process, each
built from its own bundle), timing every decode call and every virtual server's compute (the handlers' own
`compute_seconds`), next to what the ComputeProfile predicts for that placement (execution/timing.py).

What the simulation adds beyond the profile's layers: encoding/decoding the messages and the dispatcher's routing,
gather and index_add (expert model) or the stage handover (pipeline). The profile measures the expert model's part
(ComputeProfile.dispatch/message/serve_seconds, from the runtime's own dispatcher): the table shows the difference
without and with it. The stage handover is not modeled. Timers: perf_counter in
the simulation, thread CPU time in the profile (1 thread, so equal unless preempted); min over steps for both.

    .venv/bin/python eval/bench_edge_sim.py     # refmoe-qwen3 4-bit: writes eval/results/edge_sim.{md,json}
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
sys.path.insert(0, str(ROOT / "eval"))

from bench_edge import export_4bit  # noqa: E402

from moecompress.execution.timing import add_dispatch, profile_compute  # noqa: E402
from moecompress.runtime.edge import deploy  # noqa: E402
from moecompress.shard import ServerSpec, place  # noqa: E402
from moecompress.shard.bundles import write_bundles  # noqa: E402
from moecompress.shard.command import checkpoint_layer_sizes  # noqa: E402
from moecompress.shard.profile import measure_profile  # noqa: E402
from moecompress.shard.routing import RoutingStats  # noqa: E402

CASES = ((2, "pipeline", "all_servers"), (4, "pipeline", "all_servers"), (2, "expert", "round_robin"),
         (4, "expert", "round_robin"))


def uniform_stats(sizes) -> RoutingStats:
    L, E = sizes.expert_bytes.shape
    return RoutingStats(tokens=np.ones((L, E)), coact=np.zeros((L, E, E)), paths=np.zeros((max(L - 1, 0), E, E)),
                        num_tokens=1, top_k=1)


def simulate(target: Path, batch: int, context: int, steps: int, vocab: int) -> dict:
    """Decode `steps` tokens of `batch` sequences in the simulation: per decode call, wall time and each virtual
    server's compute (min over calls), and the counters of those calls."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, context), generator=gen)
    with deploy(target, simulate=True, dtype=torch.bfloat16) as d:
        handlers = d.transport.handlers
        calls, marks = [], {}

        def pre(module, args, kwargs):
            marks["t"], marks["cpu"] = time.perf_counter(), time.thread_time()
            marks["s"] = {n: h.stats()[0] for n, h in handlers.items()}
            x = args[0] if args else kwargs.get("input_ids")
            marks["decode"] = x.shape[1] == 1

        def post(module, args, kwargs, out):
            if marks["decode"]:
                calls.append((time.perf_counter() - marks["t"],
                              {n: h.stats()[0] - marks["s"][n] for n, h in handlers.items()},
                              time.thread_time() - marks["cpu"]))

        h1 = d.model.register_forward_pre_hook(pre, with_kwargs=True)
        h2 = d.model.register_forward_hook(post, with_kwargs=True)
        d.generate(ids, max_new_tokens=steps + 1, stop_at_eos=False)
        h1.remove(), h2.remove()
        c = d.counters
    wall = min(w for w, _, _ in calls)
    cpu = min(t for _, _, t in calls)
    servers = {n: min(s[n] for _, s, _ in calls) for n in handlers}
    return {"wall": wall, "cpu": cpu, "servers": servers, "counters": c, "home": d.info.home}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/refmoe-qwen3"))
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--work", default="/tmp/moecompress-bench-edge")
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    ck = export_4bit(args.model, Path(args.work))
    sizes = checkpoint_layer_sizes(ck)
    vocab = json.loads((ck / "config.json").read_text())["vocab_size"]
    profiles = {b: measure_profile(ck, batch=b, context=args.context, reps=args.reps) for b in (1, 8)}
    rows = []
    for n, mode, method in CASES:
        memory = int(sizes.dense_bytes + 1.25 * sizes.expert_bytes.sum() / n)
        p = place(uniform_stats(sizes), sizes, ServerSpec(memory_bytes=(memory,) * n, mode=mode,
                                                          replicate_dense=False), method, replicate=False)
        target = Path(args.work) / f"sim-{mode}-{n}"
        write_bundles(ck, p, target, overwrite=True)
        for b, prof in profiles.items():
            sim = simulate(target, b, args.context, args.steps, vocab)
            c = sim["counters"]
            pairs = c.pairs.astype(np.float64)
            share = pairs / np.maximum(pairs.sum(1, keepdims=True), 1)
            predicted = {}
            for s in sim["servers"]:
                if mode == "pipeline":
                    predicted[s] = sum(t for t, srv in zip(prof.layer_seconds, p.layer_servers) if srv == s)
                else:
                    predicted[s] = sum(t * share[layer, s] for layer, t in enumerate(prof.moe_seconds))
            total = prof.head_seconds + sum(prof.layer_seconds)
            dispatch = 0.0
            if mode == "expert":  # what every rank spends on the dispatch (one process: all of it adds up)
                extra = [[0.0] * n for _ in range(p.num_layers)]
                dispatch = add_dispatch(extra, p.home, c, prof) + sum(map(sum, extra))
            rows.append({"case": f"{mode}: {method}, {n} servers", "batch": b, "sim_wall_ms": 1e3 * sim["wall"],
                         "sim_cpu_ms": 1e3 * sim["cpu"],
                         "profile_total_ms": 1e3 * total, "profile_dispatch_ms": 1e3 * dispatch,
                         "profile_critical_ms": 1e3 * profile_compute(p, c, prof),
                         "servers": {str(s): {"sim_ms": 1e3 * v, "profile_ms": 1e3 * predicted[s]}
                                     for s, v in sim["servers"].items()}})
            print(rows[-1], flush=True)
    lines = ["| placement | B | simulation per decode step (all virtual servers, one process): wall / thread CPU ms "
             "| profile: layers + head ms | + dispatch ms | difference (CPU time) without / with dispatch | virtual "
             "servers' compute (wall) ms, simulation / profile |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        srv = "; ".join(f"{s}: {v['sim_ms']:.2f} / {v['profile_ms']:.2f}" for s, v in r["servers"].items())
        with_dispatch = r["profile_total_ms"] + r["profile_dispatch_ms"]
        lines.append(f"| {r['case']} | {r['batch']} | {r['sim_wall_ms']:.2f} / {r['sim_cpu_ms']:.2f} | "
                     f"{r['profile_total_ms']:.2f} | {r['profile_dispatch_ms']:.2f} | "
                     f"{r['sim_cpu_ms'] / r['profile_total_ms'] - 1:+.1%} / {r['sim_cpu_ms'] / with_dispatch - 1:+.1%} "
                     f"| {srv} |")
    lines.append(f"\n({time.time() - t0:.0f} s; {Path(args.model).name} 4-bit (group 64), bf16, 1 thread; decode "
                 f"after {args.context} tokens, {args.steps} steps, min over steps; profile: min of {args.reps})")
    out = Path(args.out)
    (out / "edge_sim.md").write_text("\n".join(lines) + "\n")
    (out / "edge_sim.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
