"""The per-layer summary table of a CalibrationStats, for the terminal."""
from __future__ import annotations

from moecompress.artifacts.calibration_stats import CalibrationStats


def _ids(xs: list[int], limit: int = 8) -> str:
    if not xs:
        return "-"
    s = ",".join(map(str, xs[:limit]))
    return s + (f",… ({len(xs)})" if len(xs) > limit else "")


def format_summary(stats: CalibrationStats) -> str:
    """A markdown table: per MoE layer the max/mean expert load, the least and most used experts' token counts,
    the dead experts (no token) and the under-covered ones (Hessian from fewer than min_tokens tokens)."""
    head = (f"{stats.model_type}: {stats.num_layers} MoE layers x {stats.num_experts} experts (top-{stats.top_k}), "
            f"{stats.num_tokens} tokens ({stats.samples} x {stats.seq_len}) from {stats.dataset or '?'}"
            + (f", domains: {', '.join(stats.domains)}" if stats.domains else ""))
    rows = ["| layer | max/mean load | min tokens | max tokens | dead experts | "
            f"under {stats.min_tokens} tokens |",
            "|---:|---:|---:|---:|---|---|"]
    for s in stats.layer_summary():
        rows.append(f"| {s['layer']} | {s['max_over_mean_load']:.2f} | {s['min_tokens']} | {s['max_tokens']} | "
                    f"{_ids(s['dead_experts'])} | {_ids(s['under_covered_experts'])} |")
    under = len(stats.under_covered())
    foot = (f"coverage: {stats.num_layers * stats.num_experts - under}/{stats.num_layers * stats.num_experts} "
            f"experts with >= {stats.min_tokens} tokens"
            + (" (all-experts Hessians)" if stats.all_experts else ""))
    return "\n".join([head, "", *rows, "", foot])
