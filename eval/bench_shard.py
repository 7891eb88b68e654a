"""Placement benchmark: cross-server bytes per token of every placement on its execution model, replayed.

Placement uses the routing counts of the calibration split; traffic is measured by replaying the routing of the
held-out eval split (never the calibration data) through moecompress/execution/replay.py, as single-sequence
decoding (one token per forward call): exactly what the edge runtime would send. Expert model: home = server 0,
which alone holds the dense weights; pipeline model: contiguous layer ranges. Experts are sized at uniform 4-bit,
group 64 (the placement only sees bytes); every server has the same memory: dense weights + `--slack` x its share
of the expert bytes. Modeled time per token: eval/bench_edge.py.

    .venv/bin/python eval/bench_shard.py       # writes eval/results/shard.{md,json} and shard_placement.png
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
from moecompress.artifacts.cost_table import expert_bytes as expert_nbytes  # noqa: E402
from moecompress.calibrate.options import CalibrationOptions  # noqa: E402
from moecompress.calibrate.run import calibrate  # noqa: E402
from moecompress.execution.replay import Call  # noqa: E402
from moecompress.shard import LayerSizes, ServerSpec, compare_placements  # noqa: E402
from moecompress.shard.command import routing_stats, routing_trace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/refmoe-qwen3"))
    ap.add_argument("--calib", default=str(ROOT.parent / "shared/data/corpus/calib.jsonl.gz"))
    ap.add_argument("--eval", default=str(ROOT.parent / "shared/data/corpus/eval.jsonl.gz"))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--servers", default="2,4,8")
    ap.add_argument("--slack", type=float, default=1.25)
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--balance", default="total,layer", help="balance rules to run: total (summed over layers) "
                    "and/or layer (every layer on its own); the expert model only")
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    layout = describe(model)
    opts = dict(samples=args.samples, seq_len=args.seq_len, hessians=False, progress=False)
    calib = calibrate(model, tokenizer, args.calib, CalibrationOptions(**opts))
    held_out = calibrate(model, tokenizer, args.eval, CalibrationOptions(**opts, trace=True, seed=1))
    stats, trace = routing_stats(calib), routing_trace(held_out)
    sizes = np.array([[expert_nbytes(m, "*", 4, 64, False) for _ in range(m.num_experts)] for m in layout.moe_layers])
    expert_ids = {id(p) for m in layout.moe_layers for p in model.get_submodule(m.experts_path).parameters()}
    layers = model.get_submodule(layout.decoder_layers_path)
    in_layers = {id(p) for p in layers.parameters()}
    layer_sizes = LayerSizes(
        expert_bytes=sizes, moe_decoder_layers=tuple(m.decoder_layer for m in layout.moe_layers),
        layer_dense_bytes=tuple(sum(p.numel() * 2 for p in layer.parameters() if id(p) not in expert_ids)
                                for layer in layers),
        head_bytes=sum(p.numel() * 2 for p in model.parameters() if id(p) not in in_layers))  # bf16
    dense = layer_sizes.dense_bytes
    hidden = model.config.hidden_size
    calls = [Call(1, 1, 1)] * trace.num_tokens  # decoding one sequence: a forward call per token
    print(f"routing recorded in {time.time() - t0:.0f}s; {trace.num_tokens} held-out tokens", flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, lines = {}, []
    for balance in args.balance.split(","):
        for n in (int(x) for x in args.servers.split(",")):
            memory = int(dense + args.slack * sizes.sum() / n)
            spec = ServerSpec(memory_bytes=(memory,) * n, balance_epsilon=args.epsilon, balance=balance,
                              replicate_dense=False)
            rows, placed = compare_placements(stats, layer_sizes, spec, trace.experts, calls, hidden, 2,
                                              replicate=True)
            results[f"{balance}-{n}"] = rows
            lines += [f"\n**{n} servers, balance rule `{balance}`**, {memory / 2**20:.2f} MiB each", "",
                      "| model | method | bytes/token | vs best baseline | one-way hops/token | balance summed | "
                      "worst layer balance | copies |", "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                lines.append(f"| {r['mode']} | {r['method']} | {r['bytes_per_token']:.0f} | "
                             f"{-(r['reduction'] or 0):+.1%} | {r['hops_per_call']:.2f} | {r['balance']:.3f} | "
                             f"{r['layer_balance']:.3f} | {r['copies']} |")
            if n == 4 and balance == "total":
                plot(placed["affinity"], stats, out_dir / "shard_placement.png")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + f"\n\n({time.time() - t0:.0f}s; placed from {calib.num_tokens} calibration tokens, " \
                              f"replayed {trace.num_tokens} held-out tokens)\n"
    (out / "shard.md").write_text(text)
    (out / "shard.json").write_text(json.dumps(results, indent=1, default=float))
    print(text)


def plot(placement, stats, path: Path) -> None:
    from matplotlib.figure import Figure

    grid = np.array([[copies[0] for copies in layer] for layer in placement.assignment])  # [L, E]
    fig = Figure(figsize=(8, 3.5))
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap="tab10", vmin=0, vmax=9, aspect="auto")
    for (l, e), s in np.ndenumerate(grid):
        ax.text(e, l, f"{int(stats.tokens[l, e] / stats.tokens[l].sum() * 100)}", ha="center", va="center", fontsize=6)
    ax.set_xlabel("expert (number: % of the layer's routed tokens)")
    ax.set_ylabel("MoE layer")
    ax.set_title("affinity placement, expert model, home = server 0, 4 servers (colour = server)")
    fig.colorbar(im, ax=ax, ticks=range(4))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
