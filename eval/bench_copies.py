"""What the low-bit copies of the experts cost (issue 12): perplexity when EVERY expert is computed with its 2-bit
copy instead of its main copy (an upper bound of the cost of low-bit substitution on a miss), and their bytes.

For each reference model and each nominal main budget X (bits per routed-expert weight of the main copies): the real
pipeline (`moecompress quantize`, recipe below: `store: {copy_bits: 2}`, GPTQ, Hessian sensitivity per projection,
no scale tuning) with the budget avg_bits = X + the copies' own nominal cost, so that the main copies get X bits on
average and the copies come out of the budget. From the written checkpoint, the routed-expert weights are
dequantized (a) from the main groups (model.safetensors) and (b) from the copies (expert_copies.safetensors, read
with format/copies.py) into the float32 model; everything else is the model's own float32 weights. Perplexity on
eval.jsonl.gz without the lines that also occur in calib.jsonl.gz. One calibration per model (copied into the run of
each budget).

    .venv/bin/python eval/bench_copies.py                 # both models, main budgets 2.5 and 4 -> eval/results/copies.*
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moecompress.allocate import copies_bytes  # noqa: E402
from moecompress.arch.adapters import describe, set_proj_weights  # noqa: E402
from moecompress.evaluate import evaluate, prepare_eval_data  # noqa: E402
from moecompress.format.copies import copies_file, read_copy_group  # noqa: E402
from moecompress.format.files import weight_files  # noqa: E402
from moecompress.format.pack import dequantize  # noqa: E402
from moecompress.format.spec import group_prefix  # noqa: E402
from moecompress.pipeline.lockfile import make_lock, write_lock  # noqa: E402
from moecompress.pipeline.run import quantize  # noqa: E402
from moecompress.recipe import recipe_from_dict  # noqa: E402
from moecompress.format.spec import read_spec  # noqa: E402

SHARED = ROOT.parent / "shared"


def recipe(model: str, out: Path, avg_bits: float, args) -> dict:
    return {"model": model, "output": str(out), "dtype": "float32", "compute_dtype": "float32",
            "calibration": {"dataset": args.calib, "samples": args.calib_samples, "seq_len": args.seq_len,
                            "all_experts": True},
            "sensitivity": {"method": "hessian", "granularity": "projection"},
            "allocation": {"budget": {"avg_bits": avg_bits}, "candidates": [2, 3, 4, 8]},
            "quantize": {"method": "gptq", "group_size": args.group_size}, "tune": {"steps": 0},
            "store": {"copy_bits": args.copy_bits}}


def copies_nominal_bits(layout, bits: int, group_size: int) -> float:
    """The copies' bytes in the budget's unit: nominal bits per routed-expert weight that buy them, beyond the
    scales and zero-points the budget already counts once (allocate/rules.py Budget)."""
    numel = sum(m.num_experts * p.in_features * p.out_features for m in layout.moe_layers for p in m.projs)
    return copies_bytes(layout, bits, group_size, False) * 8 / numel


def checkpoint_experts(ck: Path, layout, copies: bool) -> dict[tuple[str, str], torch.Tensor]:
    """(experts path, proj) -> [E, out, in] float32 weights, dequantized from the main groups or from the copies."""
    from safetensors import safe_open

    spec = read_spec(ck)
    out = {}
    handles = [safe_open(str(ck / n), framework="pt") for n in weight_files(ck)]
    tensors = {k: h for h in handles for k in h.keys()}
    for m in layout.moe_layers:
        es = spec.experts[m.experts_path]
        for p in m.projs:
            if copies:
                g = read_copy_group(copies_file(ck), m.experts_path, p.name, spec.copy_bits)
                out[m.experts_path, p.name] = dequantize(g["qweight"], g["scales"], g.get("zeros"), spec.copy_bits,
                                                         spec.group_size, p.in_features, torch.float32)
                continue
            w = torch.empty(m.num_experts, p.out_features, p.in_features)
            for bits, ids in es.groups[p.name].items():
                prefix = group_prefix(m.experts_path, p.name, bits)
                get = lambda name: tensors[f"{prefix}.{name}"].get_tensor(f"{prefix}.{name}")  # noqa: E731
                if bits == 16:
                    w[list(ids)] = get("weight").float()
                else:
                    zeros = get("zeros") if not spec.symmetric else None
                    w[list(ids)] = dequantize(get("qweight"), get("scales"), zeros, bits, spec.group_size,
                                              p.in_features, torch.float32)
            out[m.experts_path, p.name] = w
    return out


def with_experts(model, layout, weights):
    out = copy.deepcopy(model)
    for m in layout.moe_layers:
        experts = out.get_submodule(m.experts_path)
        for p in m.projs:
            set_proj_weights(experts, m, p.name, weights[m.experts_path, p.name].to(next(out.parameters()).dtype))
    return out.eval()


def bench_model(model_dir: str, args, work: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = Path(model_dir).name
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    layout = describe(model)
    data, overlap = prepare_eval_data(args.eval, tokenizer, args.eval_samples, args.seq_len, seed=1,
                                      calibration=args.calib)
    common = dict(tokenizer=tokenizer, dataset=data, progress=False, batch_size=4)
    t = time.time()
    base = evaluate(model, method="float32", **common)
    print(f"{name}: float32 ppl {base.perplexity:.3f} ({time.time() - t:.0f}s); {overlap.describe()}", flush=True)
    extra = copies_nominal_bits(layout, args.copy_bits, args.group_size)
    rows = []
    first = None
    for main_bits in args.main_bits:
        run = work / f"{name}-main{main_bits}"
        r = recipe_from_dict(recipe(model_dir, run, round(main_bits + extra, 6), args))
        if first is not None and not run.exists():  # the same calibration and sensitivity: copied in
            run.mkdir(parents=True)
            for stage in ("calibration", "sensitivity"):
                shutil.copytree(first / stage, run / stage)
            write_lock(run, r, make_lock(r, model_dir, args.calib))
        t = time.time()
        quantize(r, progress=False)
        first = first or run
        seconds = time.time() - t
        report = json.loads((run / "allocation" / "report.json").read_text())
        ck = run / "checkpoint"
        ppl = {}
        for label, use_copies in (("main", False), ("copies", True)):
            q = with_experts(model, layout, checkpoint_experts(ck, layout, use_copies))
            ppl[label] = evaluate(q, method=label, **common).perplexity
            del q
        row = {"model": name, "main_avg_bits": report["avg_bits"], "budget_avg_bits": r.allocation.budget.avg_bits,
               "copy_bits": args.copy_bits, "main_bytes": report["bytes"], "copy_bytes": report["copy_bytes"],
               "budget_bytes": report["budget_bytes"], "copies_file_bytes": copies_file(ck).stat().st_size,
               "ppl_float32": base.perplexity, "ppl_main": ppl["main"], "ppl_copies": ppl["copies"],
               "delta_ppl_pct": 100 * (ppl["copies"] / ppl["main"] - 1), "pipeline_s": seconds,
               "eval_tokens": base.tokens}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> list[str]:
    out = ["| model | main avg_bits | budget avg_bits (main + copies) | main bytes | 2-bit copies bytes | copies / "
           "main | copies / (main + copies) | ppl float32 | ppl main | ppl all-copies | Δppl all-copies vs main |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['main_avg_bits']:.3f} | {r['budget_avg_bits']:.3f} | {r['main_bytes']:,} | "
                   f"{r['copy_bytes']:,} | {r['copy_bytes'] / r['main_bytes']:.1%} | "
                   f"{r['copy_bytes'] / (r['main_bytes'] + r['copy_bytes']):.1%} | {r['ppl_float32']:.3f} | "
                   f"{r['ppl_main']:.3f} | {r['ppl_copies']:.3f} | {r['delta_ppl_pct']:+.2f} % |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[str(SHARED / "models/refmoe-qwen3"),
                                                    str(SHARED / "models/refmoe-olmoe")])
    ap.add_argument("--calib", default=str(SHARED / "data/corpus/calib.jsonl.gz"))
    ap.add_argument("--eval", default=str(SHARED / "data/corpus/eval.jsonl.gz"))
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--copy-bits", type=int, default=2)
    ap.add_argument("--main-bits", type=float, nargs="+", default=[2.5, 4.0],
                    help="nominal avg_bits of the main copies; the budget adds the copies' cost")
    ap.add_argument("--work", default="/tmp/bench_copies")
    ap.add_argument("--out", default=str(ROOT / "eval/results"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    t0 = time.time()
    rows = [row for m in args.models for row in bench_model(m, args, Path(args.work))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "copies.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    lines = ["# Low-bit copies of the experts: quality and bytes (issue 12)", "",
             f"`python eval/bench_copies.py` ({time.time() - t0:.0f} s, CPU, 2 threads of a shared 2-core VM): "
             f"calibration {args.calib_samples} x {args.seq_len} tokens of calib.jsonl.gz, evaluation "
             f"{args.eval_samples} x {args.seq_len} of eval.jsonl.gz without calibration lines, group size "
             f"{args.group_size} asymmetric, GPTQ (clip mse), Hessian sensitivity per projection, no scale tuning.",
             "", *table(rows), "",
             "- `main avg_bits`: nominal bits of the main copies chosen by the allocation; the budget (nominal, "
             "`allocation.budget.avg_bits`) is that plus the copies' bytes in the same unit, so the allocation "
             "gives the main copies what is left after the copies.",
             "- `ppl all-copies`: EVERY routed expert computed with its 2-bit copy (an upper bound of the cost of "
             "low-bit substitution, which the store applies only to misses with a routing weight under its "
             "threshold); `ppl main`: every expert with its main copy; both dequantized from the written checkpoint "
             "into the float32 model.",
             f"- perplexity = exp(mean NLL) over {rows[0]['eval_tokens'] if rows else 0} predicted tokens per "
             "model; Δppl = ppl all-copies / ppl main - 1."]
    (out / "copies.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
