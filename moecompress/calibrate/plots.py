"""PNG plots of a CalibrationStats (matplotlib, Agg backend): popularity, per-domain popularity, co-activation."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from moecompress.artifacts.calibration_stats import CalibrationStats


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _heatmap(ax, data: torch.Tensor, title: str, xlabel: str, ylabel: str, cmap: str = "viridis", **kw):
    from matplotlib.ticker import MaxNLocator

    im = ax.imshow(data.numpy(), aspect="auto", interpolation="nearest", cmap=cmap, **kw)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    return im


def plot_popularity(stats: CalibrationStats, path: Path) -> Path:
    """Heatmap, MoE layers x experts, of each expert's load relative to the uniform share (1 = average)."""
    plt = _plt()
    rel = stats.load_share * stats.num_experts  # [L, E]
    fig, ax = plt.subplots(figsize=(max(4.0, stats.num_experts * 0.25 + 2), max(2.5, stats.num_layers * 0.35 + 1.5)))
    im = _heatmap(ax, rel, f"{stats.model_type}: expert load / uniform share", "expert", "MoE layer")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_domain_popularity(stats: CalibrationStats, path: Path) -> Path | None:
    """One heatmap per domain, MoE layers x experts, load relative to the uniform share."""
    if stats.domain_tokens is None or not stats.domains:
        return None
    plt = _plt()
    D = len(stats.domains)
    cols = min(3, D)
    rows = math.ceil(D / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 4.2, rows * 3.0), squeeze=False, constrained_layout=True)
    t = stats.domain_tokens.to(torch.float64)  # [D, L, E]
    rel = t / t.sum(dim=2, keepdim=True).clamp(min=1) * stats.num_experts
    vmax = float(rel.max()) if rel.numel() else 1.0
    for d, name in enumerate(stats.domains):
        im = _heatmap(axes[d // cols][d % cols], rel[d], f"{name} ({int(t[d, 0].sum()) // max(stats.top_k, 1)} tokens)",
                      "expert", "MoE layer", vmin=0, vmax=vmax)
    for k in range(D, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle("expert load / uniform share, per domain", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_coactivation(stats: CalibrationStats, path: Path) -> Path:
    """Per MoE layer, the expert co-activation matrix normalised by tokens: P(both chosen) (diagonal zeroed)."""
    plt = _plt()
    L = stats.num_layers
    cols = min(4, L)
    rows = math.ceil(L / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.2, rows * 3.0), squeeze=False, constrained_layout=True)
    for layer in range(L):
        c = stats.coactivation[layer].to(torch.float64) / max(stats.num_tokens, 1)
        c.fill_diagonal_(0)
        ax = axes[layer // cols][layer % cols]
        _heatmap(ax, c, f"layer {layer}", "expert", "expert", cmap="magma")
    for k in range(L, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("co-activation: share of tokens choosing both experts", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_plots(stats: CalibrationStats, directory: str | Path) -> list[Path]:
    """Write popularity.png, domain_popularity.png (when the data has domains) and coactivation.png."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = [plot_popularity(stats, d / "popularity.png"),
           plot_domain_popularity(stats, d / "domain_popularity.png"),
           plot_coactivation(stats, d / "coactivation.png")]
    return [p for p in out if p is not None]
