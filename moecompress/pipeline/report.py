"""report.md of a run: calibration coverage, allocation, checkpoint size, fallbacks, and evaluation if asked."""
from __future__ import annotations

import json

from moecompress.artifacts.quantized import META_FILE
from moecompress.pipeline.steps import ALLOC_REPORT, TUNE_REPORT, RunContext
from moecompress.runtime.loading.inspect import checkpoint_report, format_report


def _allocation_lines(report: dict) -> list[str]:
    keys = ("solver", "gap", "predicted_damage", "avg_bits", "stored_bits", "bytes", "copy_bytes", "bf16_bytes",
            "bits_histogram", "by_kind")
    return [f"- {k}: {report[k]}" for k in keys if k in report]


def write_report(ctx: RunContext) -> str:
    out = ctx.out
    parts = [f"# moecompress run: {out}", "", f"recipe: `{out / 'recipe.lock.yaml'}`", ""]
    summary = out / "calibration" / "summary.md"
    if summary.exists():
        parts += ["## Calibration", "", summary.read_text().strip(), ""]
    alloc = json.loads((out / "allocation" / ALLOC_REPORT).read_text())
    parts += ["## Allocation", "", *_allocation_lines(alloc), "", "![bits](allocation/bits_heatmap.png)", ""]
    fallbacks = json.loads((out / "quantized" / META_FILE).read_text())["fallbacks"]
    parts += ["## Quantization", "", f"- fallbacks / notes: {len(fallbacks)} (see quantized/{META_FILE})"]
    tune = json.loads((out / "tuned" / TUNE_REPORT).read_text())
    parts += [*_post_lines(tune), ""]
    parts += ["## Checkpoint", "", format_report(checkpoint_report(out / "checkpoint")), ""]
    if ctx.recipe.eval is not None:
        parts += ["## Evaluation", "", _evaluate(ctx), ""]
    text = "\n".join(parts)
    (out / "report.md").write_text(text)
    return text


def _post_lines(tune: dict) -> list[str]:
    """One line per post-quantization step of tune.json: block-wise reconstruction, scale tuning, router refit."""
    out = []
    if "blockwise" in tune:
        layers = tune["blockwise"]["layers"]
        kept = sum(1 for x in layers if x["kept"])
        out.append(f"- block-wise reconstruction: {kept} of {len(layers)} MoE layers kept (held-out output error "
                   + ", ".join(f"{x['holdout_err_before']:.4g}->{x['holdout_err_after']:.4g}" for x in layers) + ")")
    if tune.get("skipped"):
        out.append("- scale tuning: off (tune.steps 0)")
    else:
        out.append(f"- scale tuning: {tune['steps']} steps, held-out KL {tune['holdout_kl_before']:.5f} -> "
                   f"{tune['holdout_kl_after']:.5f} ({'kept' if tune['kept'] else 'no gain: untuned scales kept'})")
    if "router" in tune:
        layers = tune["router"]["layers"]
        kept = sum(1 for x in layers if x["kept"])
        out.append(f"- router refit: {kept} of {len(layers)} routers refitted (held-out routing KL "
                   + ", ".join(f"{x['holdout_kl_before']:.4g}->{x['holdout_kl_after']:.4g}" for x in layers) + ")")
    return out


def _evaluate(ctx: RunContext) -> str:
    from moecompress.builtin import resolve_dataset
    from moecompress.evaluate import evaluate_checkpoint, plot_pareto, write_results

    e = ctx.recipe.eval
    model, tokenizer, _ = ctx.load()
    dataset = resolve_dataset(e.dataset)
    common = dict(dataset=dataset, tokenizer=tokenizer, samples=e.samples, seq_len=e.seq_len, seed=e.seed,
                  progress=ctx.progress, calibration=ctx.dataset_path)
    results = [evaluate_checkpoint(model, method="uncompressed", family="bf16", **common),
               evaluate_checkpoint(ctx.out / "checkpoint", reference=model, method="moecompress", **common)]
    _, md = write_results(results, ctx.out / "eval")
    plot_pareto(results, ctx.out / "eval" / "pareto.png")
    return md.read_text().strip()
