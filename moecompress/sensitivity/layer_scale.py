"""Layer-calibrated costs: the per-item damages of a layer rescaled so that, summed over the layer, they equal the
model's real next-token KL when that whole layer is quantized.

Why: the measured methods estimate each item's damage at its own block output (loss_aware: a first-order Fisher
term, g.dy squared), and the allocator compares them across layers. How a block-output error turns into a loss
change depends on the layer (later layers, normalisation, the residual mix), and the per-token Fisher estimate is
noisy, so layers may be off against each other by a factor -- which the allocator cannot see, while popularity-only
treats every layer alike. Measuring each layer once end to end fixes the scale between layers (GEMQ: make the
sensitivities comparable across layers) without an end-to-end pass per item (kl.py does that, at E x bits passes
per layer):

    factor_l = sum_b KL_l(b) / sum_b sum_{items i of layer l} damage_i(b),   b in `bits` (default 2 and 3)
    damage_i(b) <- factor_l * damage_i(b)   for every candidate b of every item of layer l

KL_l(b): mean next-token KL per held-out token (kl.HeldOut) with every expert projection of layer l at b bits
(the candidate weights the costs were measured on) and the rest of the model unquantized. Within a layer the
ranking of the items is unchanged; only the layers' relative weights move. Cost: len(bits) forward passes over the
held-out batches per MoE layer. A layer whose predicted damage is 0 keeps factor 1.
"""
from __future__ import annotations

import torch
from torch import nn

from moecompress.arch.adapters import proj_weights
from moecompress.arch.layout import ModelLayout
from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.sensitivity.deltas import CandidateWeights, QuantizerSettings, candidate, layer_gptq_hessians
from moecompress.sensitivity.kl import HeldOut

SCALE_BITS = (2, 3)


def _layer_items(damage: dict[str, dict[int, float]], experts_path: str) -> list[str]:
    """The item keys of one experts module: '<path>.<e>' or '<path>.<e>.<proj>'."""
    prefix = experts_path + "."
    return [k for k in damage if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()]


@torch.no_grad()
def layer_kl(model: nn.Module, layout: ModelLayout, batches: list[tuple[torch.Tensor, torch.Tensor]],
             bits: tuple[int, ...], settings: QuantizerSettings, stats: CalibrationStats | None = None,
             weights: CandidateWeights | None = None) -> dict[int, dict[int, float]]:
    """MoE layer -> bits -> mean KL per held-out token with that layer's experts all at `bits` (restored after)."""
    was = model.training
    model.eval()
    out: dict[int, dict[int, float]] = {}
    try:
        held = HeldOut(model, batches)
        for moe in layout.moe_layers:
            experts = model.get_submodule(moe.experts_path)
            views = {p.name: proj_weights(experts, moe, p) for p in moe.projs}  # parameter views [E, out, in]
            orig = {p: v.detach().clone() for p, v in views.items()}
            hessians = {p: layer_gptq_hessians(stats, moe.layer, p, moe.num_experts, settings) for p in orig}
            out[moe.layer] = {}
            for b in bits:
                try:
                    for p in orig:
                        views[p].copy_(candidate(moe, p, b, orig[p], settings, hessians[p], weights))
                    out[moe.layer][b] = held.kl()
                finally:
                    for p in orig:
                        views[p].copy_(orig[p])
    finally:
        model.train(was)
    return out


def layer_factors(damage: dict[str, dict[int, float]], layout: ModelLayout, kl: dict[int, dict[int, float]],
                  ) -> dict[int, float]:
    """MoE layer -> factor_l (module docstring) from the measured layer KLs and the items' predicted damages."""
    factors = {}
    for moe in layout.moe_layers:
        keys = _layer_items(damage, moe.experts_path)
        bits = list(kl[moe.layer])
        predicted = sum(damage[k][b] for k in keys for b in bits)
        measured = sum(kl[moe.layer][b] for b in bits)
        factors[moe.layer] = measured / predicted if predicted > 0 else 1.0
    return factors


def scale_layers(damage: dict[str, dict[int, float]], layout: ModelLayout, factors: dict[int, float],
                 ) -> dict[str, dict[int, float]]:
    """The damages with every item of MoE layer l times factors[l]; other items (dense linears) unchanged."""
    out = dict(damage)
    for moe in layout.moe_layers:
        for k in _layer_items(damage, moe.experts_path):
            out[k] = {b: d * factors[moe.layer] for b, d in damage[k].items()}
    return out
