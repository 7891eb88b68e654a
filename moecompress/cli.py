"""`moecompress` command line: quantize (the main job), calibrate, eval, inspect, shard, run, generate."""
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
    if args.device:
        overrides.append(f"device={args.device}")
    if args.offload:
        overrides.append(f"offload={args.offload}")
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

    if args.bundles:
        return _eval_bundles(args)
    if not args.model:
        raise MoecompressError("eval needs --model (a checkpoint or model) or --bundles (a shard output)")

    run_eval_command(resolve_model(args.model), resolve_dataset(args.dataset), samples=args.samples,
                     seq_len=args.seq_len, reference=resolve_model(args.reference) if args.reference else None,
                     out=args.out, seed=args.seed, batch_size=args.batch_size, method=args.method,
                     family=args.family, device=args.device, dtype=args.dtype,
                     calibration=resolve_dataset(args.calibration) if args.calibration else None,
                     keep_overlap=args.keep_overlap)


def _verify(args) -> None:
    from moecompress.runtime.loading.verify import verify_path

    print(verify_path(args.dir).line())


def _verification_line(directory: str) -> str:
    from moecompress.runtime.loading.verify import verify_path

    try:
        return verify_path(directory).line()
    except MoecompressError as exc:
        return f"files DO NOT verify: {exc}"


def _inspect(args) -> None:
    from pathlib import Path

    print(_verification_line(args.dir))
    if (Path(args.dir) / "placement.json").exists():
        from moecompress.shard.inspect import format_placement

        print(format_placement(args.dir))
        return
    from moecompress.runtime.loading.inspect import checkpoint_report, format_report

    print(format_report(checkpoint_report(args.dir)))


def _shard(args) -> None:
    from moecompress.shard.command import run_shard_command

    run_shard_command(args.model, args.stats, args.servers, args.out, method=args.method, mode=args.mode,
                      balance=args.balance, replicate=not args.no_replicate, eval_stats=args.eval_stats,
                      replicate_dense=not args.dense_on_one, balance_epsilon=args.balance_epsilon,
                      link=args.link, batch=args.batch, compute_profile=args.compute_profile,
                      home_replicas=args.home_replicas, home_bits=args.home_bits, home_copies=args.home_copies,
                      home_copies_budget=args.home_copies_budget, home_copies_from=args.home_copies_from,
                      home_copies_high=args.home_copies_high, home_copies_high_share=args.home_copies_high_share,
                      home_copies_high_from=args.home_copies_high_from)


def _profile(args) -> None:
    import torch

    from moecompress.shard.profile import measure_profile, save_profiles

    torch_threads(args.threads)
    profiles = [measure_profile(args.model, batch=int(b), context=args.context, reps=args.reps,
                                dtype=getattr(torch, args.dtype)) for b in str(args.batch).split(",")]
    save_profiles(profiles, args.out)
    for p in profiles:
        print(f"batch {p.batch}: {1e3 * (p.head_seconds + sum(p.layer_seconds)):.2f} ms per decode step, experts "
              f"{1e3 * sum(p.moe_seconds):.2f} ms, expert-model dispatch {1e3 * sum(p.dispatch_seconds):.2f} ms + "
              f"{1e3 * sum(p.message_seconds) + 1e3 * sum(p.serve_seconds):.2f} ms per request per layer, "
              f"transport round trip {1e3 * p.transport_seconds:.2f} ms, generation step "
              f"{1e3 * p.generate_seconds:.2f} ms ({p.source})")
    print(f"wrote {args.out}")


def torch_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _eval_bundles(args) -> None:
    """eval --bundles: the evaluation's metrics on logits computed by the edge runtime (the CLI glues the two)."""
    from types import SimpleNamespace

    import torch

    from moecompress.builtin import resolve_dataset
    from moecompress.evaluate.report import format_table
    from moecompress.evaluate.run import evaluate, load_model
    from moecompress.runtime.edge import deploy
    from moecompress.runtime.edge.commands import report_counters

    dtype = getattr(torch, args.dtype or "float32")
    reference = load_model(args.reference, dtype, "cpu") if args.reference else None
    with deploy(args.bundles, simulate=args.simulate, servers=args.num_servers, timeout=args.timeout,
                dtype=dtype, tokens=args.tokens, similarity=args.token_similarity,
                expert_budget=args.expert_budget) as d:
        model = lambda input_ids, attention_mask, **_: SimpleNamespace(logits=d(input_ids, attention_mask))  # noqa: E731
        result = evaluate(model, d.tokenizer, resolve_dataset(args.dataset), args.samples, args.seq_len, args.seed,
                          reference_model=reference, batch_size=args.batch_size,
                          method=args.method or f"bundles:{args.bundles}", reference=args.reference,
                          calibration=resolve_dataset(args.calibration) if args.calibration else None,
                          keep_overlap=args.keep_overlap)
        if result.overlap is not None:  # as `eval --model` prints it
            print(result.overlap.describe())
        print(format_table([result]))
        report_counters(d.counters, args.counters_out)


def _edge_arguments(p, prompts: bool = True, model: bool = False) -> None:
    """Options of the commands that run a deployment (run, generate, eval --bundles); model: --model CKPT instead
    of --bundles (generate)."""
    p.add_argument("--simulate", action="store_true", help="run every server in this process (same outputs and "
                   "counters as the real run), for planning without a cluster")
    p.add_argument("--servers", dest="num_servers", type=int, help="number of servers (default: the placement's; a "
                   "different number is refused)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds after which a silent server is reported")
    p.add_argument("--counters-out", help="write the traffic/time/memory counters as JSON here")
    p.add_argument("--tokens", help="token policies of the expert model, e.g. "
                   "'int8+protect:first=4+prune_server:threshold=0.2' (policies joined by +, knobs name=value; "
                   "int8/fp8/bf16 alone: that payload both ways), or a YAML file with a `tokens:` section; "
                   "default: off (the lossless exchange)")
    p.add_argument("--token-similarity", help="[MoE layers, experts, experts] expert similarity (.pt, or "
                   ".safetensors with key `similarity`) for the substitute policy")
    p.add_argument("--expert-budget", type=int, help="bytes of experts each server keeps in memory; the rest are "
                   "read from its bundle on use (tiered expert store; default: all resident)")
    if not prompts:
        return
    source = p.add_mutually_exclusive_group(required=True) if model else p
    source.add_argument("--bundles", required=not model, help="a `moecompress shard` output directory")
    if model:
        source.add_argument("--model", help="one checkpoint, generated from in this process: the whole-model C++ "
                            "decode step on CPU, CUDA graphs on --device cuda, else transformers' generate")
        p.add_argument("--device", default="cpu", help="with --model: where the model runs (cpu, cuda, cuda:N)")
    p.add_argument("--prompt", action="append", default=[], help="repeatable; one batch, left-padded")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--tokenizer", help="tokenizer directory (default: the home bundle's)")


def _generate(args) -> None:
    if getattr(args, "model", None):
        from moecompress.runtime.generation import run_model

        edge_only = [flag for attr, flag in (("simulate", "--simulate"), ("num_servers", "--servers"),
                                             ("counters_out", "--counters-out"), ("tokens", "--tokens"),
                                             ("token_similarity", "--token-similarity"),
                                             ("expert_budget", "--expert-budget"), ("homes", "--homes"))
                     if getattr(args, attr, None)]
        if edge_only:
            raise MoecompressError(f"{', '.join(edge_only)}: options of a deployment (--bundles), not of --model")
        if not args.prompt:
            raise MoecompressError("generate needs at least one --prompt TEXT")
        run_model(args.model, args.prompt, max_new_tokens=args.max_new_tokens, sample=args.sample,
                  temperature=args.temperature, top_p=args.top_p, seed=args.seed, dtype=args.dtype,
                  tokenizer=args.tokenizer, device=args.device)
        return
    from moecompress.runtime.edge.commands import run_command, run_generate

    options = dict(max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, simulate=args.simulate, counters_out=args.counters_out,
                   tokenizer=args.tokenizer, tokens=args.tokens, similarity=args.token_similarity,
                   expert_budget=args.expert_budget, homes=_homes(args.homes))
    if args.command == "run":
        run_command(args.bundles, args.prompt, servers=args.num_servers, timeout=args.timeout, dtype=args.dtype,
                    **options)
        return
    if not args.prompt:
        raise MoecompressError("generate needs at least one --prompt TEXT")
    run_generate(args.bundles, args.prompt, servers=args.num_servers, timeout=args.timeout, dtype=args.dtype,
                 **options)


def _homes(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(h) for h in text.split(","))
    except ValueError:
        raise MoecompressError(f"--homes {text!r}: give server numbers separated by commas, e.g. 0,1") from None


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
    q.add_argument("--device", help="where calibration, sensitivity, GPTQ and tuning run: cpu (default), cuda or "
                   "cuda:N (= --set device=...)")
    q.add_argument("--offload", choices=("none", "layer", "auto"),
                   help="layer: the model stays in host memory, one decoder layer at a time on --device (calibrate, "
                        "sensitivity, quantize); auto: layer when the model does not fit there (= --set offload=...)")
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
    e.add_argument("--model", help="moecompress checkpoint or plain model")
    e.add_argument("--bundles", help="instead of --model: a `moecompress shard` output, run across its servers")
    _edge_arguments(e, prompts=False)
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
    e.add_argument("--calibration", help="calibration text: its overlap with --dataset (identical documents, "
                   "lines of >= 40 chars) is reported and dropped from the evaluation text (default: the "
                   "calibration dataset of the run that made the checkpoint, when found)")
    e.add_argument("--keep-overlap", action="store_true", help="evaluate on the whole --dataset, overlap included")
    e.set_defaults(func=_eval)

    v = sub.add_parser("verify", help="check a checkpoint, run directory or bundle set whole (sha256 of every file, "
                       "quantization_config, tensor shapes); exits non-zero naming the first bad file")
    v.add_argument("dir")
    v.set_defaults(func=_verify)

    i = sub.add_parser("inspect", help="per-layer bits and bytes of a checkpoint, or a shard placement")
    i.add_argument("dir")
    i.set_defaults(func=_inspect)

    s = sub.add_parser("shard", help="place experts on edge servers and write one bundle per server")
    s.add_argument("--model", required=True, help="moecompress checkpoint directory")
    s.add_argument("--stats", required=True, help="calibration directory (co-activation, paths)")
    s.add_argument("--servers", required=True, help='e.g. "4x64MB" or "64MB,64MB,32MB"')
    s.add_argument("--out", required=True)
    s.add_argument("--mode", default="auto", choices=("auto", "pipeline", "expert"), help="execution model: auto "
                   "(default: with --method, its model; else every method of both models, the fastest by modeled "
                   "decode time on --link for --batch sequences), pipeline (contiguous layer ranges per server) or "
                   "expert (home server + experts spread over servers)")
    s.add_argument("--link", default=None, help="--mode auto: the servers' link, lan (1 Gbit/s, 0.5 ms), wan "
                   "(100 Mbit/s, 5 ms) or NAME=RATE,LATENCY, e.g. edge=200Mbit/s,2ms; several joined by '+'. "
                   "Default: lan+wan, the candidate least slower than the best baseline on either")
    s.add_argument("--batch", type=int, default=1, help="--mode auto: concurrent sequences decoded")
    s.add_argument("--compute-profile", help="--mode auto: a `moecompress profile` file measured on the target "
                   "servers (default: measured here, on this machine)")
    s.add_argument("--method", choices=("fewest_servers", "all_servers", "affinity", "greedy_balanced", "round_robin",
                                        "contiguous", "ilp"), help="pipeline: fewest_servers (default) or all_servers; "
                   "expert: affinity (default), greedy_balanced, round_robin, contiguous, ilp")
    s.add_argument("--balance", default="total", choices=("total", "layer"), help="expert model: routed tokens "
                   "balanced over all layers summed, or every layer on its own")
    s.add_argument("--no-replicate", action="store_true", help="do not replicate hot experts into spare memory")
    s.add_argument("--eval-stats", help="calibration directory made with --trace on held-out text: the traffic "
                   "report replays its routing")
    s.add_argument("--dense-on-one", action="store_true", help="non-expert weights on one server, not replicated")
    s.add_argument("--balance-epsilon", type=float, default=0.1, help="max/mean routed tokens per server <= 1+eps")
    s.add_argument("--home-replicas", type=int, default=0, metavar="N", help="expert model: a copy of each MoE "
                   "layer's N most used experts on the home, inside the home's memory (lets token policies such as "
                   "localize make whole layers local; default 0)")
    s.add_argument("--home-bits", type=int, metavar="B", help="expert model: the home copies are the experts --model "
                   "stores at B bits (a checkpoint quantized with shard.home.home_bit_plan: more copies in the same "
                   "memory); with --home-replicas N, N of them per layer")
    s.add_argument("--home-copies", type=int, metavar="BITS", help="expert model: every home's bundle also gets "
                   "BITS-bit copies of experts it does not hold (server-K/home-copies/), which the token policy "
                   "localize:copies=true computes on (run/generate/eval --bundles load them); taken from --model's "
                   "own low-bit copies (recipe store.copy_bits) or --home-copies-from")
    s.add_argument("--home-copies-budget", type=float, default=1.0, metavar="F", help="--home-copies: bytes per "
                   "home, x the mean server's expert bytes (default 1.0); experts by calibration routing mass per byte")
    s.add_argument("--home-copies-from", metavar="DIR", help="--home-copies: a checkpoint of the same model storing "
                   "the experts at BITS (e.g. the model quantized at BITS), instead of --model's low-bit copies")
    s.add_argument("--home-copies-high", type=int, metavar="BITS", help="--home-copies: mixed-bit copies in the "
                   "same budget: the hottest remote experts (routing mass per byte) at these bits (above "
                   "--home-copies) on --home-copies-high-share of it, the rest at --home-copies BITS; one bundle "
                   "holds both")
    s.add_argument("--home-copies-high-share", type=float, metavar="S", help="--home-copies-high: the share of the "
                   "budget for the high-bit copies, in [0, 1] (default 0.5)")
    s.add_argument("--home-copies-high-from", metavar="DIR", help="--home-copies-high: a checkpoint of the same model "
                   "storing the experts at those bits (default: --model's low-bit copies at those bits, else the "
                   "experts --model stores at those bits, e.g. an 8-bit model's own tensors)")
    s.set_defaults(func=_shard)

    pr = sub.add_parser("profile", help="measure a checkpoint's decode compute per layer on this machine (run it on "
                        "a target server; `shard --compute-profile FILE` plans with it)")
    pr.add_argument("--model", required=True, help="moecompress checkpoint directory")
    pr.add_argument("--out", required=True, help="JSON file to write")
    pr.add_argument("--batch", default="1,8", help="comma-separated concurrent sequences, e.g. 1,8")
    pr.add_argument("--context", type=int, default=128, help="cached tokens before the measured decode step")
    pr.add_argument("--reps", type=int, default=5, help="decode steps measured (the fastest is kept)")
    pr.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    pr.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="compute dtype, the deployment's (`run`/`generate --dtype`; default float32)")
    pr.set_defaults(func=_profile)

    r = sub.add_parser("run", help="run a deployment's servers (one machine: starts them all; under torchrun: this "
                       "rank's server) and generate from --prompt or stdin lines",
                       description="Several machines: on each, `torchrun --nnodes N --nproc-per-node 1 --node-rank K "
                       "--master-addr HOST --master-port PORT -m moecompress.cli run --bundles OUT ...` with "
                       "OUT/placement.json and OUT/server-K/ present (RANK = K); with `--rdzv-backend c10d "
                       "--rdzv-endpoint HOST:PORT` ranks come in join order, so give every machine every server-K/. "
                       "The home rank generates, the others serve.")
    _edge_arguments(r)
    r.add_argument("--homes", help="servers that admit the prompts, e.g. 0,1 (the same on every rank; the first "
                   "generates, the others compute their share at the same time; each must hold the dense weights)")
    r.set_defaults(func=_generate)
    g = sub.add_parser("generate", help="generate text through a deployment's servers (--bundles) or from one "
                       "checkpoint (--model); greedy or sampling")
    _edge_arguments(g, model=True)
    g.add_argument("--homes", help="servers that admit the prompts round robin and compute at the same time, e.g. "
                   "0,1 (each must hold the dense weights; each keeps its sequences' KV cache; default: the "
                   "placement's one home)")
    g.set_defaults(func=_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except MoecompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, file too large, permission denied, read-only: the environment, not a bug
        if exc.errno is None:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; free space or fix permissions and re-run "
              "(no incomplete output is left that looks complete)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
