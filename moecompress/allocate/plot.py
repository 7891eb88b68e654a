"""A picture of a bit plan: MoE layers down, experts across, colour = bits."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from moecompress.allocate.allocation import Allocation, to_bit_plan
from moecompress.arch.layout import ModelLayout
from moecompress.artifacts.bit_plan import BitPlan


def expert_bits_grid(plan: BitPlan, layout: ModelLayout) -> np.ndarray:
    """[L, max experts] bits of each expert, averaged over its projections by weight count; NaN where none."""
    grid = np.full((layout.num_layers, max(m.num_experts for m in layout.moe_layers)), np.nan)
    for m in layout.moe_layers:
        sizes = np.array([p.out_features * p.in_features for p in m.projs], dtype=np.float64)  # [P]
        bits = np.array([plan.experts[m.experts_path][p.name] for p in m.projs], dtype=np.float64)  # [P, E]
        grid[m.layer, : m.num_experts] = sizes @ bits / sizes.sum()
    return grid


def plot_bits_heatmap(plan: BitPlan | Allocation, layout: ModelLayout, path: str | Path) -> None:
    """Save a layers x experts heatmap of the bits of `plan` (an Allocation is turned into its BitPlan) to `path`."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    if isinstance(plan, Allocation):
        plan = to_bit_plan(plan, layout)
    grid = expert_bits_grid(plan, layout)
    n_layers, n_experts = grid.shape
    fig = Figure(figsize=(min(2 + 0.25 * n_experts, 24), min(1.5 + 0.3 * n_layers, 18)))
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=2, vmax=max(8, np.nanmax(grid)), interpolation="nearest")
    fig.colorbar(im, ax=ax, label="bits (mean over projections, by weights)")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"bits per expert: mean {np.nanmean(grid):.2f}, group {plan.group_size}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
