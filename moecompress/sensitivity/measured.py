"""Measured sensitivity: the real change of the MoE block output when one expert is quantized.

On the held-out sequences, each experts module's inputs and routing are captured (capture.py; routing is the
model's own). Then per MoE layer, on a float32 copy of the experts module, every routed (token, slot) pair is
re-run as its own row: the module is called as experts(x_t [R, H], index [R, 1], weight [R, 1]), so a row's output
is w_t * expert_e(x_t) and involves one expert only. All experts of the layer are fake-quantized at once per
candidate (they are independent), and a row's error is attributed to its expert:

    measured:   damage_e = (1/N) sum over rows of expert e of ||dy_row||^2
    loss_aware: damage_e = (1/N) sum over rows of expert e of (g_t . dy_row)^2   (see loss_aware.py)

N = held-out kept tokens, so the units match the Hessian method (squared block-output error per token). For
granularity "expert" every projection of the expert is quantized together; for "projection" one at a time.
Biases are not quantized, so they cancel in dy. 16 bits -> 0; damages are made non-increasing in bits.
Cost: one layer's experts are held twice in float32 (original and quantized), plus y0 for all rows [R, H].
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from moecompress.arch.adapters import proj_weights, set_proj_weights
from moecompress.arch.layout import ModelLayout, MoELayer
from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.sensitivity.capture import BlockCapture, LayerCapture
from moecompress.sensitivity.deltas import CandidateWeights, QuantizerSettings, candidate_damages
from moecompress.sensitivity.hessian import damages_to_items

CHUNK_ROWS = 4096  # (token, slot) rows per experts call


def _rows(cap: LayerCapture, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [R], slot [R]) of every routed pair whose expert index is valid."""
    idx = cap.top_k_index
    valid = (idx >= 0) & (idx < num_experts)
    return valid.nonzero(as_tuple=True)


@torch.no_grad()
def layer_damages(moe: MoELayer, experts: nn.Module, cap: LayerCapture, candidates: tuple[int, ...],
                  settings: QuantizerSettings, granularity: str = "expert", stats: CalibrationStats | None = None,
                  fisher: bool = False, num_tokens: int | None = None, weights: CandidateWeights | None = None,
                  device: str | torch.device | None = None) -> dict[str, dict[int, torch.Tensor]]:
    """proj (or "*" for granularity "expert") -> bits -> damage [E] float64 of one MoE layer.
    fisher: weight each row's error by the captured loss gradient (loss-aware). weights: the candidates' weights
    given (see CandidateWeights) instead of simulated with `settings`. device: where to compute (default: where
    the experts are)."""
    if fisher and cap.grad is None:
        raise ValueError("loss-aware damages need captures with gradients")
    E = moe.num_experts
    device = next(experts.parameters()).device if device is None else torch.device(device)
    work = copy.deepcopy(experts).to(device=device, dtype=torch.float32)  # the model is never modified
    orig = {p.name: proj_weights(work, moe, p).detach().clone() for p in moe.projs}  # [E, out, in]
    token, slot = _rows(cap, E)
    expert_of_row = cap.top_k_index[token, slot]  # [R]
    chunks = [slice(s, s + CHUNK_ROWS) for s in range(0, token.numel(), CHUNK_ROWS)]

    def run(c: slice) -> torch.Tensor:
        t, k = token[c], slot[c]
        x = cap.hidden[t].to(device=device, dtype=torch.float32)  # [r, H]
        idx = expert_of_row[c].to(device).unsqueeze(1)  # [r, 1]
        w = cap.top_k_weights[t, k].to(device).unsqueeze(1)  # [r, 1]
        return work(x, idx, w).to(torch.float32)  # [r, H]

    y0 = [run(c) for c in chunks]
    n = max(num_tokens if num_tokens is not None else cap.num_tokens, 1)

    def measure(projs: list[str], weights_of, label: str) -> torch.Tensor:
        dmg = torch.zeros(E, dtype=torch.float64)
        for p in projs:
            set_proj_weights(work, moe, p, weights_of(p))
        for c, base in zip(chunks, y0):
            dy = run(c) - base  # [r, H]
            if fisher:
                g = cap.grad[token[c]].to(device=device)  # [r, H]
                err = (g * dy).sum(-1) ** 2
            else:
                err = (dy ** 2).sum(-1)
            dmg.index_add_(0, expert_of_row[c], err.to(torch.float64).cpu())
        for p in projs:
            set_proj_weights(work, moe, p, orig[p])
        return torch.nan_to_num(dmg / n, nan=0.0, posinf=torch.finfo(torch.float64).max)

    return candidate_damages(moe, orig, candidates, settings, granularity, stats, weights, measure)


def captured_costs(model: nn.Module, layout: ModelLayout, captures: list[LayerCapture], num_tokens: int,
                   candidates: tuple[int, ...], settings: QuantizerSettings, granularity: str = "expert",
                   stats: CalibrationStats | None = None, fisher: bool = False, progress: bool = True,
                   weights: CandidateWeights | None = None, device: str | torch.device | None = None,
                   ) -> dict[str, dict[int, float]]:
    """Item key -> bits -> damage from captured held-out inputs (and gradients when `fisher`)."""
    items = {}
    name = "loss_aware" if fisher else "measured"
    for moe in tqdm(layout.moe_layers, desc=f"sensitivity ({name}, {settings.quantizer})", unit="layer",
                    disable=not progress):
        per_group = layer_damages(moe, model.get_submodule(moe.experts_path), captures[moe.layer], candidates,
                                  settings, granularity, stats, fisher, num_tokens, weights, device)
        items.update(damages_to_items(moe, per_group))  # groups: proj names, or "*" (whole experts)
    return items


@torch.no_grad()
def capture_inputs(model: nn.Module, layout: ModelLayout, batches: list[tuple[torch.Tensor, torch.Tensor]],
                   progress: bool = True) -> tuple[list[LayerCapture], int]:
    """Run the held-out batches (no gradients) and capture every experts module's inputs."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with BlockCapture(model, layout) as cap:
            for ids, mask in tqdm(batches, desc="sensitivity forward", unit="batch", disable=not progress):
                cap.begin(mask)
                model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                cap.end()
    finally:
        model.train(was)
    return cap.captures(), cap.num_tokens


def measured_costs(model: nn.Module, layout: ModelLayout, batches: list[tuple[torch.Tensor, torch.Tensor]],
                   candidates: tuple[int, ...], settings: QuantizerSettings, granularity: str = "expert",
                   stats: CalibrationStats | None = None, progress: bool = True,
                   context_model: nn.Module | None = None, weights: CandidateWeights | None = None,
                   device: str | torch.device | None = None) -> dict[str, dict[int, float]]:
    """Item key -> bits -> measured block-output damage on the held-out `batches`; inputs from `context_model`
    (default `model`), candidate weights quantized from `model`'s (or given: `weights`)."""
    captures, n = capture_inputs(model if context_model is None else context_model, layout, batches, progress)
    return captured_costs(model, layout, captures, n, candidates, settings, granularity, stats, False, progress,
                          weights, device)
