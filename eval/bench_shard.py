"""Placement benchmark: cross-server bytes per token, ours vs baselines, replayed on held-out routing.

Placement uses the co-activation and activation-path counts of the calibration split; traffic is measured by
replaying the routing of the held-out eval split (never the calibration data). Experts are sized at uniform 4-bit,
group 64 (the placement only sees bytes); every server has the same memory: dense weights + `--slack` x its share
of the expert bytes.

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
from moecompress.shard import ServerSpec, compare_placements, place_affinity  # noqa: E402
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
                    "and/or layer (every layer on its own)")
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
    expert_params = sum(p.numel() for m in layout.moe_layers for p in model.get_submodule(m.experts_path).parameters())
    dense = (sum(p.numel() for p in model.parameters()) - expert_params) * 2  # bf16
    hidden = model.config.hidden_size
    print(f"routing recorded in {time.time() - t0:.0f}s; {trace.num_tokens} held-out tokens", flush=True)

    results, lines = {}, []
    for balance in args.balance.split(","):
        for n in (int(x) for x in args.servers.split(",")):
            memory = int(dense + args.slack * sizes.sum() / n)
            spec = ServerSpec(memory_bytes=(memory,) * n, balance_epsilon=args.epsilon, balance=balance)
            rows = compare_placements(stats, trace, sizes, dense, spec, hidden, payload_bytes=2, replicate=True)
            results[f"{balance}-{n}"] = rows
            lines += [f"\n**{n} servers, balance rule `{balance}`**, {memory / 2**20:.2f} MiB each", "",
                      "| method | bytes/token | vs best baseline | local | balance summed | worst layer balance |"
                      " copies |", "|---|---|---|---|---|---|---|"]
            for r in rows:
                lines.append(f"| {r['method']} | {r['bytes_per_token']:.0f} | {-(r['reduction'] or 0):+.1%} | "
                             f"{r['local_fraction']:.1%} | {r['balance']:.3f} | {r['layer_balance']:.3f} | "
                             f"{r['copies']} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + f"\n\n({time.time() - t0:.0f}s; placed from {calib.num_tokens} calibration tokens, " \
                              f"replayed {trace.num_tokens} held-out tokens)\n"
    (out / "shard.md").write_text(text)
    (out / "shard.json").write_text(json.dumps(results, indent=1, default=float))
    spec4 = ServerSpec(memory_bytes=(int(dense + args.slack * sizes.sum() / 4),) * 4, balance_epsilon=args.epsilon)
    plot(place_affinity(stats, sizes, dense, spec4), stats, out / "shard_placement.png")
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
    ax.set_title("affinity placement, 4 servers (colour = server)")
    fig.colorbar(im, ax=ax, ticks=range(4))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
