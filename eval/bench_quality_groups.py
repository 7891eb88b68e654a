"""Group size as an allocation dimension at equal stored bytes (issue 13, session 25): a screen against
popularity-only with the same candidate set.

Every expert projection is quantized with the product's GPTQ + clipping search at 2/3/4/8 bits for each group size
of --groups (a group size that does not divide a projection's in_features has no option there: refmoe-olmoe's
down_proj, in_features 64, has no group 128). The costs are the default "ours" costs (loss-aware, per projection,
measured on the very GPTQ weights of each (bits, group size); one forward+backward capture shared by all group
sizes). Then, at the stored bytes of each nominal budget at group 64 (--budgets, as eval/bench_quality.py):

- `ours g64` / `popularity-only g64`: the benchmark's rows (one group size, allocate());
- `ours groups` : each item picks (bits, group size), allocate/groups.py, the scales and zero-points counted;
- `popularity-only groups`: the same candidate set, damage = token share x 4^-bits x r(bits, group), r the mean over
  all expert matrices of the round-to-nearest weight error at that group size over the one at group 64 (data-free:
  popularity-only given the group sizes, with no per-matrix knowledge);
- `ours g<G>` for each other G alone (which part of a win is just cheaper or finer metadata).

Every row's plan is also scored with ours' additive cost model ("predicted"), so the table shows how much better the
cost model thinks ours is than each baseline, next to what the evaluation says.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python eval/bench_quality_groups.py --model ../shared/models/refmoe-qwen3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))

from bench_quality import fake_quantized, machine, popularity_costs  # noqa: E402
from moecompress.allocate import AllocationRules, Budget, allocate  # noqa: E402
from moecompress.allocate.groups import allocate_groups  # noqa: E402
from moecompress.arch.adapters import describe, proj_weights  # noqa: E402
from moecompress.artifacts.bit_plan import BitPlan  # noqa: E402
from moecompress.artifacts.cost_table import CostItem, CostTable, expert_bytes  # noqa: E402
from moecompress.artifacts.quantized import QuantizedTensors, expert_key  # noqa: E402
from moecompress.calibrate.dataset import build_calibration_data  # noqa: E402
from moecompress.calibrate.options import CalibrationOptions  # noqa: E402
from moecompress.calibrate.run import calibrate  # noqa: E402
from moecompress.evaluate import evaluate, prepare_eval_data  # noqa: E402
from moecompress.evaluate.metrics import target_mask, token_kl, token_nll  # noqa: E402
from moecompress.quantize.rtn import fake_quantize  # noqa: E402
from moecompress.quantize.stage import QuantizeOptions, quantize_model  # noqa: E402
from moecompress.sensitivity.capture import holdout_batches  # noqa: E402
from moecompress.sensitivity.deltas import QuantizerSettings  # noqa: E402
from moecompress.sensitivity.loss_aware import capture_with_grads  # noqa: E402
from moecompress.sensitivity.measured import captured_costs  # noqa: E402

BITS = (2, 3, 4, 8)
RULES = AllocationRules(candidates=BITS)


def divides(p, g: int) -> bool:
    return p.in_features % g == 0


def quantize_at(model, layout, stats, g: int, device) -> dict[int, QuantizedTensors]:
    """bits -> every expert projection whose in_features `g` divides, GPTQ at that width and group size `g`."""
    out = {}
    for b in BITS:
        plan = BitPlan(g, False, {m.experts_path: {p.name: (b if divides(p, g) else 16,) * m.num_experts
                                                   for p in m.projs} for m in layout.moe_layers})
        out[b] = quantize_model(model, layout, plan, stats, QuantizeOptions(method="gptq"), progress=False,
                                device=device)
    return out


def cost_table(layout, damage: dict, g: int, method: str) -> CostTable:
    """The CostTable at group size `g` of the projection items whose in_features `g` divides."""
    items = []
    for m in layout.moe_layers:
        for p in m.projs:
            if not divides(p, g):
                continue
            for e in range(m.num_experts):
                by_bits = damage[f"{m.experts_path}.{e}.{p.name}"]
                bits = tuple(sorted(by_bits))
                items.append(CostItem("expert", m.experts_path, p.name, e, m.layer, p.in_features * p.out_features,
                                      bits, tuple(by_bits[b] for b in bits),
                                      tuple(expert_bytes(m, p.name, b, g, False) for b in bits)))
    return CostTable(g, False, method, tuple(items))


def error_ratios(model, layout, groups: list[int]) -> dict[tuple[int, int], float]:
    """(bits, g) -> mean over expert matrices of ||W - RTN_{bits,g}(W)||^2 / ||W - RTN_{bits,64}(W)||^2."""
    sums: dict[tuple[int, int], list[float]] = {}
    for m in layout.moe_layers:
        experts = model.get_submodule(m.experts_path)
        for p in m.projs:
            w = proj_weights(experts, m, p.name).detach().float()  # [E, out, in]
            ref = {b: ((w - fake_quantize(w, b, 64, False, "mse")) ** 2).sum((1, 2)) for b in BITS}
            for g in groups:
                if divides(p, g):
                    for b in BITS:
                        err = ((w - fake_quantize(w, b, g, False, "mse")) ** 2).sum((1, 2))
                        sums.setdefault((b, g), []).extend((err / ref[b]).tolist())
    return {k: sum(v) / len(v) for k, v in sums.items()}


def popularity_at(table: CostTable, stats, ratio: dict) -> CostTable:
    pop = popularity_costs(table, stats)
    items = tuple(CostItem(it.kind, it.path, it.proj, it.expert, it.layer, it.numel, it.bits,
                           tuple(d * ratio.get((b, table.group_size), 1.0) for b, d in zip(it.bits, it.damage)), it.bytes)
                  for it in pop.items)
    return CostTable(table.group_size, False, f"popularity-only x r(bits, {table.group_size})", items)


@torch.no_grad()
def holdout_metrics(model, batches, ref_logits: list | None = None) -> tuple[float, float, list]:
    """(mean next-token NLL, mean KL to `ref_logits`) per scored token on `batches` (the calibration sequences the
    costs were measured on), and the logits [B, S, V] per batch."""
    nll = kl = tokens = 0.0
    logits = []
    for i, (ids, mask) in enumerate(batches):
        out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, S, V]
        nll += float(token_nll(out, ids, mask).sum())
        kl += 0.0 if ref_logits is None else float(token_kl(ref_logits[i], out, mask).sum())
        tokens += float(target_mask(mask).sum())
        logits.append(out)
    return nll / tokens, kl / tokens, logits


def screen_parser(doc: str) -> argparse.ArgumentParser:
    """The CPU screen's arguments (model, texts, sizes, calibration seed), shared with bench_quality_robust.py."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/refmoe-qwen3"))
    ap.add_argument("--name")
    ap.add_argument("--calib", default=str(ROOT.parent / "shared/data/corpus/calib.jsonl.gz"))
    ap.add_argument("--eval", default=str(ROOT.parent / "shared/data/corpus/eval.jsonl.gz"))
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-seed", type=int, default=0, help="which calibration sequences are drawn (noise check)")
    return ap


def main() -> None:
    ap = screen_parser(__doc__)
    ap.add_argument("--groups", default="32,64,128")
    ap.add_argument("--budgets", default="2.5,3.0", help="nominal avg bits at group 64; rows get those stored bytes")
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    name = args.name or Path(args.model).name
    groups = sorted({int(g) for g in args.groups.split(",")} | {64})
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    layout = describe(model)
    data = build_calibration_data(args.calib, tokenizer, args.calib_samples, args.seq_len,
                                  seed=args.calib_seed)
    stats = calibrate(model, tokenizer, data, CalibrationOptions(samples=args.calib_samples, seq_len=args.seq_len,
                                                                 all_experts=True, progress=False, device=args.device))
    batches = [(i.to(args.device), m.to(args.device)) for i, m, _ in data.batches(8)]
    quantized = {g: quantize_at(model, layout, stats, g, args.device) for g in groups}
    print(f"{name}: calibrated and quantized at groups {groups} in {time.time() - t0:.0f}s", flush=True)

    captures, n = capture_with_grads(model, layout, holdout_batches(batches, 0.25), progress=False)
    ours = {}
    for g in groups:
        def exact(moe, proj: str, bits: int, g: int = g) -> torch.Tensor:
            w = proj_weights(model.get_submodule(moe.experts_path), moe, proj).detach().to(torch.float32).clone()
            for e in range(moe.num_experts):
                key = expert_key(moe.experts_path, proj, e)
                if key in quantized[g][bits].weights:
                    w[e] = quantized[g][bits].weights[key].dequantize(torch.float32).to(w.device)
            return w

        damage = captured_costs(model, layout, captures, n, BITS + (16,), QuantizerSettings(group_size=g),
                                "projection", stats, fisher=True, progress=False, weights=exact)
        ours[g] = cost_table(layout, damage, g, f"loss_aware exact g{g}")
    ratio = error_ratios(model, layout, groups)
    pop = {g: popularity_at(t, stats, ratio) for g, t in ours.items()}
    print(f"{name}: costs ready at {time.time() - t0:.0f}s; r(bits, g) = "
          + ", ".join(f"{b}/g{g} {r:.3f}" for (b, g), r in sorted(ratio.items())), flush=True)

    plans: dict[str, dict[str, tuple[int, int]]] = {}  # label -> item key -> (bits, group size)
    solves = {}
    ref_items = ours[64].items
    for avg in (float(x) for x in args.budgets.split(",")):
        base = allocate(ours[64], Budget(avg_bits=avg), RULES)
        budget = base.budget_bytes
        plans[f"ours g64 {avg}"] = {it.key: (b, 64) for it, b in zip(base.items, base.bits)}
        p64 = allocate(popularity_costs(ours[64], stats), Budget(avg_bits=avg), RULES)
        plans[f"popularity-only g64 {avg}"] = {it.key: (b, 64) for it, b in zip(p64.items, p64.bits)}
        for label, tables in ((f"ours groups {avg}", ours), (f"popularity-only groups {avg}", pop),
                              *((f"ours g{g} {avg}", {64: ours[64], g: ours[g]}) for g in groups
                                if g != 64 and len(groups) > 2)):  # with two sizes: = ours groups
            a = allocate_groups(tables, budget, RULES)
            if a.bytes > budget:
                raise SystemExit(f"{label}: {a.bytes} bytes over the budget {budget}")
            plans[label] = a.choice()
            solves[label] = {"solver": a.solver, "gap": a.gap, "bytes": a.bytes, "budget_bytes": budget}
        solves[f"ours g64 {avg}"] = {"solver": base.solver, "gap": base.gap, "bytes": base.bytes, "budget_bytes": budget}
    by_key128 = {it.key for it in ours[128].items} if 128 in ours else set()
    for b in (2, 3):
        plans[f"uniform g64 {b}-bit"] = {it.key: (b, 64) for it in ref_items}
    if 32 in groups:
        plans["uniform g32 2-bit"] = {it.key: (2, 32) for it in ref_items}
    if 128 in groups:  # context: equal bits, fewer metadata bytes (64 where 128 does not divide in_features)
        for b in (2, 3):
            plans[f"uniform g128 {b}-bit"] = {it.key: (b, 128 if it.key in by_key128 else 64) for it in ref_items}

    by_key = {g: {it.key: it for it in t.items} for g, t in ours.items()}

    def predicted(plan: dict) -> float:
        return sum(by_key[g][k].damage[by_key[g][k].bits.index(b)] for k, (b, g) in plan.items())

    def nbytes(plan: dict) -> int:
        return sum(by_key[g][k].bytes[by_key[g][k].bits.index(b)] for k, (b, g) in plan.items())

    numel = sum(it.numel for it in ref_items)
    eval_data, overlap = prepare_eval_data(args.eval, tokenizer, args.eval_samples, args.seq_len, seed=1,
                                           calibration=args.calib)
    rows = []
    r = evaluate(model, tokenizer, eval_data, method="bf16", family="bf16", progress=False)
    held = holdout_batches(batches, 0.25)
    nll0, _, ref_logits = holdout_metrics(model, held)
    rows.append({"method": "bf16", "ppl": r.perplexity, "kl": 0.0, "holdout_nll": nll0, "holdout_kl": 0.0})
    for label, plan in plans.items():
        weights = {}
        for it in ref_items:
            b, g = plan[it.key]
            key = expert_key(it.path, it.proj, it.expert)
            weights[key] = quantized[g][b].weights[key]
        m = fake_quantized(model, layout, QuantizedTensors(weights=weights, fallbacks={}))
        r = evaluate(m, tokenizer, eval_data, reference_model=model, method=label, family=label, progress=False)
        nll, kl, _ = holdout_metrics(m, held, ref_logits)
        hist = {}
        for b, g in plan.values():
            hist[f"{b}/g{g}"] = hist.get(f"{b}/g{g}", 0) + 1
        rows.append({"method": label, "ppl": r.perplexity, "kl": r.kl, "bytes": nbytes(plan),
                     "stored_bits": 8 * nbytes(plan) / numel, "predicted": predicted(plan), "histogram": hist,
                     "holdout_nll": nll, "holdout_kl": kl,
                     **solves.get(label, {})})
        print(f"{name} {label:32s} ppl {r.perplexity:8.3f} Δ {r.perplexity - rows[0]['ppl']:+.3f} "
              f"stored {rows[-1]['stored_bits']:.4f} predicted {rows[-1]['predicted']:.4g} holdout Δnll {nll - nll0:+.4f} "
              f"kl {kl:.4f} {hist}", flush=True)
        del m
        write(rows, ratio, Path(args.out), name, args, machine(args.device), time.time() - t0, overlap.describe(),
              final=label == list(plans)[-1])


def write(rows, ratio, out: Path, name: str, args, device: str, seconds: float, overlap: str,
          final: bool = True) -> None:
    """The table so far (rows are written as they finish; `final`: all done, also printed)."""
    out.mkdir(parents=True, exist_ok=True)
    base = rows[0]["ppl"]
    lines = [f"## {name}: group size as an allocation dimension (screen)", "",
             f"({seconds:.0f}s on {device}; calib {args.calib_samples} x {args.seq_len}, eval {args.eval_samples} x "
             f"{args.seq_len}, calibration seed {args.calib_seed}; GPTQ + clipping search; groups {args.groups}; "
             f"{overlap}{'' if final else '; PARTIAL: still running'})", "",
             "| method | stored bits | ppl | Δppl | KL | predicted damage (ours' costs) | calib holdout Δnll | "
             "calib holdout KL | (bits/group): items |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r.get('stored_bits', 16):.4f} | {r['ppl']:.3f} | {r['ppl'] - base:+.3f} | "
                     f"{r['kl']:.4f} | {format(r['predicted'], '.4g') if 'predicted' in r else '-'} | "
                     f"{format(r['holdout_nll'] - rows[0]['holdout_nll'], '+.4f') if 'holdout_nll' in r else '-'} | "
                     f"{format(r['holdout_kl'], '.4f') if 'holdout_kl' in r else '-'} | "
                     f"{', '.join(f'{k}: {v}' for k, v in sorted(r.get('histogram', {}).items()))} |")
    find = {r["method"]: r for r in rows}
    lines.append("")
    for avg in args.budgets.split(","):
        avg = str(float(avg))
        for a, b in (("ours g64", "popularity-only g64"), ("ours groups", "popularity-only groups"),
                     ("ours groups", "popularity-only g64"), ("ours groups", "ours g64")):
            x, y = find.get(f"{a} {avg}"), find.get(f"{b} {avg}")
            if x is not None and y is not None:
                held = (f"; calibration holdout KL {x['holdout_kl'] / y['holdout_kl']:.3f}"
                        if x.get("holdout_kl") and y.get("holdout_kl") else "")
                lines.append(f"- {avg} bits: {a} / {b}: Δppl {(x['ppl'] - base) / (y['ppl'] - base):.3f}, eval KL "
                             f"{x['kl'] / y['kl']:.3f}; predicted (ours' costs) {x['predicted'] / y['predicted']:.3f}"
                             + held)
    lines.append("- r(bits, group) for popularity-only groups: "
                 + ", ".join(f"{b}/g{g} {v:.3f}" for (b, g), v in sorted(ratio.items())))
    text = "\n".join(lines)
    (out / f"quality_groups_{name}.md").write_text(text + "\n")
    (out / f"quality_groups_{name}.json").write_text(json.dumps(
        {"rows": rows, "ratio": {f"{b}/g{g}": v for (b, g), v in ratio.items()}, "args": vars(args),
         "device": device, "seconds": seconds, "final": final}, indent=1))
    if final:
        print(text, flush=True)


if __name__ == "__main__":
    main()
