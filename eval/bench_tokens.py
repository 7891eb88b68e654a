"""Token policies of the expert model: cross-server traffic and round trips against quality.

The expert model on 4 servers with the placement the shard stage chooses (affinity partitioning of the calibration
routing + hot-expert replicas; `--balance total` is `moecompress shard`'s default, `layer` balances every layer).
Every configuration runs the evaluation text (never the calibration text) through the model with the token
policies and the reference executor installed in its experts modules (`execution.tokens.token_policies`), so the
quality numbers are those of the exact computation the plan describes; traffic is counted from the same plans.

Columns: perplexity and its change against the full model, KL(full || policy) per token, cross-server bytes per
token as measured (forward calls of `--batch` sequences: fusion acts across them) and as decoded one token at a time
(batch 1: a header per message, no fusion), both against the naive per-(token, expert) bf16 exchange, round trips per
decoded token (MoE layers where the token needs a remote server), and the modeled network time per decoded token on
the `lan` / `wan` link profiles (round trips x 2 x latency + batch-1 bytes / rate; compute left out) next to the
pipeline model over the same 4 servers (4 one-way hops per token: 3 stage boundaries and back to the home).

    nice .venv/bin/python eval/bench_tokens.py        # eval/results/tokens.{md,json}, tokens_bytes.png, tokens_rtt.png
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
from moecompress.calibrate.dataset import build_calibration_data  # noqa: E402
from moecompress.calibrate.options import CalibrationOptions  # noqa: E402
from moecompress.calibrate.run import calibrate  # noqa: E402
from moecompress.evaluate.run import load_eval_data  # noqa: E402
from moecompress.execution.counters import pipeline_hop_bytes  # noqa: E402
from moecompress.execution.routing import ExpertTables  # noqa: E402
from moecompress.execution.timing import PROFILES  # noqa: E402
from moecompress.execution.tokens import PolicyState, build_pipeline, expert_similarity, token_policies  # noqa: E402
from moecompress.shard import ServerSpec, place_affinity, replicate_hot  # noqa: E402
from moecompress.shard.command import routing_stats  # noqa: E402

I8 = "precision:dispatch=int8,return=int8"


def configs(quick: bool) -> list[tuple[str, str, str]]:
    """(curve, label, spec): baselines, then each policy on top of send once + int8 payloads, then combinations."""
    rows = [("baseline", "naive per-(token, expert) bf16", "per_pair"), ("baseline", "send once (lossless)", "none"),
            ("baseline", "+ int8 payload", I8), ("baseline", "+ fp8 payload", "precision:dispatch=fp8,return=fp8")]
    grids = {
        "prune_server": ("prune_server:threshold={},relative=true", (0.1, 0.2, 0.3, 0.5)),
        "prune_layer": ("prune_layer:threshold={}", (0.05, 0.1, 0.2, 0.3)),
        "skip_weakest": ("skip_weakest:threshold={}", (0.1, 0.2, 0.3, 0.5)),
        "substitute": ("substitute:threshold={},scope=layer", (0.1, 0.2, 0.3, 0.5)),
        "fuse": ("fuse:threshold={}", (0.98, 0.95, 0.9, 0.8)),
    }
    for curve, (fmt, values) in grids.items():
        for v in values[:2] if quick else values:
            rows.append((curve, f"{curve} {v}", f"{I8}+{fmt.format(v)}"))
    protect = "protect:first=4,norm_share=0.05"
    combos = [f"{I8}+{protect}+prune_layer:threshold=0.2+prune_server:threshold=0.3,relative=true",
              f"{I8}+{protect}+substitute:threshold=0.3,scope=layer",
              f"{I8}+{protect}+prune_layer:threshold=0.1+prune_server:threshold=0.2,relative=true+fuse:threshold=0.9"]
    rows += [("combined", f"combo {i + 1}", spec) for i, spec in enumerate(combos[:1] if quick else combos)]
    return rows


def placement_tables(model, tokenizer, layout, args):
    opts = CalibrationOptions(samples=args.calib_samples, seq_len=args.seq_len, hessians=False, progress=False)
    stats = routing_stats(calibrate(model, tokenizer, args.calib, opts))
    sizes = np.array([[expert_nbytes(m, "*", 4, 64, False) for _ in range(m.num_experts)] for m in layout.moe_layers])
    expert_params = sum(p.numel() for m in layout.moe_layers for p in model.get_submodule(m.experts_path).parameters())
    dense = (sum(p.numel() for p in model.parameters()) - expert_params) * 2
    memory = int(dense + 1.25 * sizes.sum() / args.servers)
    spec = ServerSpec(memory_bytes=(memory,) * args.servers, balance_epsilon=0.1, balance=args.balance)
    placement = replicate_hot(place_affinity(stats, sizes, dense, spec), stats, spec)
    home = getattr(placement, "home", None)
    return ExpertTables.from_placement(placement), int(placement.dense_servers[0] if home is None else home)


@torch.no_grad()
def similarity(model, tokenizer, layout, args) -> torch.Tensor:
    """[L, E, E] expert similarity from the weights, probed with calibration hidden states of each layer."""
    data = build_calibration_data(args.calib, tokenizer, 2, args.seq_len, seed=5)
    probes, handles = {}, []
    for i, m in enumerate(layout.moe_layers):
        mod = model.get_submodule(m.experts_path)
        handles.append(mod.register_forward_hook(lambda mod, a, out, i=i: probes.update({i: a[0][::2].clone()})))
    try:
        model(input_ids=data.input_ids)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([expert_similarity(model.get_submodule(m.experts_path), m.num_experts, probe=probes[i])
                        for i, m in enumerate(layout.moe_layers)])


@torch.no_grad()
def run_config(model, paths, tables, home, spec, state, data, ref_logp, batch, renormalize):
    nll = kl = 0.0
    count = 0
    with token_policies(model, paths, tables.holds, tables.primary, build_pipeline(spec), renormalize=renormalize,
                        home=home, state=state) as run:
        for b, i in enumerate(range(0, data.input_ids.shape[0], batch)):
            ids = data.input_ids[i:i + batch]
            logp = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
            ref = ref_logp[b].float()
            nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
            kl += (ref.exp() * (ref - logp)).sum().item()
            count += ids[:, 1:].numel()
    tr = run.traffic
    tokens = sum(t.tokens for t in tr) / len(paths)
    total = lambda name: sum(getattr(t, name) for t in tr)  # noqa: E731
    return {"ppl": float(np.exp(nll / count)), "kl": kl / count, "bytes_per_token": total("bytes") / tokens,
            "alone_bytes_per_token": total("alone_bytes") / tokens,
            "round_trips_per_token": total("remote_tokens") / tokens,
            "lossless_round_trips_per_token": total("lossless_remote_tokens") / tokens,
            "pruned_pairs_per_token": total("pruned_pairs") / tokens,
            "substituted_pairs_per_token": total("substituted_pairs") / tokens,
            "fused_rows_per_token": total("fused_rows") / tokens, "tokens": int(tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/refmoe-qwen3"))
    ap.add_argument("--calib", default=str(ROOT.parent / "shared/data/corpus/calib.jsonl.gz"))
    ap.add_argument("--eval", default=str(ROOT.parent / "shared/data/corpus/eval.jsonl.gz"))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--servers", type=int, default=4)
    ap.add_argument("--balance", default="total", help="placement balance rule: total (shard's default) or layer")
    ap.add_argument("--quick", action="store_true", help="two thresholds per policy (development)")
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    ap.add_argument("--name", default="tokens", help="stem of the output files")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    layout = describe(model)
    paths = [m.experts_path for m in layout.moe_layers]
    renormalize = bool(getattr(model.config, "norm_topk_prob", False))
    tables, home = placement_tables(model, tokenizer, layout, args)
    state = PolicyState(similarity=similarity(model, tokenizer, layout, args))
    data = load_eval_data(args.eval, tokenizer, args.samples, args.seq_len, calibration=args.calib)
    with torch.no_grad():
        ref_logp = [model(input_ids=data.input_ids[i:i + args.batch]).logits[:, :-1].float().log_softmax(-1)
                    .to(torch.bfloat16) for i in range(0, args.samples, args.batch)]
    ids = data.input_ids
    full_ppl = float(np.exp(-sum(r.float().gather(-1, ids[i * args.batch:(i + 1) * args.batch, 1:, None]).sum().item()
                                 for i, r in enumerate(ref_logp)) / ids[:, 1:].numel()))
    local = float((tables.holds[:, :, home]).float().mean())
    print(f"placement ({args.balance}): home {home}, {local:.0%} of experts held on the home; full model ppl "
          f"{full_ppl:.3f}; setup {time.time() - t0:.0f}s", flush=True)

    H = model.config.hidden_size
    pipeline_bytes = args.servers * pipeline_hop_bytes(1, H, 2, args.seq_len // 2)
    pipe = {name: 1e3 * (args.servers * p.latency_seconds + pipeline_bytes / p.bytes_per_second)
            for name, p in PROFILES.items()}
    results = []
    for curve, label, spec in configs(args.quick):
        t1 = time.time()
        r = run_config(model, paths, tables, home, spec, state, data, ref_logp, args.batch, renormalize)
        r.update(curve=curve, label=label, spec=spec, dppl=100 * (r["ppl"] / full_ppl - 1))
        for name, p in PROFILES.items():
            r[f"ms_{name}"] = 1e3 * (r["round_trips_per_token"] * 2 * p.latency_seconds
                                     + r["alone_bytes_per_token"] / p.bytes_per_second)
        results.append(r)
        print(f"{label:<34} ppl {r['ppl']:.3f} ({r['dppl']:+.2f}%) KL {r['kl']:.4f} B/tok {r['bytes_per_token']:.0f} "
              f"rt/tok {r['round_trips_per_token']:.2f} ({time.time() - t1:.0f}s)", flush=True)
        write(results, pipe, full_ppl, args, local, home, time.time() - t0, quiet=True)  # partial results kept
    write(results, pipe, full_ppl, args, local, home, time.time() - t0)


def write(results, pipe, full_ppl, args, local, home, seconds, quiet=False):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    naive = results[0]
    lossless = results[min(1, len(results) - 1)]
    for r in results:
        r["bytes_vs_naive"] = r["bytes_per_token"] / naive["bytes_per_token"]
        r["alone_bytes_vs_naive"] = r["alone_bytes_per_token"] / naive["alone_bytes_per_token"]
        r["round_trips_vs_lossless"] = r["round_trips_per_token"] / lossless["round_trips_per_token"]
    ok = [r for r in results if r["dppl"] <= 1.0] or results
    best_bytes = min(ok, key=lambda r: r["bytes_vs_naive"])
    best_rt = min(ok, key=lambda r: r["round_trips_vs_lossless"])
    lines = [f"# Token policies: traffic vs quality ({args.servers} servers, expert model, balance `{args.balance}`)",
             "", f"refmoe-qwen3, {naive['tokens']} eval tokens ({args.samples} x {args.seq_len}, forward calls of "
             f"{args.batch} sequences), home server {home} holds {local:.0%} of the experts; full model perplexity "
             f"{full_ppl:.3f}. Pipeline model reference (4 stages, batch 1): {pipe['lan']:.2f} ms/token lan, "
             f"{pipe['wan']:.2f} ms/token wan (network only).", "",
             "| policy | Δppl % | KL | bytes/token | vs naive | batch-1 bytes/token | vs naive | round trips/token | "
             "vs lossless | lan ms/token | wan ms/token | pruned / substituted / fused per token |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['dppl']:+.2f} | {r['kl']:.4f} | {r['bytes_per_token']:.0f} | "
                     f"{r['bytes_vs_naive']:.1%} | {r['alone_bytes_per_token']:.0f} | "
                     f"{r['alone_bytes_vs_naive']:.1%} | "
                     f"{r['round_trips_per_token']:.2f} | {r['round_trips_vs_lossless']:.1%} | {r['ms_lan']:.2f} | "
                     f"{r['ms_wan']:.2f} | {r['pruned_pairs_per_token']:.2f} / "
                     f"{r['substituted_pairs_per_token']:.2f} / "
                     f"{r['fused_rows_per_token']:.2f} |")
    lines += ["", "Specs:", ""] + [f"- {r['label']}: `{r['spec']}`" for r in results]
    lines += ["", f"Goals at Δppl <= 1 %: fewest bytes {best_bytes['bytes_vs_naive']:.1%} of naive "
              f"({best_bytes['label']}; goal <= 25 %: {'met' if best_bytes['bytes_vs_naive'] <= 0.25 else 'NOT met'}); "
              f"fewest round trips {best_rt['round_trips_vs_lossless']:.1%} of lossless ({best_rt['label']}; goal "
              f"<= 50 %: {'met' if best_rt['round_trips_vs_lossless'] <= 0.5 else 'NOT met'}).",
              "Best lossy configuration vs the pipeline model (modeled network ms per decoded token): " + ", ".join(
                  f"{n} {min(r[f'ms_{n}'] for r in ok):.2f} vs {pipe[n]:.2f}" for n in ("lan", "wan")),
              "", f"({seconds:.0f}s: `nice .venv/bin/python eval/bench_tokens.py --balance {args.balance}`)"]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.name}.json").write_text(json.dumps({"full_ppl": full_ppl, "pipeline_ms": pipe, "args": vars(args),
                                                       "results": results}, indent=1))
    plot(results, out, args.name)
    if not quiet:
        print("\n".join(lines))


def plot(results, out: Path, name: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label, fname in (("bytes_vs_naive", "cross-server bytes / naive per-(token, expert) bf16", "bytes"),
                              ("round_trips_per_token", "round trips per decoded token", "rtt")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        curves = {}
        for r in results:
            curves.setdefault(r["curve"], []).append(r)
        for curve, rows in curves.items():
            rows = rows if curve in ("baseline", "combined") else [results[2]] + rows  # curves start at send once+int8
            style = "o" if curve in ("baseline", "combined") else "o-"
            ax.plot([r["dppl"] for r in rows], [r[key] for r in rows], style, label=curve)
        ax.axvline(1.0, color="grey", ls=":", lw=1)
        if key == "bytes_vs_naive":
            ax.set_yscale("log")
        ax.set_xlabel("Δ perplexity % vs full model")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{name}_{fname}.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
