"""Quality benchmark: perplexity at equal bytes; ours vs uniform, random and popularity-only, all with one quantizer.

On one trained reference model (../shared/models/refmoe-qwen3 or refmoe-olmoe): calibrate on calib.jsonl.gz,
evaluate on eval.jsonl.gz WITHOUT the lines that also occur in the calibration text (evaluate/overlap.py; the
overlap is reported), group size 64. Every configuration is evaluated with its dequantized weights written into the
float model (tests/test_format.py shows the packed runtime gives the same logits to 2e-7).

Every allocation -- uniform, random (the same bit histogram as ours, shuffled over experts, 3 seeds),
popularity-only (damage = token share x 4^-bits) and ours (recipes/refmoe-qwen3.yaml: loss-aware sensitivity of
each expert projection -- gate_up and down get their own bits -- measured on the GPTQ weights themselves, + global
allocation; `--variants` adds levers, by default the per-expert setting, as ours[...]; `--sensitivity
loss_aware:projection` is the older RTN-proxy ours) -- is quantized with the same GPTQ + clipping search, and
each is run twice: as quantized, and after the post-quantization step (scale tuning, quantize/tune.py). `avg bits`
is nominal (recipe `allocation.budget.avg_bits`): equal avg bits = equal bytes. Uniform RTN rows are context only.

    .venv/bin/python eval/bench_quality.py --model ../shared/models/refmoe-olmoe   # -> eval/results/quality_<name>.*

Post-quantization steps (--post, each a set of rows with the same step applied to ours, popularity-only and uniform
GPTQ): `tune` (end-to-end scale tuning, quantize/tune.py), `router` (router refit to the quantized model,
quantize/router.py), `blockwise` (per-layer output reconstruction of the scales, quantize/blockwise.py), and chains
such as `blockwise+router`. Goals are checked for each, ours against baselines with the same step.

Allocation levers beside `--variants`: `--progressive N` adds ours[progressive] (pipeline/progressive.py: N rounds
of fixing the most damaging items and re-measuring the rest in the model quantized as planned); `--dense 1` (default)
adds ours[dense] (the attention linears allocated together with the experts from their loss-aware costs) and
ours[attn8] (attention 8-bit by rule), both at the same TOTAL bytes as the other rows: experts at the budget plus
attention in bf16 (the `attention MiB` column). Every plan is allocated deterministically (allocate/solvers.py);
popularity-only is allocated twice and must come out the same.

`--held-back SHARE` runs the pipeline's `calibration.held_back`: GPTQ on all sequences, the costs' candidates
from the fit sequences' Hessians, measured on the held-back ones (calibrate/split.py). A variant ending in `+layer`
(e.g. `loss_aware:projection:exact+layer`) has layer-calibrated costs (sensitivity/layer_scale.py).
`--post-rows` and `--uniform` restrict the rows run (for bounded device calls; eval/bench_quality_device.sh).

Rows are written as they finish; --deadline-s stops starting new post-quantization rows after that many seconds (the
plain rows all come first), so a bounded run still yields a complete table without them. The allocator's solver and
proven gap of every plan are recorded in the JSON (`allocations`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import random
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moecompress.allocate import AllocationRules, Budget, allocate, to_bit_plan  # noqa: E402
from moecompress.arch.adapters import describe, proj_weights, set_proj_weights  # noqa: E402
from moecompress.artifacts.bit_plan import BitPlan  # noqa: E402
from moecompress.artifacts.cost_table import CostItem, CostTable  # noqa: E402
from moecompress.artifacts.quantized import QuantizedTensors, expert_key  # noqa: E402
from moecompress.calibrate.dataset import build_calibration_data  # noqa: E402
from moecompress.calibrate.options import CalibrationOptions  # noqa: E402
from moecompress.calibrate.run import calibrate  # noqa: E402
from moecompress.calibrate.split import held_back_data, held_samples, joined  # noqa: E402
from moecompress.evaluate import evaluate, prepare_eval_data  # noqa: E402
from moecompress.format.sizes import matrix_bytes  # noqa: E402
from moecompress.pipeline.progressive import ProgressiveOptions, progressive_allocation  # noqa: E402
from moecompress.quantize.blockwise import BlockwiseOptions, reconstruct_blocks  # noqa: E402
from moecompress.quantize.router import RouterFitOptions, refit_routers  # noqa: E402
from moecompress.quantize.stage import QuantizeOptions, quantize_model  # noqa: E402
from moecompress.quantize.tune import TuneOptions, quantized_weights, tune_scales  # noqa: E402
from moecompress.sensitivity import SensitivityOptions, estimate_costs  # noqa: E402
from moecompress.sensitivity.linears import linear_shapes  # noqa: E402

POST_STEPS = ("tune", "router", "blockwise", "blockwise+router", "blockwise+tune", "tune+router")
QUANTIZERS = {"rtn": QuantizeOptions(method="rtn", clip="minmax"),  # context only: plain min/max round-to-nearest
              "gptq": QuantizeOptions(method="gptq")}  # the product's GPTQ: clip "mse", no act-order


def quantize_all(model, layout, stats, method: str, group_size: int, linears: tuple[str, ...] = ()) -> dict:
    """bits -> QuantizedTensors of every expert (and of the dense `linears`) at that width. Each matrix is quantized
    from the original weights and its own Hessian, independently of the other matrices' widths, so any plan is
    assembled from these."""
    return {b: quantize_model(model, layout, dataclasses.replace(BitPlan.uniform(layout, b, group_size),
                                                                 linears={p: b for p in linears}),
                              stats, QUANTIZERS[method], progress=False) for b in (2, 3, 4, 8)}


def plan_tensors(layout, plan: BitPlan, by_bits: dict) -> QuantizedTensors:
    """The QuantizedTensors of `plan`, each expert matrix taken from the quantization at its planned width."""
    weights, fallbacks = {}, {}
    for m in layout.moe_layers:
        for p in m.projs:
            for e, bits in enumerate(plan.experts[m.experts_path][p.name]):
                if bits != 16:
                    key = expert_key(m.experts_path, p.name, e)
                    weights[key] = by_bits[bits].weights[key]
                    if key in by_bits[bits].fallbacks:
                        fallbacks[key] = by_bits[bits].fallbacks[key]
    for path, bits in plan.linears.items():
        if bits != 16:
            weights[path] = by_bits[bits].weights[path]
    return QuantizedTensors(weights=weights, fallbacks=fallbacks)


def fake_quantized(model, layout, quantized: QuantizedTensors, routers: dict | None = None):
    """A copy of `model` with every quantized expert weight replaced by its dequantized value (and the routers
    in `routers`, path -> weight [E, H], replaced)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for path, w in (routers or {}).items():
            out.get_submodule(path).weight.copy_(w)
    for m in layout.moe_layers:
        experts = out.get_submodule(m.experts_path)
        for p in m.projs:
            w = proj_weights(experts, m, p.name).detach().clone()
            for e in range(m.num_experts):
                key = expert_key(m.experts_path, p.name, e)
                if key in quantized.weights:
                    w[e] = quantized.weights[key].dequantize(w.dtype).to(w.device)
            set_proj_weights(experts, m, p.name, w)
    with torch.no_grad():
        for path in layout.attention_linears + layout.shared_expert_linears + layout.dense_mlp_linears:
            if path in quantized.weights:
                lin = out.get_submodule(path)
                lin.weight.copy_(quantized.weights[path].dequantize(lin.weight.dtype).to(lin.weight.device))
    return out


def plan_size(plan: BitPlan | None, layout, shapes: dict | None = None) -> dict:
    """Nominal bits (avg_bits), stored bits with scales/zero-points, and bytes of the routed experts of `plan`;
    with `shapes` (path -> (out, in) of the attention linears) also their bytes (bf16 unless the plan quantizes
    them)."""
    num = den = nbytes = 0
    for m in layout.moe_layers:
        for p in m.projs:
            n = p.in_features * p.out_features
            for b in (plan.experts[m.experts_path][p.name] if plan else [16] * m.num_experts):
                num, den = num + b * n, den + n
                nbytes += matrix_bytes(p.out_features, p.in_features, b, plan.group_size if plan else 64,
                                       plan.symmetric if plan else False)
    out = {"avg_bits": num / den, "stored_bits": 8 * nbytes / den, "expert_bytes": nbytes}
    if shapes:
        lin = plan.linears if plan else {}
        out["dense_bytes"] = sum(matrix_bytes(o, i, lin.get(p, 16), 64 if plan is None else plan.group_size,
                                              False if plan is None else plan.symmetric)
                                 for p, (o, i) in shapes.items())
    return out


def shuffled(plan: BitPlan, layout, seed: int) -> BitPlan:
    """The same multiset of per-expert bit-widths, assigned to experts at random (across all layers)."""
    keys = [(m.experts_path, e) for m in layout.moe_layers for e in range(m.num_experts)]
    bits = [tuple(plan.experts[p][proj][e] for proj in plan.experts[p]) for p, e in keys]
    random.Random(seed).shuffle(bits)
    experts = {m.experts_path: {p.name: [0] * m.num_experts for p in m.projs} for m in layout.moe_layers}
    for (path, e), bs in zip(keys, bits):
        for proj, b in zip(experts[path], bs):
            experts[path][proj][e] = b
    return BitPlan(plan.group_size, plan.symmetric,
                   {p: {k: tuple(v) for k, v in d.items()} for p, d in experts.items()})


def popularity_costs(cost: CostTable, stats) -> CostTable:
    """Damage = the expert's share of routed tokens x a fixed per-bit error curve (4^-bits): popularity alone."""
    items = []
    for it in cost.items:
        load = float(stats.tokens[it.layer, it.expert]) / float(stats.tokens[it.layer].sum())
        dmg = tuple(0.0 if b == 16 else load * 4.0 ** (-b) for b in it.bits)
        items.append(CostItem(it.kind, it.path, it.proj, it.expert, it.layer, it.numel, it.bits, dmg, it.bytes))
    return CostTable(cost.group_size, cost.symmetric, "popularity-only", tuple(items))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/refmoe-qwen3"))
    ap.add_argument("--name", help="label of the model in file names (default: its directory name)")
    ap.add_argument("--calib", default=str(ROOT.parent / "shared/data/corpus/calib.jsonl.gz"))
    ap.add_argument("--eval", default=str(ROOT.parent / "shared/data/corpus/eval.jsonl.gz"))
    ap.add_argument("--keep-overlap", action="store_true", help="evaluate on all of --eval, overlap included")
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--budgets", default="2.5,3.0", help="nominal average bits per routed-expert weight")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--tune-steps", type=int, default=300, help="scale tuning steps of the tuned rows (0: none)")
    ap.add_argument("--post", default="router,blockwise,tune",
                    help="post-quantization steps, each a row set (comma-separated; '+' chains steps in order): "
                         + ", ".join(POST_STEPS))
    ap.add_argument("--router-steps", type=int, default=RouterFitOptions().steps, help="L-BFGS steps per router")
    ap.add_argument("--blockwise-steps", type=int, default=BlockwiseOptions().steps, help="Adam steps per MoE layer")
    ap.add_argument("--skip-rtn", action="store_true", help="leave out the uniform RTN context rows")
    ap.add_argument("--sensitivity", default="loss_aware:projection:exact",
                    help="ours: METHOD:GRANULARITY[:QUANTIZER], QUANTIZER rtn (proxy) | gptq (simulated, the recipe's "
                         "sensitivity.quantizer: gptq) | exact (the GPTQ weights the rows are made of; on refmoe-qwen3 "
                         "the same plans as gptq, 10x faster here)")
    ap.add_argument("--variants", default="loss_aware:expert",
                    help="levers tried against ours, METHOD:GRANULARITY, comma-separated ('' for none): reported as "
                         "ours[variant], with the same budgets, quantizer and tuning")
    ap.add_argument("--progressive", type=int, default=0,
                    help="rounds of progressive allocation (pipeline/progressive.py) reported as ours[progressive] "
                         "(0: no such rows)")
    ap.add_argument("--fix-share", type=float, default=ProgressiveOptions().fix_share,
                    help="progressive allocation: share of the predicted damage whose items are fixed each round")
    ap.add_argument("--dense", type=int, default=1,
                    help="1: rows ours[dense] (the attention linears allocated in the same total budget as the "
                         "experts, from their loss-aware costs) and ours[attn8] (attention pinned to 8 bits by rule, "
                         "same total budget); 0: none")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no post-quantization row after this many seconds")
    ap.add_argument("--skip-untuned", action="store_true", help="run only bf16 and the tuned rows")
    ap.add_argument("--skip", default="", help="methods whose tuned row not to run (comma-separated, e.g. measured "
                    "in an earlier run with the same settings)")
    ap.add_argument("--held-back", type=float, default=0.0,
                    help="share of the calibration documents kept out of calibration for the costs to be measured on "
                         "(recipe calibration.held_back; calibrate/split.py); 0: the last 25 %% of the calibration "
                         "sequences")
    ap.add_argument("--uniform", type=lambda s: [int(b) for b in s.split(",") if b], default=[2, 3, 4],
                    help="bit-widths of the plain uniform GPTQ rows (comma-separated; default 2,3,4)")
    ap.add_argument("--post-rows", default="", help="run the post-quantization rows of only these labels "
                    "(comma-separated, e.g. 'ours gptq 3.0,uniform gptq 3-bit'; '' = all)")
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    name = args.name or Path(args.model).name
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    layout = describe(model)
    g = args.group_size
    attn = tuple(layout.attention_linears) if args.dense else ()
    shapes = linear_shapes(model, tuple(layout.attention_linears))
    calib_options = CalibrationOptions(samples=args.calib_samples, seq_len=args.seq_len, all_experts=True,
                                       progress=False, dense_hessians=attn or False, device=args.device)
    if args.held_back:  # as the pipeline with calibration.held_back (steps.calibration_data): all sequences for
        # GPTQ; the costs' candidates from the fit sequences' Hessians, measured on the held-back sequences
        fit, held = held_back_data(args.calib, tokenizer, args.calib_samples,
                                   held_samples(args.calib_samples, SensitivityOptions().holdout), args.seq_len,
                                   args.held_back)
        data = joined(fit, held)
        fit_stats = calibrate(model, tokenizer, fit, calib_options)
    else:
        data, held = build_calibration_data(args.calib, tokenizer, args.calib_samples, args.seq_len, seed=0), None
    stats = calibrate(model, tokenizer, data, calib_options)
    if not args.held_back:
        fit_stats = stats
    batches = [(i.to(args.device), m.to(args.device)) for i, m, _ in data.batches(8)]
    # what the sensitivity runs: all held-back sequences, or the last 25 % of the calibration sequences
    sens_batches = batches if held is None else [(i.to(args.device), m.to(args.device)) for i, m, _ in held.batches(8)]
    sens_holdout = {} if held is None else {"holdout": 1.0}
    quantized = {m: quantize_all(model, layout, stats, m, g, attn if m == "gptq" else ()) for m in QUANTIZERS
                 if m == "gptq" or not (args.skip_untuned or args.skip_rtn)}
    # the costs' candidates: these GPTQ weights, or with --held-back those of the fit sequences' Hessians
    candidates = quantized["gptq"] if fit_stats is stats else quantize_all(model, layout, fit_stats, "gptq", g)

    def exact(moe, proj: str, bits: int) -> torch.Tensor:
        """The experts' weights [E, out, in] of `proj` as the GPTQ run above made them at `bits` (what every row is
        evaluated with; with --held-back, GPTQ on the fit sequences): sensitivity quantizer "exact"."""
        w = proj_weights(model.get_submodule(moe.experts_path), moe, proj).detach().to(torch.float32).clone()
        for e in range(moe.num_experts):
            key = expert_key(moe.experts_path, proj, e)
            if key in candidates[bits].weights:
                w[e] = candidates[bits].weights[key].dequantize(torch.float32).to(w.device)
        return w

    costs, cost_seconds = {}, {}
    for variant in [args.sensitivity] + [v for v in args.variants.split(",") if v]:
        # METHOD:GRANULARITY[:QUANTIZER][+layer]: QUANTIZER rtn | gptq (simulated) | exact (the GPTQ weights the rows
        # are made of); +layer: layer-calibrated costs (sensitivity/layer_scale.py)
        spec, _, extra = variant.partition("+")
        method, granularity, *quantizer = spec.split(":")
        main = variant == args.sensitivity and method == "loss_aware"
        cost_seconds[variant] = time.time()
        costs[variant] = estimate_costs(model, layout, fit_stats, SensitivityOptions(
            method, granularity, *["gptq" if q == "exact" else q for q in quantizer], layer_scale=extra == "layer",
            **sens_holdout), candidates=(2, 3, 4, 8, 16),
            group_size=g, calibration_batches=sens_batches, progress=False, linears=attn if main else (),
            candidate_weights=exact if quantizer == ["exact"] else None)
        cost_seconds[variant] = round(time.time() - cost_seconds[variant], 1)
        print(f"{name}: costs {variant} in {cost_seconds[variant]:.0f}s", flush=True)
    with_dense = costs[args.sensitivity]  # the experts' items are the same with or without the linears
    cost = costs[args.sensitivity] = dataclasses.replace(
        with_dense, items=tuple(it for it in with_dense.items if it.kind == "expert"))
    eval_data, overlap = prepare_eval_data(args.eval, tokenizer, args.eval_samples, args.seq_len, seed=1,
                                           calibration=args.calib, keep_overlap=args.keep_overlap)
    print(f"{name}: calibrated, costs and every expert at 2/3/4/8 bits quantized in {time.time() - t0:.0f}s\n"
          f"{overlap.describe()}", flush=True)
    posts = [x for x in args.post.split(",") if x]
    bad = [x for x in posts if x not in POST_STEPS]
    if bad:
        raise SystemExit(f"--post {bad}: allowed {', '.join(POST_STEPS)}")
    options = {"tune": TuneOptions(steps=args.tune_steps), "router": RouterFitOptions(steps=args.router_steps),
               "blockwise": BlockwiseOptions(steps=args.blockwise_steps)}
    rows, tuned = [], []
    info = {"model": name, "path": args.model, "device": machine(args.device), "overlap": overlap.__dict__,
            "args": vars(args), "cost_seconds": cost_seconds, "cost_methods": {v: c.method for v, c in costs.items()}}

    def run(label: str, family: str, plan: BitPlan | None, method: str = "gptq", post: str = "", **extra):
        t = time.time()
        q, routers = (None, None) if plan is None else (plan_tensors(layout, plan, quantized[method]), None)
        for step in post.split("+") if post else ():
            if step == "tune":
                q, report = tune_scales(model, layout, q, batches, options["tune"], progress=False)
            elif step == "blockwise":
                q, report = reconstruct_blocks(model, layout, q, batches, options["blockwise"])
            else:  # router: refit to the quantized experts (after any scale fitting)
                routers, report = refit_routers(model, layout, quantized_weights(model, layout, q), batches,
                                                options["router"])
            tuned.append({"method": label, "step": step, **report})
        m = model if plan is None else fake_quantized(model, layout, q, routers)
        r = evaluate(m, tokenizer, eval_data, reference_model=None if plan is None else model, method=label,
                     family=family, progress=False)
        rows.append({"method": label + (f" + {post}" if post else ""), "family": family, "tuned": post == "tune",
                     "post": post, **plan_size(plan, layout, shapes), "ppl": r.perplexity, "kl": r.kl,
                     "domains": {d.name: d.perplexity for d in r.domains},
                     "fallbacks": len(q.fallbacks) if q else 0, **extra})
        print(f"{name} {rows[-1]['method']:44s} ppl {r.perplexity:8.3f} kl {r.kl or 0:.4f}  ({time.time() - t:.0f}s)",
              flush=True)
        write(rows, tuned, info, Path(args.out), name, time.time() - t0)

    rules = AllocationRules(candidates=(2, 3, 4, 8))
    plans = {}
    solves = info.setdefault("allocations", {})
    # what popularity-only depends on: if these differ between two runs, so may its plan
    info["tokens_sha"] = hashlib.sha256(stats.tokens.cpu().numpy().tobytes()).hexdigest()[:16]

    def failure(what: str, exc: Exception) -> None:
        traceback.print_exc()
        info.setdefault("errors", []).append(f"{what}: {type(exc).__name__}: {exc}")
        info["note"] = "FAILED rows: " + "; ".join(info["errors"])

    def record(what: str, avg: float, a, **extra) -> BitPlan:
        """The plan, with the solver, its proven gap and a digest of the chosen bits recorded."""
        digest = hashlib.sha256(repr(a.bits).encode()).hexdigest()[:16]
        solves[f"{what} {avg}"] = {"solver": a.solver, "gap": a.gap, "damage": a.damage, "bits_sha": digest, **extra}
        return to_bit_plan(a, layout)

    def solve(what: str, table: CostTable, avg: float) -> BitPlan:
        return record(what, avg, allocate(table, Budget(avg_bits=avg), rules))

    spec, _, extra = args.sensitivity.partition("+")
    method, granularity, *quantizer = spec.split(":")
    main_options = SensitivityOptions(method, granularity, *["gptq" if q == "exact" else q for q in quantizer],
                                      layer_scale=extra == "layer", **sens_holdout)

    def reestimate(plan: BitPlan) -> CostTable:
        """Ours' costs re-measured in the model quantized (GPTQ, as evaluated) by `plan`."""
        context = fake_quantized(model, layout, plan_tensors(layout, plan, quantized["gptq"]))
        return estimate_costs(model, layout, fit_stats, main_options, candidates=(2, 3, 4, 8, 16), group_size=g,
                              calibration_batches=sens_batches, progress=False, context_model=context,
                              candidate_weights=exact if quantizer == ["exact"] else None)

    for avg in (float(x) for x in args.budgets.split(",")):
        ours = solve("ours", cost, avg)
        pop_costs = popularity_costs(cost, stats)
        pop = solve("popularity-only", pop_costs, avg)
        again = allocate(pop_costs, Budget(avg_bits=avg), rules)  # the same inputs must give the same plan
        if to_bit_plan(again, layout) != pop:
            raise SystemExit(f"popularity-only allocation at {avg} bits is not reproducible")
        plans[avg] = {"ours": ours, "popularity-only": pop,
                      **{f"random s{s}": shuffled(ours, layout, s) for s in range(args.random_seeds)},
                      **{f"ours[{v}]": solve(f"ours[{v}]", c, avg) for v, c in costs.items() if v != args.sensitivity}}
        if args.progressive and main_options.method != "hessian":
            try:
                t = time.time()
                a, history = progressive_allocation(cost, Budget(avg_bits=avg), rules, layout, reestimate,
                                                    ProgressiveOptions(args.progressive, args.fix_share))
                plans[avg]["ours[progressive]"] = record("ours[progressive]", avg, a, rounds=history,
                                                         seconds=time.time() - t)
            except Exception as exc:  # a broken lever must not lose the other rows: reported, then left out
                failure(f"ours[progressive] {avg}", exc)
        if attn and any(it.kind == "linear" for it in with_dense.items):
            try:
                # the same TOTAL bytes as every other row: experts at `avg` bits + the attention linears in bf16
                total = allocate(cost, Budget(avg_bits=avg), rules).budget_bytes + sum(
                    matrix_bytes(o, i, 16, g, False) for p, (o, i) in shapes.items() if p in attn)
                dense_costs = dataclasses.replace(with_dense, items=tuple(
                    it if it.kind == "linear" else dataclasses.replace(it, bits=it.bits[:-1], damage=it.damage[:-1],
                                                                       bytes=it.bytes[:-1])  # experts: no 16-bit option
                    for it in with_dense.items))
                dense_rules = AllocationRules(candidates=(2, 3, 4, 8, 16))
                plans[avg]["ours[dense]"] = record("ours[dense]", avg, allocate(dense_costs, Budget(bytes=total),
                                                                                 dense_rules))
                plans[avg]["ours[attn8]"] = record("ours[attn8]", avg, allocate(
                    dense_costs, Budget(bytes=total), dataclasses.replace(dense_rules, pins={p: 8 for p in attn})))
            except Exception as exc:  # reported, then left out
                failure(f"ours[dense] {avg}", exc)
    print(f"{name}: plans ready at {time.time() - t0:.0f}s", flush=True)
    uniform = {b: BitPlan.uniform(layout, b, g) for b in (2, 3, 4) if b in args.uniform or b in (2, 3)}
    plain_uniform = [b for b in uniform if b in args.uniform]

    run("bf16", "bf16", None)
    if not args.skip_untuned:
        if not args.skip_rtn:
            for b, plan in uniform.items():
                run(f"uniform rtn {b}-bit", "uniform rtn (context)", plan, "rtn")
        for b in plain_uniform:
            run(f"uniform gptq {b}-bit", "uniform gptq", uniform[b])
        for avg, by in plans.items():
            for what, plan in by.items():
                try:
                    run(f"{what} gptq {avg}", "random" if what.startswith("random") else what, plan, budget=avg)
                except Exception as exc:  # reported, then left out
                    failure(f"{what} gptq {avg}", exc)
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    only = {x.strip() for x in args.post_rows.split(",") if x.strip()}
    posts = [p for p in posts if p != "tune" or args.tune_steps]
    budgets = list(plans)
    variants = [w for w in plans[budgets[0]] if w.startswith("ours[")]
    # in order of what the decisions need most: at the lowest budget ours, popularity-only and the variants, then
    # the uniform 3- and 2-bit references, then the same at the other budgets, then random seeds and the rest
    order = []
    for i, a in enumerate(budgets):
        order += [(f"ours gptq {a}", "ours", plans[a]["ours"], a),
                  (f"popularity-only gptq {a}", "popularity-only", plans[a]["popularity-only"], a)]
        order += [(f"{w} gptq {a}", w, plans[a][w], a) for w in variants if w in plans[a]]
        if i == 0:
            order += [("uniform gptq 3-bit", "uniform gptq", uniform[3], None),
                      ("uniform gptq 2-bit", "uniform gptq", uniform[2], None)]
    order += [(f"random s{s} gptq {a}", "random", plans[a][f"random s{s}"], a)
              for s in range(args.random_seeds) for a in budgets]
    order += [("uniform gptq 4-bit", "uniform gptq", uniform[4], None)] if 4 in uniform else []
    failed: set[str] = set()
    for label, family, plan, avg in order:
        if args.deadline_s is not None and time.time() - t0 > args.deadline_s:
            print(f"{name}: deadline reached; post-quantization rows from {label!r} on not run", flush=True)
            break
        for post in posts:
            if label in skip or f"{label} + {post}" in skip or post in failed or (only and label not in only):
                continue
            try:
                run(label, family, plan, post=post, **({"budget": avg} if avg else {}))
            except Exception as exc:  # one broken step must not lose the other steps' rows: reported, then skipped
                failed.add(post)
                failure(f"{label} + {post}", exc)
    write(rows, tuned, info, Path(args.out), name, time.time() - t0, final=True)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def write(rows: list[dict], tuned: list[dict], info: dict, out: Path, name: str, seconds: float,
          final: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ov = info["overlap"]
    head = [f"## {name}", "",
            f"({seconds:.0f}s on {info['device']}; calib {info['args']['calib_samples']} x {info['args']['seq_len']}, "
            f"eval {info['args']['eval_samples']} x {info['args']['seq_len']} tokens, group "
            f"{info['args']['group_size']}, tuning {info['args']['tune_steps']} steps"
            f"{'' if final else '; PARTIAL: still running'})",
            f"Evaluation text: eval.jsonl.gz {'with' if info['args']['keep_overlap'] else 'without'} its overlap with "
            f"calib.jsonl.gz ({ov['identical_documents']} identical documents, {ov['overlapping_lines']} of "
            f"{ov['long_lines']} lines of >= {ov['min_chars']} chars).", *([info["note"]] if info.get("note") else []),
            ""]
    tuning = [step_line(t) for t in tuned]
    text = "\n".join(head + table(rows) + [""] + goals(rows) + [""] + tuning)
    (out / f"quality_{name}.md").write_text(text + "\n")
    (out / f"quality_{name}.json").write_text(json.dumps({**info, "seconds": seconds, "final": final, "rows": rows,
                                                          "tuning": tuned}, indent=1))
    if final:
        try:
            plot(rows, out / f"quality_{name}.png", name)
        except ImportError as e:  # a machine without matplotlib still gets the table
            print(f"no plot: {e}", flush=True)
        print(text, flush=True)


def step_line(t: dict) -> str:
    """One line per post-quantization step run: its held-out check."""
    step = t.get("step", "tune")
    if step == "tune":
        return (f"- tune of {t['method']}: held-out calibration KL {t['holdout_kl_before']:.4f} -> "
                f"{t['holdout_kl_after']:.4f} ({'kept' if t['kept'] else 'not kept'})")
    key = "kl" if step == "router" else "err"
    per = ", ".join(f"{x[f'holdout_{key}_before']:.4g}->{x[f'holdout_{key}_after']:.4g}{'' if x['kept'] else ' (not kept)'}"
                    for x in t["layers"])
    what = "routing KL" if step == "router" else "output error"
    return f"- {step} of {t['method']}: held-out {what} per MoE layer {per}"


def _post(r: dict) -> str:
    """The row's post-quantization steps ('' none); rows of older runs have only `tuned`."""
    return r.get("post", "tune" if r["tuned"] else "")


def _find(rows: list[dict], method: str, post: str) -> dict | None:
    return next((r for r in rows if r["method"] == method + (f" + {post}" if post else "")), None)


def with_random_means(rows: list[dict]) -> list[dict]:
    """`rows` plus, after the last seed of each (budget, tuning), a row with the mean ppl and KL of the random seeds."""
    out, seen = [], {}
    for r in rows:
        out.append(r)
        if r["family"] == "random":
            seen.setdefault((r["budget"], _post(r)), []).append(r)
    for (budget, post), rs in seen.items():
        last = max(out.index(r) for r in rs)
        mean = {**rs[0], "method": f"random gptq {budget} (mean of {len(rs)})" + (f" + {post}" if post else ""),
                "ppl": sum(r["ppl"] for r in rs) / len(rs), "kl": sum(r["kl"] for r in rs) / len(rs),
                "family": "random mean", "seeds": len(rs)}
        out.insert(last + 1, mean)
    return out


def _display_order(r: dict) -> tuple:
    """bf16, uniform RTN, uniform GPTQ (untuned, tuned), then per budget: untuned, tuned; ours first."""
    fam = r["family"]
    if fam == "bf16":
        return (0,)
    if fam.startswith("uniform"):
        return (1 if "rtn" in fam else 2, _post(r), r["avg_bits"])
    rank = 0 if fam == "ours" else 1 if fam.startswith("ours[") else 2 if fam == "popularity-only" else \
        3 if fam == "random" else 4
    return (3, r.get("budget", r["avg_bits"]), _post(r), rank, r["method"])


def table(rows: list[dict]) -> list[str]:
    """Markdown rows; in each group of equal bytes and equal tuning (RTN context rows and single random seeds
    aside), the lowest perplexity is bold, and only where it is strictly the lowest."""
    rows = sorted(with_random_means(rows), key=_display_order)
    base = rows[0]["ppl"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["family"] not in ("bf16", "random", "uniform rtn (context)"):
            groups.setdefault((round(r["avg_bits"], 3), _post(r)), []).append(r)
    bold = set()
    for rs in groups.values():
        ranked = sorted(rs, key=lambda r: r["ppl"])
        if len(ranked) > 1 and ranked[0]["ppl"] < ranked[1]["ppl"]:
            bold.add(id(ranked[0]))
    lines = ["| method | post-quantization | avg bits | stored bits | expert MiB | attention MiB | ppl | Δppl | KL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = (lambda x: f"**{x}**") if id(r) in bold else (lambda x: x)
        lines.append(f"| {b(r['method'])} | {_post(r) or '-'} | {r['avg_bits']:.3f} | "
                     f"{r['stored_bits']:.3f} | {r['expert_bytes'] / 2**20:.3f} | "
                     f"{format(r['dense_bytes'] / 2**20, '.3f') if 'dense_bytes' in r else '-'} | {b(format(r['ppl'], '.3f'))} | "
                     f"{b(format(r['ppl'] - base, '+.3f'))} | {(r['kl'] or 0):.4f} |")
    return lines


def goals(rows: list[dict], low: float = 2.5, high: float = 3.0) -> list[str]:
    """The issue's goals, each checked for every set of post-quantization steps (ours against baselines with the
    same steps)."""
    base = _find(rows, "bf16", "")["ppl"]
    out = []
    for tuned in dict.fromkeys(_post(r) for r in rows):
        tag = "with tuning" if tuned == "tune" else f"with {tuned}" if tuned else "without tuning"
        ours, ours_hi = _find(rows, f"ours gptq {low}", tuned), _find(rows, f"ours gptq {high}", tuned)
        pop = _find(rows, f"popularity-only gptq {low}", tuned)
        u2, u3 = _find(rows, "uniform gptq 2-bit", tuned), _find(rows, "uniform gptq 3-bit", tuned)
        if ours and pop:
            ratio = (ours["ppl"] - base) / (pop["ppl"] - base)
            out.append(f"- {tag}: ours@{low} Δppl / popularity-only@{low} Δppl = {ratio:.3f} (goal <= 0.75): "
                       f"{'MET' if ratio <= 0.75 else 'MISSED'}")
        if ours and u2 and u3:
            x = ours["avg_bits"]
            line = u2["ppl"] + (u3["ppl"] - u2["ppl"]) * (x - u2["avg_bits"]) / (u3["avg_bits"] - u2["avg_bits"])
            ratio = (ours["ppl"] - base) / (line - base)
            out.append(f"- {tag}: ours@{low} Δppl / Δppl of the uniform GPTQ 2-3-bit line at {x:.2f} bits "
                       f"({line:.3f}) = {ratio:.3f} (goal <= 0.5): {'MET' if ratio <= 0.5 else 'MISSED'}")
        if ours_hi and u3:
            out.append(f"- {tag}: ours@{high} ppl {ours_hi['ppl']:.3f} vs uniform GPTQ 3-bit {u3['ppl']:.3f} "
                       f"(goal: lower): {'MET' if ours_hi['ppl'] < u3['ppl'] else 'MISSED'}")
        if ours and u3:
            fewer = 1 - ours["expert_bytes"] / u3["expert_bytes"]
            out.append(f"- {tag}: ours@{low} ppl {ours['ppl']:.3f} vs uniform GPTQ 3-bit {u3['ppl']:.3f} "
                       f"(goal: as good, with {fewer:.0%} fewer expert bytes): "
                       f"{'MET' if ours['ppl'] <= u3['ppl'] else 'MISSED'}")
        for avg in (low, high):  # each lever against ours with the same post step (dense: the same TOTAL bytes)
            mine = _find(rows, f"ours gptq {avg}", tuned)
            for r in rows:
                if mine and _post(r) == tuned and r["family"].startswith("ours[") and r.get("budget") == avg:
                    out.append(f"- {tag}: {r['method']} Δppl {r['ppl'] - base:+.3f} vs ours {mine['ppl'] - base:+.3f} "
                               f"(x{(r['ppl'] - base) / (mine['ppl'] - base):.3f})")
        for what, avg in ((w, a) for a in (low, high) for w in ("ours", "popularity-only", "uniform")):
            label = f"{what} gptq {avg}" if what != "uniform" else f"uniform gptq {int(avg)}-bit"
            mine, plain = _find(rows, label, tuned), _find(rows, label, "")
            if tuned and mine and plain and (what != "uniform" or avg == int(avg)):
                out.append(f"- {tag}: {label} Δppl {mine['ppl'] - base:+.3f} vs {plain['ppl'] - base:+.3f} without it "
                           f"(x{(mine['ppl'] - base) / (plain['ppl'] - base):.3f})")
    return out


def plot(rows: list[dict], path: Path, name: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    families = {}
    for r in rows:
        if r["family"] != "bf16":
            families.setdefault(r["family"] + (f" + {_post(r)}" if _post(r) else ""), []).append(r)
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r["avg_bits"])
        ax.plot([r["avg_bits"] for r in rs], [r["ppl"] for r in rs], "o-" if "uniform" in fam else "x", label=fam)
    ax.axhline(rows[0]["ppl"], color="k", ls="--", lw=1, label="bf16")
    ax.set_xlabel("average bits per routed-expert weight (nominal; equal bits = equal bytes)")
    ax.set_ylabel("perplexity (eval split without calibration overlap)")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    ax.set_title(f"{name}: perplexity vs bits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
