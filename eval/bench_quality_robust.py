"""Costs that carry to new text (issue 13, session 26): per-domain costs, shrinkage toward popularity and a tempered
routing share, chosen by leave-one-domain-out on calibration text only (moecompress/allocate/robust.py).

Protocol (a CPU screen like eval/bench_quality_groups.py): calibration --calib-samples x --seq-len of calib.jsonl.gz
(9 domains, sequences round-robin over them), every expert projection GPTQ + clipping search at 2/3/4/8 bits, group 64;
the default "ours" costs (loss-aware, per projection, on the GPTQ weights) measured on the last 25 % of the sequences
(the product's holdout); the per-domain costs measured on all calibration sequences, split by domain. Then:

- `leave_one_domain_out` over the grid --kappas x --taus at both budgets picks (kappa, tau); nothing of the
  evaluation text is used for a choice;
- rows at each budget: popularity-only (token share x 4^-bits), ours (default holdout costs), ours pooled (all
  calibration sequences, kappa 0, tau 1), ours robust (the picked kappa, tau), popularity with the measured group
  curves (kappa inf, tau 1), the same two on cross-fitted costs (GPTQ on one half of each domain's sequences, costs
  measured on the other half, and vice versa; its own leave-one-domain-out pick), and ours worst-domain (the group-DRO
  weighting of the per-domain costs, allocate/robust.py), all with the same GPTQ weights, in the same stored bytes;
- evaluation: --eval-samples x --seq-len of eval.jsonl.gz without the calibration overlap: ppl and KL to bf16.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python eval/bench_quality_robust.py --model ../shared/models/refmoe-qwen3
    .venv/bin/python eval/bench_quality_robust.py --summarize 0,1,2   # mean ratios over --calib-seed runs
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))

from bench_quality import fake_quantized, machine, popularity_costs  # noqa: E402
from bench_quality_groups import BITS, RULES, cost_table, quantize_at, screen_parser  # noqa: E402
from moecompress.allocate import Budget, allocate  # noqa: E402
from moecompress.allocate.robust import DomainCosts, estimate, leave_one_domain_out, worst_domain_costs  # noqa: E402
from moecompress.arch.adapters import describe, proj_weights  # noqa: E402
from moecompress.artifacts.cost_table import CostItem, CostTable  # noqa: E402
from moecompress.artifacts.quantized import QuantizedTensors, expert_key  # noqa: E402
from moecompress.calibrate.dataset import CalibrationData, build_calibration_data  # noqa: E402
from moecompress.calibrate.options import CalibrationOptions  # noqa: E402
from moecompress.calibrate.run import calibrate  # noqa: E402
from moecompress.evaluate import evaluate, prepare_eval_data  # noqa: E402
from moecompress.sensitivity.capture import LayerCapture  # noqa: E402
from moecompress.sensitivity.deltas import QuantizerSettings  # noqa: E402
from moecompress.sensitivity.loss_aware import capture_with_grads  # noqa: E402
from moecompress.sensitivity.measured import captured_costs  # noqa: E402

INF = math.inf


def subset(captures: list[LayerCapture], sel: torch.Tensor) -> list[LayerCapture]:
    """The captured rows of the tokens `sel` ([T] bool)."""
    return [LayerCapture(c.hidden[sel], c.top_k_index[sel], c.top_k_weights[sel], c.grad[sel]) for c in captures]


def with_damage(table: CostTable, damage: np.ndarray, method: str) -> CostTable:
    """`table` with its candidate columns (BITS) replaced by `damage` [n, len(BITS)]; 16 bits stays 0."""
    items = []
    for it, row in zip(table.items, damage):
        by = dict(zip(BITS, row.tolist()))
        items.append(CostItem(it.kind, it.path, it.proj, it.expert, it.layer, it.numel, it.bits,
                              tuple(by.get(b, 0.0) for b in it.bits), it.bytes))
    return CostTable(table.group_size, table.symmetric, method, tuple(items))


def measure_domains(domain_costs, data, model, tokenizer, layout, args, dom_of, seq_of, quantized):
    """(measured, cross-fitted) DomainCosts. Cross-fitting: two folds (each domain's first / second half of its
    sequences); GPTQ on one fold, costs measured on the other, so each token's cost is that of weights fitted
    without it (the deployed weights are fitted on all)."""
    dc = domain_costs(lambda d: [(dom_of == d, quantized)])
    rank = torch.zeros(args.calib_samples, dtype=torch.int64)
    for d in range(len(data.domains)):
        idx = (data.domain_ids == d).nonzero().flatten()
        rank[idx] = (torch.arange(len(idx)) >= len(idx) // 2).long()
    fold_q = []
    for f in (0, 1):
        keep = rank == f
        part = CalibrationData(data.input_ids[keep], data.attention_mask[keep], data.domain_ids[keep], data.domains)
        st = calibrate(model, tokenizer, part, CalibrationOptions(samples=int(keep.sum()), seq_len=args.seq_len,
                                                                  all_experts=True, progress=False, device="cpu"))
        fold_q.append(quantize_at(model, layout, st, 64, "cpu"))
    fold_of = rank[seq_of]  # [T]
    dcx = domain_costs(lambda d: [((dom_of == d) & (fold_of == f), fold_q[1 - f]) for f in (0, 1)])
    return dc, dcx


def main() -> None:
    ap = screen_parser(__doc__)
    ap.add_argument("--budgets", default="2.5,3.0")
    ap.add_argument("--kappas", default="0,10,30,100,300,1000,3000,10000,inf", help="shrinkage, routed pseudo-rows")
    ap.add_argument("--taus", default="1,0.8,0.6,0.4,0.2,0", help="routing-share temperature")
    ap.add_argument("--suffix", default="_s26")
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    ap.add_argument("--dump", help="also save the per-domain costs (DomainCosts arrays) and byte options to this .npz")
    ap.add_argument("--from-dump", help="take the per-domain costs from this --dump file of a run with the same "
                                        "model, seed and settings instead of measuring them")
    ap.add_argument("--rows", default="", help="evaluate only the rows matching this regex (and popularity-only)")
    ap.add_argument("--summarize", help="comma-separated seeds: only write the mean over those seeds' result files")
    args = ap.parse_args()
    if args.summarize:
        return summarize(Path(args.out), [int(s) for s in args.summarize.split(",")], args.suffix)
    name = args.name or Path(args.model).name
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    layout = describe(model)
    data = build_calibration_data(args.calib, tokenizer, args.calib_samples, args.seq_len, seed=args.calib_seed)
    stats = calibrate(model, tokenizer, data, CalibrationOptions(samples=args.calib_samples, seq_len=args.seq_len,
                                                                 all_experts=True, progress=False, device="cpu"))
    batches = list(data.batches(8))
    quantized = quantize_at(model, layout, stats, 64, "cpu")
    print(f"{name}: calibrated and quantized in {time.time() - t0:.0f}s", flush=True)

    captures, _ = capture_with_grads(model, layout, [(i, m) for i, m, _ in batches], progress=False)
    # token -> (sequence, domain) in the captures' order (kept tokens, batch order)
    seq_of = torch.cat([torch.arange(s, s + m.shape[0]).repeat_interleave(m.sum(1)) for s, (_, m, _) in
                        zip(range(0, args.calib_samples, 8), batches)])  # [T]
    dom_of = data.domain_ids[seq_of]  # [T]

    def exact_of(q: dict):
        def exact(moe, proj: str, bits: int) -> torch.Tensor:
            w = proj_weights(model.get_submodule(moe.experts_path), moe, proj).detach().to(torch.float32).clone()
            for e in range(moe.num_experts):
                key = expert_key(moe.experts_path, proj, e)
                if key in q[bits].weights:
                    w[e] = q[bits].weights[key].dequantize(torch.float32)
            return w
        return exact

    def costs_on(sel: torch.Tensor, q: dict) -> CostTable:
        """Loss-aware costs of the GPTQ weights `q` (bits -> QuantizedTensors) on the captured tokens `sel`."""
        damage = captured_costs(model, layout, subset(captures, sel), int(sel.sum()), BITS + (16,),
                                QuantizerSettings(group_size=64), "projection", stats, fisher=True, progress=False,
                                weights=exact_of(q))
        return cost_table(layout, damage, 64, "loss_aware exact g64")

    holdout = seq_of >= args.calib_samples - math.ceil(0.25 * args.calib_samples)
    ours = costs_on(holdout, quantized)  # the product's default: the last 25 % of the sequences
    groups = {(it.layer, it.proj) for it in ours.items}
    gid = {g: i for i, g in enumerate(sorted(groups))}
    items = ours.items
    cols = [[it.bits.index(b) for b in BITS] for it in items]

    def domain_costs(parts) -> DomainCosts:
        """parts(d) -> [(token selection, GPTQ weights)]: the damage of domain d summed over its parts."""
        damage, rows, tokens = [], [], []
        for d in range(len(data.domains)):
            sel = dom_of == d
            total = np.zeros((len(items), len(BITS)))
            for part, q in parts(d):
                t = costs_on(part, q)
                total += np.array([[it.damage[c] * float(part.sum()) for c in cc] for it, cc in zip(t.items, cols)])
            damage.append(total)
            counts = {m.layer: torch.bincount(captures[m.layer].top_k_index[sel].reshape(-1).clamp(0, m.num_experts),
                                              minlength=m.num_experts + 1) for m in layout.moe_layers}
            rows.append([float(counts[it.layer][it.expert]) for it in items])
            tokens.append(float(sel.sum()))
        return DomainCosts(tuple(data.domains), BITS, np.array([gid[(it.layer, it.proj)] for it in items]),
                           np.array(damage), np.array(rows), np.array(tokens))

    if args.from_dump:  # the per-domain costs of an earlier run with the same settings (skips their measurement)
        f = np.load(args.from_dump)
        if tuple(f["domains"]) != tuple(data.domains) or f["damage"].shape[1] != len(items):
            raise SystemExit(f"{args.from_dump} does not match this model and calibration data")
        dc = DomainCosts(tuple(data.domains), BITS, f["group"], f["damage"], f["rows"], f["tokens"])
        dcx = DomainCosts(tuple(data.domains), BITS, f["group"], f["damage_crossfit"], f["rows"], f["tokens"])
    else:
        dc, dcx = measure_domains(domain_costs, data, model, tokenizer, layout, args, dom_of, seq_of, quantized)
    print(f"{name}: per-domain costs (measured, cross-fitted) ready at {time.time() - t0:.0f}s; tokens per domain "
          + ", ".join(f"{d} {int(n)}" for d, n in zip(dc.domains, dc.tokens)), flush=True)

    budgets = [float(x) for x in args.budgets.split(",")]
    nbytes = np.array([[it.bytes[c] for c in cc] for it, cc in zip(items, cols)], dtype=np.int64)
    if args.dump and not args.from_dump:
        np.savez(args.dump, domains=np.array(dc.domains), bits=np.array(BITS), group=dc.group, damage=dc.damage,
                 rows=dc.rows, tokens=dc.tokens, damage_crossfit=dcx.damage, nbytes=nbytes,
                 layer=np.array([it.layer for it in items]), expert=np.array([it.expert for it in items]))
    budget_bytes = [allocate(ours, Budget(avg_bits=a), RULES).budget_bytes for a in budgets]
    kappas = [float(k) for k in args.kappas.split(",")]
    taus = [float(t) for t in args.taus.split(",")]
    val = leave_one_domain_out(dc, nbytes, budget_bytes, kappas, taus)
    valx = leave_one_domain_out(dcx, nbytes, budget_bytes, kappas, taus)
    kb, tb = val.best
    kx, tx = valx.best
    for label, v in (("measured", val), ("cross-fitted", valx)):
        print(f"{name}: {label} costs: leave-one-domain-out picks kappa {v.best[0]:g}, tau {v.best[1]:g}; score "
              f"{math.exp(v.scores[v.best]):.4f} vs pooled {math.exp(v.scores[(0.0, 1.0)]):.4f}", flush=True)

    tables = {"popularity-only": popularity_costs(ours, stats), "ours": ours,
              "ours pooled": with_damage(ours, estimate(dc), "pooled"),
              f"ours robust (kappa {kb:g}, tau {tb:g})": with_damage(ours, estimate(dc, kb, tb), "robust"),
              "popularity x group curve": with_damage(ours, estimate(dc, INF, 1.0), "group curve"),
              "ours cross-fitted pooled": with_damage(ours, estimate(dcx), "cross-fitted"),
              f"ours cross-fitted robust (kappa {kx:g}, tau {tx:g})": with_damage(ours, estimate(dcx, kx, tx),
                                                                                   "cross-fitted robust")}
    plans = {}
    for avg, nb in zip(budgets, budget_bytes):
        for label, table in tables.items():
            a = allocate(table, Budget(avg_bits=avg), RULES)
            plans[f"{label} {avg}"] = {it.key: b for it, b in zip(a.items, a.bits)}
        ref = np.array([BITS.index(plans[f"popularity-only {avg}"][it.key]) for it in items])
        worst, weights = worst_domain_costs(dc, ref, nbytes, nb)
        a = allocate(with_damage(ours, worst, "worst domain"), Budget(avg_bits=avg), RULES)
        plans[f"ours worst-domain {avg}"] = {it.key: b for it, b in zip(a.items, a.bits)}
        print(f"{name}: {avg} bits: worst-domain weights " + ", ".join(
            f"{d} {w:.3f}" for d, w in zip(dc.domains, weights)), flush=True)
    plans = {k: v for k, v in plans.items() if re.search(args.rows, k) or k.startswith("popularity-only")}
    for b in (2, 3):
        plans[f"uniform {b}-bit"] = {it.key: b for it in items}

    eval_data, overlap = prepare_eval_data(args.eval, tokenizer, args.eval_samples, args.seq_len, seed=1,
                                           calibration=args.calib)
    pooled = {it.key: it for it in tables["ours pooled"].items}
    honest = {it.key: it for it in tables["ours cross-fitted pooled"].items}
    r = evaluate(model, tokenizer, eval_data, method="bf16", family="bf16", progress=False)
    out_rows = [{"method": "bf16", "ppl": r.perplexity, "kl": 0.0,
                 "domains": {d.name: [d.nll, d.kl, d.tokens] for d in r.domains}}]
    for label, plan in plans.items():
        weights = {expert_key(it.path, it.proj, it.expert): quantized[plan[it.key]].weights[
            expert_key(it.path, it.proj, it.expert)] for it in items}
        m = fake_quantized(model, layout, QuantizedTensors(weights=weights, fallbacks={}))
        r = evaluate(m, tokenizer, eval_data, reference_model=model, method=label, family=label, progress=False)
        hist = {b: list(plan.values()).count(b) for b in BITS}
        pred = sum(pooled[k].damage[pooled[k].bits.index(b)] for k, b in plan.items())
        predx = sum(honest[k].damage[honest[k].bits.index(b)] for k, b in plan.items())
        out_rows.append({"method": label, "ppl": r.perplexity, "kl": r.kl, "predicted_pooled": pred,
                         "predicted_crossfit": predx, "histogram": hist,
                         "domains": {d.name: [d.nll, d.kl, d.tokens] for d in r.domains}})
        print(f"{name} {label:40s} ppl {r.perplexity:8.3f} Δ {r.perplexity - out_rows[0]['ppl']:+.3f} kl {r.kl:.4f} "
              f"{hist}", flush=True)
        del m
    write(out_rows, {"measured": (val, dc), "cross-fitted": (valx, dcx)}, args, name, time.time() - t0,
          overlap.describe(), budgets)


def write(rows, vals: dict, args, name, seconds, overlap, budgets) -> None:
    """vals: label -> (Validation, DomainCosts) of the leave-one-domain-out runs."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = ("OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python eval/bench_quality_robust.py "
           + " ".join(sys.argv[1:]).replace(str(ROOT.parent), ".."))
    base = rows[0]["ppl"]
    lines = [f"## {name}: costs that carry to new text (screen, session 26)", "", f"`{cmd}`", "",
             f"({seconds:.0f}s on {machine('cpu')}; calib {args.calib_samples} x {args.seq_len} (seed "
             f"{args.calib_seed}), eval {args.eval_samples} x {args.seq_len}; GPTQ + clipping search, group 64; "
             f"{overlap})", "",
             "| method | ppl | Δppl | KL | predicted (measured costs) | predicted (cross-fitted costs) | "
             "items at 2/3/4/8 bits |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r.get("histogram", {})
        lines.append(f"| {r['method']} | {r['ppl']:.3f} | {r['ppl'] - base:+.3f} | {r['kl']:.4f} | "
                     f"{format(r['predicted_pooled'], '.4g') if 'predicted_pooled' in r else '-'} | "
                     f"{format(r['predicted_crossfit'], '.4g') if 'predicted_crossfit' in r else '-'} | "
                     f"{'/'.join(str(h.get(b, 0)) for b in BITS) if h else '-'} |")
    find = {r["method"]: r for r in rows}
    lines.append("")
    for avg in budgets:
        pop = find[f"popularity-only {avg}"]
        for r in rows:
            if r["method"].endswith(f" {avg}") and r is not pop:
                lines.append(f"- {avg} bits: {r['method'][:-len(str(avg)) - 1]} / popularity-only: Δppl "
                             f"{(r['ppl'] - base) / (pop['ppl'] - base):.3f}, KL {r['kl'] / pop['kl']:.3f}, predicted "
                             f"{r['predicted_pooled'] / pop['predicted_pooled']:.3f} (measured) / "
                             f"{r['predicted_crossfit'] / pop['predicted_crossfit']:.3f} (cross-fitted)")
    for label, (val, dc) in vals.items():
        taus = sorted({k[1] for k in val.scores}, reverse=True)
        lines += ["", f"Leave-one-domain-out, {label} costs (the held-out domain's {label} cost of the plan over the "
                  f"popularity-only plan's, geometric mean over {len(dc.domains)} domains x budgets {budgets}); "
                  f"picked kappa {val.best[0]:g}, tau {val.best[1]:g}:", "",
                  "| kappa \\ tau | " + " | ".join(f"{t:g}" for t in taus) + " |", "|---" * (1 + len(taus)) + "|"]
        for k in sorted({k[0] for k in val.scores}):
            lines.append(f"| {k:g} | " + " | ".join(f"{math.exp(val.scores[(k, t)]):.3f}" for t in taus) + " |")
        lines += ["", "Per held-out domain (kappa 0 tau 1 / picked): " + ", ".join(
            f"{d} {a:.3f}/{b:.3f}"
            for d, a, b in zip(dc.domains, val.per_domain[(0.0, 1.0)], val.per_domain[val.best]))]
    text = "\n".join(lines)
    stem = f"quality_robust_{name}{'' if args.calib_seed == 0 else f'_seed{args.calib_seed}'}{args.suffix}"
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(
        {"command": cmd, "rows": rows, "args": vars(args), "seconds": seconds,
         **{label: {"lodo": {f"{k[0]:g},{k[1]:g}": v for k, v in val.scores.items()},
                    "lodo_per_domain": {f"{k[0]:g},{k[1]:g}": v for k, v in val.per_domain.items()},
                    "best": list(val.best), "domains": list(dc.domains), "tokens": dc.tokens.tolist()}
            for label, (val, dc) in vals.items()}}, indent=1))
    print(text, flush=True)


def family(method: str) -> str:
    """A row's label without its picked (kappa, tau), which may differ between calibration seeds."""
    return re.sub(r" \(kappa [^)]*\)", " (picked)", method)


def summarize(out: Path, seeds: list[int], suffix: str) -> None:
    """quality_robust_s26.md/json: per model, budget and row, Δppl and KL over popularity-only's, per seed and mean."""
    lines = ["## Costs that carry to new text: ratios to popularity-only over calibration seeds (session 26)", "",
             f"`.venv/bin/python eval/bench_quality_robust.py --summarize {','.join(map(str, seeds))}` over "
             f"quality_robust_<model>[_seed<s>]{suffix}.json", ""]
    summary = {}
    for path in sorted(out.glob(f"quality_robust_*{suffix}.json")):
        if "_seed" in path.stem:
            continue
        name = path.stem[len("quality_robust_"):-len(suffix)]
        runs = {}
        for s in seeds:
            p = path if s == 0 else out / f"quality_robust_{name}_seed{s}{suffix}.json"
            if p.exists():
                runs[s] = json.loads(p.read_text())
        if not runs:
            continue
        lines += [f"### {name} (seeds {', '.join(map(str, runs))})", "",
                  "| row | budget | Δppl ratio per seed | mean | KL ratio per seed | mean | picked (kappa, tau) |",
                  "|---|---|---|---|---|---|---|"]
        table = {}
        for s, run in runs.items():
            base = run["rows"][0]["ppl"]
            rows = {r["method"]: r for r in run["rows"]}
            for m, r in rows.items():
                budget = m.rsplit(" ", 1)[-1]
                pop = rows.get(f"popularity-only {budget}")
                if pop is None or r is pop:
                    continue
                key = (family(m.rsplit(" ", 1)[0]), budget)
                picked = m[m.index("(kappa"):m.index(")") + 1] if "(kappa" in m else ""
                table.setdefault(key, []).append(((r["ppl"] - base) / (pop["ppl"] - base), r["kl"] / pop["kl"],
                                                  picked))
        for (row, budget), vals in table.items():
            d, k, picked = zip(*vals)
            lines.append(f"| {row} | {budget} | {' / '.join(f'{x:.3f}' for x in d)} | {sum(d) / len(d):.3f} | "
                         f"{' / '.join(f'{x:.3f}' for x in k)} | {sum(k) / len(k):.3f} | {' / '.join(picked)} |")
        summary[name] = {f"{row} {budget}": vals for (row, budget), vals in table.items()}
        lines.append("")
    (out / f"quality_robust{suffix}.md").write_text("\n".join(lines) + "\n")
    (out / f"quality_robust{suffix}.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
