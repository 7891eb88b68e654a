"""Pareto plot: perplexity against average bits, one series per method family (matplotlib, no pyplot state)."""
from __future__ import annotations

from pathlib import Path

from moecompress.evaluate.result import EvalResult


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (bits, ppl) points no other point beats on both (fewer or equal bits and lower or equal ppl), by bits."""
    front, best = [], float("inf")
    for bits, ppl in sorted(points):
        if ppl < best:
            front.append((bits, ppl))
            best = ppl
    return front


def plot_pareto(results: list[EvalResult], path: str | Path, log_ppl: bool = False) -> Path:
    """Save perplexity vs avg bits (x) to `path` (PNG): a line per family, points labelled by method, the Pareto
    front over all results dashed. Results without a size are left out."""
    from matplotlib.figure import Figure

    sized = [r for r in results if r.size is not None]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    families = sorted({r.family for r in sized})
    for fam in families:
        pts = sorted((r.size.avg_bits, r.perplexity, r.method) for r in sized if r.family == fam)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fam)
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front([(r.size.avg_bits, r.perplexity) for r in sized])
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", linewidth=0.8, label="Pareto front")
    if log_ppl:
        ax.set_yscale("log")
    ax.set_xlabel("average bits per expert weight")
    ax.set_ylabel("perplexity")
    ax.set_title(f"perplexity vs bits ({sized[0].dataset})" if sized else "perplexity vs bits (no sized result)",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    if families:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
