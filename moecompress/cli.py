"""`moecompress` command line: quantize (the main job), calibrate, eval, inspect, shard."""
from __future__ import annotations

import argparse
import os
import sys

from moecompress.errors import MoecompressError


def _quantize(args) -> None:
    from moecompress.pipeline import quantize
    from moecompress.recipe import load_recipe

    overrides = list(args.set or [])
    if args.budget_from_servers:
        overrides.append(f"allocation.budget.servers={args.budget_from_servers}")
    recipe = load_recipe(args.recipe, overrides)
    quantize(recipe, out=args.out, stop_after=args.stop_after, progress=not args.quiet)


def _calibrate(args) -> None:
    from moecompress.builtin import resolve_dataset, resolve_model
    from moecompress.calibrate.command import run_calibrate_command

    run_calibrate_command(resolve_model(args.model), resolve_dataset(args.dataset), samples=args.samples,
                          seq_len=args.seq_len, out=args.out, seed=args.seed, batch_size=args.batch_size,
                          all_experts=args.all_experts, layerwise=args.layerwise, dtype=args.dtype,
                          hessians=not args.no_hessians, trace=args.trace)


def _eval(args) -> None:
    from moecompress.builtin import resolve_dataset, resolve_model
    from moecompress.evaluate.command import run_eval_command

    run_eval_command(resolve_model(args.model), resolve_dataset(args.dataset), samples=args.samples,
                     seq_len=args.seq_len, reference=resolve_model(args.reference) if args.reference else None,
                     out=args.out, seed=args.seed, batch_size=args.batch_size, method=args.method,
                     family=args.family, device=args.device, dtype=args.dtype)


def _inspect(args) -> None:
    from pathlib import Path

    if (Path(args.dir) / "placement.json").exists():
        from moecompress.shard.inspect import format_placement

        print(format_placement(args.dir))
        return
    from moecompress.runtime.inspect import checkpoint_report, format_report

    print(format_report(checkpoint_report(args.dir)))


def _shard(args) -> None:
    from moecompress.shard.command import run_shard_command

    run_shard_command(args.model, args.stats, args.servers, args.out, method=args.method,
                      replicate=not args.no_replicate, eval_stats=args.eval_stats,
                      replicate_dense=not args.dense_on_one, balance_epsilon=args.balance_epsilon)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moecompress", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="the main job: calibrate -> allocate bits -> quantize -> checkpoint")
    q.add_argument("--recipe", required=True, help="recipe YAML (see recipes/)")
    q.add_argument("--out", help="run directory (default: the recipe's `output`)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. "
                   "allocation.budget.avg_bits=2.5 (repeatable)")
    q.add_argument("--budget-from-servers", metavar="SPEC", help='size the bit allocation to fit these servers, '
                   'e.g. "4x64MB" (= --set allocation.budget.servers=SPEC); then `moecompress shard` with the same SPEC')
    q.add_argument("--stop-after", choices=("calibrate", "sensitivity", "allocate", "quantize", "export"))
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_quantize)

    c = sub.add_parser("calibrate", help="record expert popularity, co-activation, paths and Hessians")
    c.add_argument("--model", required=True)
    c.add_argument("--dataset", required=True, help=".txt, .jsonl(.gz), builtin:NAME or hf:NAME[:CONFIG[:SPLIT[:COL]]]")
    c.add_argument("--samples", type=int, default=128)
    c.add_argument("--seq-len", type=int, default=512)
    c.add_argument("--out", required=True)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    c.add_argument("--all-experts", action="store_true", help="feed every token to every expert for the Hessians")
    c.add_argument("--layerwise", action="store_true", help="one decoder layer in memory at a time")
    c.add_argument("--no-hessians", action="store_true")
    c.add_argument("--trace", action="store_true", help="keep every token's routing (for placement replay)")
    c.set_defaults(func=_calibrate)

    e = sub.add_parser("eval", help="perplexity per domain, KL to a reference, bytes, average bits")
    e.add_argument("--model", required=True, help="moecompress checkpoint or plain model")
    e.add_argument("--dataset", required=True)
    e.add_argument("--samples", type=int, default=64)
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--reference", help="uncompressed model, for the KL divergence")
    e.add_argument("--out", help="results directory (results.json/.md and pareto.png are merged across runs)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--method", help="label of this model in the results (default: from the checkpoint)")
    e.add_argument("--family", help="series of the Pareto plot (default: the label before any '@')")
    e.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    e.set_defaults(func=_eval)

    i = sub.add_parser("inspect", help="per-layer bits and bytes of a checkpoint, or a shard placement")
    i.add_argument("dir")
    i.set_defaults(func=_inspect)

    s = sub.add_parser("shard", help="place experts on edge servers and write one bundle per server")
    s.add_argument("--model", required=True, help="moecompress checkpoint directory")
    s.add_argument("--stats", required=True, help="calibration directory (co-activation, paths)")
    s.add_argument("--servers", required=True, help='e.g. "4x64MB" or "64MB,64MB,32MB"')
    s.add_argument("--out", required=True)
    s.add_argument("--method", default="affinity", choices=("affinity", "greedy", "round_robin", "contiguous", "ilp"))
    s.add_argument("--no-replicate", action="store_true", help="do not replicate hot experts into spare memory")
    s.add_argument("--eval-stats", help="calibration directory made with --trace on held-out text: the traffic "
                   "report replays its routing")
    s.add_argument("--dense-on-one", action="store_true", help="non-expert weights on one server, not replicated")
    s.add_argument("--balance-epsilon", type=float, default=0.1, help="max/mean routed tokens per server <= 1+eps")
    s.set_defaults(func=_shard)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except MoecompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
