"""Home replicas in the expert-model placement (shard/home.py): what they do to round trips, losslessly.

For each model: shard's expert placement (affinity + hot-expert replicas, 4 servers, every server dense + `--slack`
x its share of the experts: the memory eval/bench_edge.py and bench_tokens.py give every placement) with a home
copy of each MoE layer's N most used experts (calibration routing), N = 0, 1, 2, ... Placed from the calibration
text; measured by replaying the evaluation text's routing (execution/replay.py: the runtime's counters) as batch-1
decoding: round trips per decoded token (lossless), share of (token, layer) with every chosen expert on the home,
share of the routing weight on home experts. Rows beyond equal memory give the home exactly the extra bytes it
needs (binary search on the home's memory, the other servers unchanged).

    nice .venv/bin/python eval/bench_home_replicas.py        # -> eval/results/home_replicas.md/.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moecompress.calibrate.options import CalibrationOptions  # noqa: E402
from moecompress.calibrate.run import calibrate  # noqa: E402
from moecompress.execution.replay import decode_calls, replay  # noqa: E402
from moecompress.shard import ServerSpec  # noqa: E402
from moecompress.shard.command import checkpoint_layer_sizes, routing_stats  # noqa: E402
from moecompress.shard.home import min_home_memory, place_home_replicas  # noqa: E402


def measure(placement, experts, weights, hidden: int) -> dict:
    T = experts.shape[0]
    c = replay(placement, experts, decode_calls(T, 1), hidden, 2)
    home = placement.home
    on_home = np.array([[[home in placement.assignment[layer][e] for e in row] for layer, row in enumerate(tok)]
                        for tok in experts])  # [T, L, k]
    return {"round_trips_per_token": float(c.hops.sum()) / 2 / T, "bytes_per_token": float(c.bytes.sum()) / T,
            "local_layers": float(on_home.all(-1).mean()),
            "home_weight": float((weights * on_home).sum() / weights.sum()),
            "home_pairs": float(c.pairs[:, home].sum() / c.pairs.sum()),
            "home_experts": sum(home in s for layer in placement.assignment for s in layer)}


def run_model(model: str, args) -> dict:
    from transformers import AutoTokenizer

    from bench_tokens import export_rtn  # the same RTN checkpoint as the token benchmark

    tok = AutoTokenizer.from_pretrained(model)
    checkpoint = export_rtn(model, args.bits, Path(args.work))
    sizes = checkpoint_layer_sizes(checkpoint)
    stats = routing_stats(calibrate(model, tok, args.calib, CalibrationOptions(
        samples=args.calib_samples, seq_len=args.seq_len, hessians=False, progress=False)))
    held = calibrate(model, tok, args.eval, CalibrationOptions(samples=args.eval_samples, seq_len=args.seq_len,
                                                               hessians=False, progress=False, trace=True, seed=1))
    experts, weights = held.trace_indices.numpy(), held.trace_weights.float().numpy()
    hidden = int(json.loads((Path(model) / "config.json").read_text())["hidden_size"])
    dense = int(sum(sizes.layer_dense_bytes) + sizes.head_bytes)
    memory = int(dense + args.slack * sizes.expert_bytes.sum() / args.servers)
    spec = ServerSpec(memory_bytes=(memory,) * args.servers, mode="expert")
    rows = []
    for n in range(0, stats.num_experts + 1):
        need = min_home_memory(stats, sizes, spec, n)
        mem = list(spec.memory_bytes)
        mem[spec.home] = need
        p = place_home_replicas(stats, sizes, replace(spec, memory_bytes=tuple(mem)), None, n)
        row = {"home_replicas": n, "home_memory": need, "extra_home_bytes": need - memory,
               "extra_share_of_experts": (need - memory) / float(sizes.expert_bytes.sum()), "method": p.method,
               **measure(p, experts, weights, hidden)}
        rows.append(row)
        print(model, row, flush=True)
        if row["local_layers"] >= 0.999:
            break
    return {"model": Path(model).name, "memory_bytes": memory, "expert_bytes": int(sizes.expert_bytes.sum()),
            "eval_tokens": int(experts.shape[0]), "num_experts": stats.num_experts, "top_k": stats.top_k,
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[str(ROOT.parent / f"shared/models/{m}")
                                                    for m in ("refmoe-qwen3", "refmoe-olmoe")])
    ap.add_argument("--calib", default=str(ROOT.parent / "shared/data/corpus/calib.jsonl.gz"))
    ap.add_argument("--eval", default=str(ROOT.parent / "shared/data/corpus/eval.jsonl.gz"))
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--servers", type=int, default=4)
    ap.add_argument("--slack", type=float, default=1.25)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--work", default="/tmp/moecompress-bench-tokens")
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    args = ap.parse_args()
    torch.manual_seed(0)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results = [run_model(m, args) for m in args.models]
    lines = ["# Home replicas: lossless round trips of the expert model vs home memory", "",
             f"{args.servers} servers, each dense + {args.slack} x experts / servers (equal memory, as "
             "eval/bench_edge.py); shard's placement (affinity + hot-expert replicas) with a home copy of each "
             "MoE layer's N most used experts (calibration, shard/home.py). Replay of the evaluation text's routing "
             "as batch-1 decoding (execution/replay.py). 'extra home memory': bytes the home needs beyond the "
             "equal share (0: fits at equal memory).", ""]
    for res in results:
        lines += [f"**{res['model']}** ({res['num_experts']} experts top-{res['top_k']}, {res['eval_tokens']} eval "
                  f"tokens, {res['memory_bytes'] / 2**20:.2f} MiB per server, experts "
                  f"{res['expert_bytes'] / 2**20:.2f} MiB)", "",
                  "| home replicas / layer | extra home memory | as share of all experts | round trips/token | "
                  "bytes/token | (token, layer) all on home | routing weight on home | pairs on home |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['home_replicas']} | {r['extra_home_bytes'] / 2**20:+.2f} MiB | "
                         f"{r['extra_share_of_experts']:.1%} | {r['round_trips_per_token']:.2f} | "
                         f"{r['bytes_per_token']:.0f} | {r['local_layers']:.1%} | {r['home_weight']:.1%} | "
                         f"{r['home_pairs']:.1%} |")
        lines.append("")
    lines.append("(`nice .venv/bin/python eval/bench_home_replicas.py`)")
    out = Path(args.out)
    (out / "home_replicas.md").write_text("\n".join(lines) + "\n")
    (out / "home_replicas.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
