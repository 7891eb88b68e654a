"""The result files of eval/bench_quality_robust.py: one run's table (write) and the ratios to popularity-only over
calibration seeds (summarize), per row, budget and evaluation domain."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from bench_quality import machine
from bench_quality_groups import BITS
from moecompress.allocate.robust import DomainCosts

ROOT = Path(__file__).resolve().parents[1]


def write(rows, vals: dict, args, name, seconds, overlap, budgets, dce: DomainCosts | None = None) -> None:
    """vals: label -> (Validation, DomainCosts) of the leave-one-domain-out runs."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = ("OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python eval/bench_quality_robust.py "
           + " ".join(sys.argv[1:]).replace(str(ROOT.parent), ".."))
    base = rows[0]["ppl"]
    title = "costs that carry to new text (screen, session 26)" if dce is None else \
        "how far allocation can go: the oracle bound (screen, session 27)"
    lines = [f"## {name}: {title}", "", f"`{cmd}`", "",
             f"({seconds:.0f}s on {machine('cpu')}; calib {args.calib_samples} x {args.seq_len} (seed "
             f"{args.calib_seed}), eval {args.eval_samples} x {args.seq_len}; GPTQ + clipping search, group 64; "
             f"{overlap})", "",
             "| method | ppl | Δppl | KL | predicted (measured costs) | predicted (cross-fitted costs) | "
             "predicted (eval-text costs) | items at 2/3/4/8 bits |", "|---|---|---|---|---|---|---|---|"]
    if dce is not None:
        lines[6:6] = ["Rows named `oracle: ...` allocate with the evaluation text that is then scored: **bounds, "
                      "never methods** (the GPTQ weights are the calibration-fitted ones in every row).", ""]
    for r in rows:
        h = r.get("histogram", {})
        lines.append(f"| {r['method']} | {r['ppl']:.3f} | {r['ppl'] - base:+.3f} | {r['kl']:.4f} | "
                     f"{format(r['predicted_pooled'], '.4g') if 'predicted_pooled' in r else '-'} | "
                     f"{format(r['predicted_crossfit'], '.4g') if 'predicted_crossfit' in r else '-'} | "
                     f"{format(r['predicted_eval'], '.4g') if 'predicted_eval' in r else '-'} | "
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
                             f"{r['predicted_crossfit'] / pop['predicted_crossfit']:.3f} (cross-fitted)"
                             + (f" / {r['predicted_eval'] / pop['predicted_eval']:.3f} (eval-text)"
                                if "predicted_eval" in r else ""))
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
    stem = f"{args.prefix}_{name}{'' if args.calib_seed == 0 else f'_seed{args.calib_seed}'}{args.suffix}"
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(
        {"command": cmd, "rows": rows, "args": vars(args), "seconds": seconds,
         **{label: {"lodo": {f"{k[0]:g},{k[1]:g}": v for k, v in val.scores.items()},
                    "lodo_per_domain": {f"{k[0]:g},{k[1]:g}": v for k, v in val.per_domain.items()},
                    "best": list(val.best), "domains": list(dc.domains), "tokens": dc.tokens.tolist()}
            for label, (val, dc) in vals.items()},
         **({} if dce is None else {"eval_domains": list(dce.domains), "eval_tokens": dce.tokens.tolist()})},
        indent=1))
    print(text, flush=True)


def family(method: str) -> str:
    """A row's label without its picked (kappa, tau), which may differ between calibration seeds."""
    return re.sub(r" \(kappa [^)]*\)", " (picked)", method)


def summarize(out: Path, seeds: list[int], suffix: str, prefix: str = "quality_robust") -> None:
    """PREFIX SUFFIX.md/json: per model, budget and row, Δppl and KL over popularity-only's, per seed and mean (and
    the plan's damage under the eval-text costs over popularity-only's, where the run has the oracle rows)."""
    lines = [f"## Ratios to popularity-only over calibration seeds ({prefix}{suffix})", "",
             f"`.venv/bin/python eval/bench_quality_robust.py --summarize {','.join(map(str, seeds))} --prefix "
             f"{prefix} --suffix {suffix}` over {prefix}_<model>[_seed<s>]{suffix}.json", ""]
    summary = {}
    for path in sorted(out.glob(f"{prefix}_*{suffix}.json")):
        if "_seed" in path.stem:
            continue
        name = path.stem[len(prefix) + 1:-len(suffix)]
        runs = {}
        for s in seeds:
            p = path if s == 0 else out / f"{prefix}_{name}_seed{s}{suffix}.json"
            if p.exists():
                runs[s] = json.loads(p.read_text())
        if not runs:
            continue
        if any(r["method"].startswith("oracle") for run in runs.values() for r in run["rows"]) and \
                not any("never methods" in line for line in lines):
            lines[4:4] = ["Rows named `oracle: ...` allocate with the evaluation text that is then scored: **bounds, "
                          "never methods** (the GPTQ weights are the calibration-fitted ones in every row).", ""]
        lines += [f"### {name} (seeds {', '.join(map(str, runs))})", "",
                  "| row | budget | Δppl ratio per seed | mean | KL ratio per seed | mean | predicted on eval-text costs "
                  "per seed | picked (kappa, tau) |", "|---|---|---|---|---|---|---|---|"]
        table, per_domain, share = {}, {}, {}  # share: popularity-only's KL per domain / its mean KL / domains
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
                pe = r["predicted_eval"] / pop["predicted_eval"] if "predicted_eval" in r else None
                table.setdefault(key, []).append(((r["ppl"] - base) / (pop["ppl"] - base), r["kl"] / pop["kl"],
                                                  picked, pe))
                per_domain.setdefault(key, []).append({d: r["domains"][d][1] / pop["domains"][d][1]
                                                       for d in pop["domains"] if pop["domains"][d][1]})
                share.setdefault(budget, []).append({d: v[1] / pop["kl"] / len(pop["domains"])
                                                     for d, v in pop["domains"].items()})
        for (row, budget), vals in table.items():
            d, k, picked, pe = zip(*vals)
            lines.append(f"| {row} | {budget} | {' / '.join(f'{x:.3f}' for x in d)} | {sum(d) / len(d):.3f} | "
                         f"{' / '.join(f'{x:.3f}' for x in k)} | {sum(k) / len(k):.3f} | "
                         f"{' / '.join('-' if x is None else f'{x:.3f}' for x in pe)} | "
                         f"{' / '.join(picked) if any(picked) else '-'} |")
        summary[name] = {f"{row} {budget}": vals for (row, budget), vals in table.items()}
        doms = sorted({d for v in per_domain.values() for x in v for d in x})
        mean = {key: {d: float(np.mean([x[d] for x in v if d in x])) for d in doms} for key, v in per_domain.items()}
        lines += ["", f"Per evaluation domain: KL over popularity-only's KL on that domain (mean over seeds); first "
                  f"line: popularity-only's share of its evaluation KL per domain", "",
                  "| row | budget | " + " | ".join(doms) + " |", "|---|---" + "|---" * len(doms) + "|"]
        for budget, v in share.items():
            lines.append(f"| popularity-only: KL share | {budget} | "
                         + " | ".join(f"{np.mean([x[d] for x in v]):.2f}" for d in doms) + " |")
        for (row, budget), m in mean.items():
            lines.append(f"| {row} | {budget} | " + " | ".join(f"{m[d]:.2f}" for d in doms) + " |")
        summary[f"{name} per-domain KL ratio"] = {f"{row} {budget}": m for (row, budget), m in mean.items()}
        lines.append("")
    (out / f"{prefix}{suffix}.md").write_text("\n".join(lines) + "\n")
    (out / f"{prefix}{suffix}.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))
