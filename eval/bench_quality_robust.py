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

--oracle (session 27) adds rows that are BOUNDS, NEVER METHODS: they use the evaluation text that is then scored. The
GPTQ weights stay the calibration-fitted ones; only the allocation sees the evaluation text:
- `oracle: eval-text costs`: the same costs (loss-aware, per projection, the same GPTQ weights), measured on the
  evaluation sequences themselves, allocated by the same solver in the same bytes;
- `oracle: calibration costs at the eval domain mix`: the calibration's per-domain costs re-weighted to the
  evaluation text's domain shares (allocate/robust.py `mixture`): what knowing only the mix would give;
- `oracle: popularity with eval routing`: popularity-only with the routing shares counted on the evaluation text;
- `oracle: eval-text costs, progressive`: the eval-text costs re-measured (on the evaluation text) in the model
  quantized as the oracle planned, --oracle-rounds rounds of pipeline/progressive.py (half the predicted damage
  pinned per round): what the separable costs miss of the interactions between items;
and a "predicted (eval-text costs)" column: each plan's damage under the eval-text costs, so the oracle's own cost
model says how far below popularity-only any plan can go by this measure.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python eval/bench_quality_robust.py --model ../shared/models/refmoe-qwen3
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python eval/bench_quality_robust.py --model ../shared/models/refmoe-qwen3 \
        --oracle --prefix quality_oracle --suffix _s27   # + the oracle bound rows
    .venv/bin/python eval/bench_quality_robust.py --summarize 0,1,2   # mean ratios over --calib-seed runs
"""
from __future__ import annotations

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

from bench_quality import fake_quantized, popularity_costs  # noqa: E402
from bench_quality_groups import BITS, RULES, cost_table, quantize_at, screen_parser  # noqa: E402
from quality_robust_report import family, summarize, write  # noqa: E402,F401 (family: the tests' entry)
from moecompress.allocate import Budget, allocate  # noqa: E402
from moecompress.allocate.robust import (DomainCosts, estimate, leave_one_domain_out, mixture,  # noqa: E402
                                        popularity, worst_domain_costs)
from moecompress.arch.adapters import describe, proj_weights  # noqa: E402
from moecompress.artifacts.cost_table import CostItem, CostTable  # noqa: E402
from moecompress.artifacts.quantized import QuantizedTensors, expert_key  # noqa: E402
from moecompress.calibrate.dataset import CalibrationData, build_calibration_data  # noqa: E402
from moecompress.calibrate.options import CalibrationOptions  # noqa: E402
from moecompress.calibrate.run import calibrate  # noqa: E402
from moecompress.evaluate import evaluate, prepare_eval_data  # noqa: E402
from moecompress.pipeline.progressive import ProgressiveOptions, progressive_allocation  # noqa: E402
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
    ap.add_argument("--oracle", action="store_true", help="add the oracle rows: allocations that see the evaluation "
                                                          "text (a bound, never a method; see the module doc)")
    ap.add_argument("--oracle-rounds", type=int, default=1, help="rounds of the progressive oracle row (0: none)")
    ap.add_argument("--prefix", default="quality_robust", help="result file names: PREFIX_<model>[_seed<s>]SUFFIX")
    args = ap.parse_args()
    if args.summarize:
        return summarize(Path(args.out), [int(s) for s in args.summarize.split(",")], args.suffix, args.prefix)
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
    seq_of = token_sequences(batches)  # [T]
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

    def costs_on(sel: torch.Tensor, q: dict, caps: list[LayerCapture] = captures) -> CostTable:
        """Loss-aware costs of the GPTQ weights `q` (bits -> QuantizedTensors) on the captured tokens `sel` of
        `caps` (default the calibration captures)."""
        damage = captured_costs(model, layout, subset(caps, sel), int(sel.sum()), BITS + (16,),
                                QuantizerSettings(group_size=64), "projection", stats, fisher=True, progress=False,
                                weights=exact_of(q))
        return cost_table(layout, damage, 64, "loss_aware exact g64")

    holdout = seq_of >= args.calib_samples - math.ceil(0.25 * args.calib_samples)
    ours = costs_on(holdout, quantized)  # the product's default: the last 25 % of the sequences
    groups = {(it.layer, it.proj) for it in ours.items}
    gid = {g: i for i, g in enumerate(sorted(groups))}
    items = ours.items
    cols = [[it.bits.index(b) for b in BITS] for it in items]

    def domain_costs(parts, caps: list[LayerCapture] = captures, dom: torch.Tensor = dom_of,
                     domains: tuple[str, ...] = tuple(data.domains)) -> DomainCosts:
        """parts(d) -> [(token selection, GPTQ weights)]: the damage of domain d summed over its parts; the tokens
        of `caps` (default the calibration captures) with domain ids `dom` [T] into `domains`."""
        damage, rows, tokens = [], [], []
        for d in range(len(domains)):
            sel = dom == d
            total = np.zeros((len(items), len(BITS)))
            for part, q in parts(d):
                t = costs_on(part, q, caps)
                total += np.array([[it.damage[c] * float(part.sum()) for c in cc] for it, cc in zip(t.items, cols)])
            damage.append(total)
            counts = {m.layer: torch.bincount(caps[m.layer].top_k_index[sel].reshape(-1).clamp(0, m.num_experts),
                                              minlength=m.num_experts + 1) for m in layout.moe_layers}
            rows.append([float(counts[it.layer][it.expert]) for it in items])
            tokens.append(float(sel.sum()))
        return DomainCosts(tuple(domains), BITS, np.array([gid[(it.layer, it.proj)] for it in items]),
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

    eval_data, overlap = prepare_eval_data(args.eval, tokenizer, args.eval_samples, args.seq_len, seed=1,
                                           calibration=args.calib)

    def plan_weights(plan: dict) -> QuantizedTensors:
        """The GPTQ weights of a plan (item key -> bits)."""
        keys = [(it.key, expert_key(it.path, it.proj, it.expert)) for it in items]
        return QuantizedTensors(weights={k: quantized[plan[ik]].weights[k] for ik, k in keys}, fallbacks={})

    dce = None
    if args.oracle:  # a bound: the same costs measured on the evaluation text that is then scored
        ebatches = list(eval_data.batches(8))
        epairs = [(i, m) for i, m, _ in ebatches]
        ecaps, _ = capture_with_grads(model, layout, epairs, progress=False)
        edom = eval_data.domain_ids[token_sequences(ebatches)]  # [T]
        dce = domain_costs(lambda d: [(edom == d, quantized)], ecaps, edom, tuple(eval_data.domains))
        del ecaps
        print(f"{name}: ORACLE eval-text costs ready at {time.time() - t0:.0f}s; eval tokens per domain "
              + ", ".join(f"{d} {int(n)}" for d, n in zip(dce.domains, dce.tokens)), flush=True)

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
    if dce is not None:
        tables.update(oracle_tables(ours, dc, dce, name))

    def in_context(bp) -> CostTable:
        """The eval-text costs measured in the model quantized as `bp` (BitPlan) plans (progressive oracle)."""
        m = fake_quantized(model, layout, plan_weights({it.key: bp.experts[it.path][it.proj][it.expert]
                                                        for it in items}))
        caps, n = capture_with_grads(m, layout, epairs, progress=False)
        del m
        return costs_on(torch.ones(n, dtype=torch.bool), quantized, caps)
    plans = {}
    for avg, nb in zip(budgets, budget_bytes):
        for label, table in tables.items():
            a = allocate(table, Budget(avg_bits=avg), RULES)
            plans[f"{label} {avg}"] = {it.key: b for it, b in zip(a.items, a.bits)}
        ref = np.array([BITS.index(plans[f"popularity-only {avg}"][it.key]) for it in items])
        worst, weights = worst_domain_costs(dc, ref, nbytes, nb)
        a = allocate(with_damage(ours, worst, "worst domain"), Budget(avg_bits=avg), RULES)
        plans[f"ours worst-domain {avg}"] = {it.key: b for it, b in zip(a.items, a.bits)}
        if dce is not None and args.oracle_rounds > 0:
            a, hist = progressive_allocation(tables[ORACLE], Budget(avg_bits=avg), RULES, layout, in_context,
                                             ProgressiveOptions(rounds=args.oracle_rounds))
            plans[f"oracle: eval-text costs, progressive ({args.oracle_rounds} round) {avg}"] = {
                it.key: b for it, b in zip(a.items, a.bits)}
            print(f"{name}: {avg} bits: progressive oracle " + "; ".join(
                f"round {h['round']}: {h['pinned']} pinned, damage {h['damage']:.4g}" for h in hist)
                + f" ({time.time() - t0:.0f}s)", flush=True)
        print(f"{name}: {avg} bits: worst-domain weights " + ", ".join(
            f"{d} {w:.3f}" for d, w in zip(dc.domains, weights)), flush=True)
    plans = {k: v for k, v in plans.items() if re.search(args.rows, k) or k.startswith("popularity-only")}
    for b in (2, 3):
        plans[f"uniform {b}-bit"] = {it.key: b for it in items}

    pooled = {it.key: it for it in tables["ours pooled"].items}
    oracle = {it.key: it for it in tables[ORACLE].items} if dce is not None else None
    honest = {it.key: it for it in tables["ours cross-fitted pooled"].items}
    r = evaluate(model, tokenizer, eval_data, method="bf16", family="bf16", progress=False)
    out_rows = [{"method": "bf16", "ppl": r.perplexity, "kl": 0.0,
                 "domains": {d.name: [d.nll, d.kl, d.tokens] for d in r.domains}}]
    for label, plan in plans.items():
        m = fake_quantized(model, layout, plan_weights(plan))
        r = evaluate(m, tokenizer, eval_data, reference_model=model, method=label, family=label, progress=False)
        hist = {b: list(plan.values()).count(b) for b in BITS}
        pred = sum(pooled[k].damage[pooled[k].bits.index(b)] for k, b in plan.items())
        predx = sum(honest[k].damage[honest[k].bits.index(b)] for k, b in plan.items())
        out_rows.append({"method": label, "ppl": r.perplexity, "kl": r.kl, "predicted_pooled": pred,
                         "predicted_crossfit": predx, "histogram": hist,
                         "domains": {d.name: [d.nll, d.kl, d.tokens] for d in r.domains}})
        if oracle is not None:
            out_rows[-1]["predicted_eval"] = sum(oracle[k].damage[oracle[k].bits.index(b)] for k, b in plan.items())
        print(f"{name} {label:40s} ppl {r.perplexity:8.3f} Δ {r.perplexity - out_rows[0]['ppl']:+.3f} kl {r.kl:.4f} "
              f"{hist}", flush=True)
        del m
    write(out_rows, {"measured": (val, dc), "cross-fitted": (valx, dcx)}, args, name, time.time() - t0,
          overlap.describe(), budgets, dce)


ORACLE = "oracle: eval-text costs"


def token_sequences(batches) -> torch.Tensor:
    """[T] the sequence index of every captured token, in the captures' order (kept tokens, batch order)."""
    out, s = [], 0
    for _, m, _ in batches:
        out.append(torch.arange(s, s + m.shape[0]).repeat_interleave(m.sum(1)))
        s += m.shape[0]
    return torch.cat(out)


def eval_mix(dc: DomainCosts, dce: DomainCosts) -> np.ndarray:
    """[D] the evaluation text's token share of each calibration domain (0 where the evaluation has none)."""
    missing = set(dce.domains) - set(dc.domains)
    if missing:
        raise SystemExit(f"evaluation domains {sorted(missing)} have no calibration costs: no mix oracle")
    share = dict(zip(dce.domains, dce.tokens / dce.tokens.sum()))
    return np.array([share.get(d, 0.0) for d in dc.domains])


def oracle_tables(ours: CostTable, dc: DomainCosts, dce: DomainCosts, name: str) -> dict[str, CostTable]:
    """The bound rows (module doc): they use the evaluation text, never a method."""
    mix = eval_mix(dc, dce)
    print(f"{name}: eval domain mix over the calibration domains: "
          + ", ".join(f"{d} {w:.3f}" for d, w in zip(dc.domains, mix)), flush=True)
    return {ORACLE: with_damage(ours, estimate(dce), "oracle: eval-text costs"),
            "oracle: calibration costs at the eval domain mix": with_damage(ours, mixture(dc, mix), "oracle: mix"),
            "oracle: popularity with eval routing": with_damage(ours, popularity(dce), "oracle: eval routing")}


if __name__ == "__main__":
    main()
