"""results.json + results.md: a list of EvalResult as JSON (round-trips) and as one markdown table."""
from __future__ import annotations

import json
import math
from pathlib import Path

from moecompress.errors import MoecompressError
from moecompress.evaluate.result import EvalResult

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def format_table(results: list[EvalResult]) -> str:
    """Markdown: method | avg bits | stored bits | bits/weight | MB | ppl | ppl per domain (union) | KL."""
    domains = sorted({d.name for r in results for d in r.domains})
    head = ["method", "avg bits", "stored bits", "bits/weight", "MB", "ppl"] + [f"ppl {d}" for d in domains] + ["KL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s = r.size
        by_name = {d.name: d for d in r.domains}
        row = [r.method, _num(s and s.avg_bits, ".2f"), _num(s and s.stored_bits, ".3f"),
               _num(s and s.bits_per_weight, ".2f"),
               _num(s and s.bytes / 2**20, ".2f"), _num(r.perplexity, ".3f")]
        row += [_num(by_name[d].perplexity, ".3f") if d in by_name else "–" for d in domains]
        row.append(_num(r.kl, ".4f"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _describe(results: list[EvalResult]) -> str:
    ds = sorted({f"{r.dataset} ({r.samples} x {r.seq_len} tokens, seed {r.seed}, {r.tokens} scored)"
                 for r in results})
    refs = sorted({r.reference for r in results if r.reference})
    out = "dataset: " + "; ".join(ds)
    if refs:
        out += "\nKL(reference || model) in nats per token; reference: " + ", ".join(refs)
    for text in sorted({r.overlap.describe() for r in results if r.overlap is not None}):
        out += "\n" + text
    return out + ("\navg bits: nominal bits per routed-expert weight; stored bits: the routed experts' stored bytes "
                  "(scales and zero-points included) x 8 per weight; bits/weight: all stored bytes x 8 / all weights")


def write_results(results: list[EvalResult], out_dir: str | Path) -> tuple[Path, Path]:
    """Write out_dir/results.json and out_dir/results.md; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / RESULTS_JSON, out / RESULTS_MD
    js.write_text(json.dumps({"results": [r.to_dict() for r in results]}, indent=1) + "\n")
    md.write_text(format_table(results) + "\n\n" + _describe(results) + "\n")
    return js, md


def read_results(path: str | Path) -> list[EvalResult]:
    """The results of a results.json (or of the directory holding it)."""
    p = Path(path)
    p = p / RESULTS_JSON if p.is_dir() else p
    if not p.is_file():
        raise MoecompressError(f"{path}: no {RESULTS_JSON}; run `moecompress eval --out DIR` first")
    try:
        rows = json.loads(p.read_text())["results"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise MoecompressError(f"{p} is not a moecompress results file (expected {{\"results\": [...]}})") from None
    return [EvalResult.from_dict(r) for r in rows]


def merge_results(old: list[EvalResult], new: list[EvalResult]) -> list[EvalResult]:
    """`old` with each result of `new` replacing the one of the same method and dataset, else appended."""
    keys = {(r.method, r.dataset) for r in new}
    return [r for r in old if (r.method, r.dataset) not in keys] + list(new)
