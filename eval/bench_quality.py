"""Quality benchmark: perplexity at equal bytes, ours vs uniform RTN/GPTQ, random and popularity-only allocations.

On the trained reference model (../shared/models/refmoe-qwen3): calibrate on calib.jsonl.gz, evaluate on the
held-out eval.jsonl.gz, group size 64. Every configuration is evaluated with its dequantized weights written into
the float model (tests/test_format.py shows the packed runtime gives the same logits to 2e-7).

"ours" is the main job's method (recipes/refmoe-qwen3.yaml): loss-aware sensitivity, global allocation, GPTQ with
the clipping search, then scale tuning (quantize/tune.py). Rows marked "no tuning" stop before the tuning, and
"+ tune" rows apply the same tuning to uniform GPTQ, so the share of each part is visible. RTN baselines (uniform
and random) are plain min/max round-to-nearest; "rtn-mse" rows use the clipping search.

    .venv/bin/python eval/bench_quality.py            # writes eval/results/quality.{md,json} and quality_pareto.png
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
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
from moecompress.evaluate import evaluate  # noqa: E402
from moecompress.format.sizes import SCALE_BYTES, ZERO_BYTES  # noqa: E402
from moecompress.quantize.stage import QuantizeOptions, quantize_model  # noqa: E402
from moecompress.quantize.tune import TuneOptions, tune_scales  # noqa: E402
from moecompress.sensitivity import SensitivityOptions, estimate_costs  # noqa: E402


QUANTIZERS = {"rtn": QuantizeOptions(method="rtn", clip="minmax"), "rtn-mse": QuantizeOptions(method="rtn"),
              "gptq": QuantizeOptions(method="gptq")}  # the product's GPTQ: clip "mse", no act-order


def quantize_all(model, layout, stats, method: str, group_size: int) -> dict:
    """bits -> QuantizedTensors of every expert at that width. Each matrix is quantized from the original weights
    and its own Hessian, independently of the other experts' widths, so any plan is assembled from these."""
    return {b: quantize_model(model, layout, BitPlan.uniform(layout, b, group_size), stats, QUANTIZERS[method],
                              progress=False) for b in (2, 3, 4, 8)}


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
    return QuantizedTensors(weights=weights, fallbacks=fallbacks)


def fake_quantized(model, layout, quantized: QuantizedTensors):
    """A copy of `model` with every quantized expert weight replaced by its dequantized value."""
    out = copy.deepcopy(model)
    for m in layout.moe_layers:
        experts = out.get_submodule(m.experts_path)
        for p in m.projs:
            w = proj_weights(experts, m, p.name).detach().clone()
            for e in range(m.num_experts):
                key = expert_key(m.experts_path, p.name, e)
                if key in quantized.weights:
                    w[e] = quantized.weights[key].dequantize(w.dtype)
            set_proj_weights(experts, m, p.name, w)
    return out


def nominal_bits(plan: BitPlan, layout) -> float:
    num = den = 0
    for m in layout.moe_layers:
        for p in m.projs:
            n = p.in_features * p.out_features
            for b in plan.experts[m.experts_path][p.name]:
                num, den = num + b * n, den + n
    return num / den


def shuffled(plan: BitPlan, layout, seed: int) -> BitPlan:
    """The same multiset of per-expert bit-widths, assigned to experts at random (across all layers)."""
    keys = [(m.experts_path, e) for m in layout.moe_layers for e in range(m.num_experts)]
    bits = [tuple(plan.experts[p][proj][e] for proj in plan.experts[p]) for p, e in keys]
    random.Random(seed).shuffle(bits)
    experts = {m.experts_path: {p.name: [0] * m.num_experts for p in m.projs} for m in layout.moe_layers}
    for (path, e), bs in zip(keys, bits):
        for proj, b in zip(experts[path], bs):
            experts[path][proj][e] = b
    return BitPlan(plan.group_size, plan.symmetric, {p: {k: tuple(v) for k, v in d.items()} for p, d in experts.items()})


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
    ap.add_argument("--calib", default=str(ROOT.parent / "shared/data/corpus/calib.jsonl.gz"))
    ap.add_argument("--eval", default=str(ROOT.parent / "shared/data/corpus/eval.jsonl.gz"))
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--budgets", default="2.5,3.0", help="nominal average bits per routed-expert weight")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tune-steps", type=int, default=300, help="scale tuning steps of ours (0: none)")
    ap.add_argument("--variants", default="loss_aware:expert:rtn,hessian:expert:rtn",
                    help="sensitivity variants of ours, METHOD:GRANULARITY:QUANTIZER, comma-separated; the first is "
                         "'ours', the others are reported as 'ours[variant]'")
    args = ap.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    layout = describe(model)
    g = args.group_size
    stats = calibrate(model, tokenizer, args.calib, CalibrationOptions(samples=args.calib_samples, seq_len=args.seq_len,
                                                                       all_experts=True, progress=False,
                                                                       device=args.device))
    batches = [(i.to(args.device), m.to(args.device)) for i, m, _ in build_calibration_data(
        args.calib, tokenizer, args.calib_samples, args.seq_len, seed=0).batches(8)]
    costs = {}
    for variant in args.variants.split(","):
        method, granularity, quantizer = variant.split(":")
        costs[variant] = estimate_costs(model, layout, stats, SensitivityOptions(method, granularity, quantizer),
                                        candidates=(2, 3, 4, 8, 16), group_size=g, calibration_batches=batches,
                                        progress=False)
    variants = list(costs)
    cost = costs[variants[0]]
    eval_data = build_calibration_data(args.eval, tokenizer, args.eval_samples, args.seq_len, seed=1)
    quantized = {method: quantize_all(model, layout, stats, method, g) for method in QUANTIZERS}
    print(f"calibrated, costs and every expert at 2/3/4/8 bits quantized in {time.time() - t0:.0f}s", flush=True)
    tune = TuneOptions(steps=args.tune_steps)
    rows, tuned = [], []

    def run(name: str, family: str, plan: BitPlan | None, method: str, tuning: bool = False):
        t = time.time()
        q = None if plan is None else plan_tensors(layout, plan, quantized[method])
        if tuning and args.tune_steps:
            q, report = tune_scales(model, layout, q, batches, tune, progress=False)
            tuned.append({"method": name, **report})
        m = model if plan is None else fake_quantized(model, layout, q)
        r = evaluate(m, tokenizer, eval_data, reference_model=None if plan is None else model, method=name,
                     family=family, progress=False)
        bits = 16.0 if plan is None else nominal_bits(plan, layout)
        rows.append({"method": name, "family": family, "avg_bits": bits, "ppl": r.perplexity, "kl": r.kl,
                     "domains": {d.name: d.perplexity for d in r.domains}, "fallbacks": len(q.fallbacks) if q else 0})
        print(f"{name:36s} bits {bits:5.3f} ppl {r.perplexity:8.3f} kl {r.kl or 0:.4f}  ({time.time() - t:.0f}s)",
              flush=True)

    run("bf16", "bf16", None, "rtn")
    for method in QUANTIZERS:
        for b in (2, 3, 4):
            run(f"uniform {method} {b}-bit", f"uniform {method}", BitPlan.uniform(layout, b, g), method)
    for b in (2, 3):
        run(f"uniform gptq {b}-bit + tune", "uniform gptq + tune", BitPlan.uniform(layout, b, g), "gptq", True)
    meta_bits = (SCALE_BYTES + ZERO_BYTES) * 8 / g  # every candidate 2..8 stores the same scales and zeros
    rules = AllocationRules(candidates=(2, 3, 4, 8))
    for avg in (float(x) for x in args.budgets.split(",")):
        budget = Budget(avg_bits=avg + meta_bits)
        ours = to_bit_plan(allocate(cost, budget, rules), layout)
        run(f"ours gptq {avg}", "ours", ours, "gptq", True)
        run(f"ours gptq {avg} (no tuning)", "ours (no tuning)", ours, "gptq")
        for variant in variants[1:]:
            run(f"ours[{variant}] gptq {avg} (no tuning)", f"ours[{variant}] (no tuning)",
                to_bit_plan(allocate(costs[variant], budget, rules), layout), "gptq")
        run(f"ours rtn-mse {avg}", "ours rtn-mse", ours, "rtn-mse")
        popular = to_bit_plan(allocate(popularity_costs(cost, stats), budget, rules), layout)
        run(f"popularity-only gptq {avg}", "popularity-only", popular, "gptq")
        for seed in range(args.random_seeds):
            run(f"random rtn {avg} s{seed}", "random rtn", shuffled(ours, layout, seed), "rtn")
        run(f"random gptq {avg} s0", "random gptq", shuffled(ours, layout, 0), "gptq")
    write(rows, tuned, Path(args.out), args, time.time() - t0)


def write(rows: list[dict], tuned: list[dict], out: Path, args, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base = rows[0]["ppl"]
    domains = list(rows[0]["domains"])
    lines = [f"| method | avg bits | ppl | Δppl | KL | " + " | ".join(domains) + " |",
             "|---|---|---|---|---|" + "---|" * len(domains)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['avg_bits']:.3f} | {r['ppl']:.3f} | {r['ppl'] - base:+.3f} | "
                     f"{(r['kl'] or 0):.4f} | " + " | ".join(f"{r['domains'][d]:.2f}" for d in domains) + " |")
    goals = check_goals(rows, base)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    tuning = [f"- scale tuning of {t['method']}: held-out calibration KL {t['holdout_kl_before']:.4f} -> "
              f"{t['holdout_kl_after']:.4f} ({t['steps']} steps, {'kept' if t['kept'] else 'not kept'})" for t in tuned]
    text = "\n".join(lines + ["", *goals, *tuning, "",
                              f"({seconds:.0f}s on {machine}; calib {args.calib_samples}x{args.seq_len}, "
                              f"eval {args.eval_samples}x{args.seq_len} tokens, group {args.group_size})"])
    (out / "quality.md").write_text(text + "\n")
    (out / "quality.json").write_text(json.dumps({"rows": rows, "tuning": tuned}, indent=1))
    plot(rows, out / "quality_pareto.png")
    print(text)


def check_goals(rows: list[dict], base: float) -> list[str]:
    by = {r["method"]: r for r in rows}
    out = []
    ours = by.get("ours gptq 2.5")
    rnd = [r for r in rows if r["method"].startswith("random rtn 2.5")]
    if ours and rnd:
        mean_rnd = sum(r["ppl"] for r in rnd) / len(rnd) - base
        ratio = (ours["ppl"] - base) / mean_rnd
        out.append(f"- goal 1: ours@2.5 Δppl / random-RTN@2.5 Δppl = {ratio:.3f} (goal <= 0.25): "
                   f"{'MET' if ratio <= 0.25 else 'MISSED'}")
    g2, g3 = by.get("uniform gptq 2-bit"), by.get("uniform gptq 3-bit")
    if ours and g2 and g3:
        x = ours["avg_bits"]
        line = g2["ppl"] + (g3["ppl"] - g2["ppl"]) * (x - g2["avg_bits"]) / (g3["avg_bits"] - g2["avg_bits"])
        out.append(f"- goal 2: ours@2.5 ppl {ours['ppl']:.3f} vs uniform-GPTQ 2-3 bit line at {x:.3f} bits "
                   f"{line:.3f}: {'MET' if ours['ppl'] < line else 'MISSED'}")
    return out


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    families = {}
    for r in rows:
        if r["family"] != "bf16":
            families.setdefault(r["family"], []).append(r)
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r["avg_bits"])
        ax.plot([r["avg_bits"] for r in rs], [r["ppl"] for r in rs], "o-" if "uniform" in fam or fam == "ours" else "x",
                label=fam)
    ax.axhline(rows[0]["ppl"], color="k", ls="--", lw=1, label="bf16")
    ax.set_xlabel("average bits per routed-expert weight (nominal)")
    ax.set_ylabel("perplexity (eval split)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("refmoe-qwen3: perplexity vs bits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
