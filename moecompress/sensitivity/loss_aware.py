"""Loss-aware sensitivity: the measured block-output error of each expert, weighted by the loss gradient.

One forward and one backward pass per held-out batch give g_t = d loss / d y_t, y_t the experts-module output at
token t (the loss is the summed next-token cross-entropy over the kept tokens of the batch). Then, with measured.py's
per-row errors dy (expert e quantized, token t routed to it):

    damage_e = (1/N) * sum over routed (t, slot) of (g_t . dy)^2

Why this form: to second order, with the Hessian of the loss in y_t replaced by the empirical Fisher g_t g_t^T,
the loss increase is (1/2) dy^T g_t g_t^T dy = (1/2) (g_t . dy)^2 — the full Fisher quadratic form in the block
output, the Fisher/gradient-weighted criterion of global expert-level bit allocation. It is as cheap as the
diagonal form sum_d g_td^2 dy_td^2 and keeps the direction of the error relative to the gradient. Approximations:
cross terms between tokens and between experts are dropped (errors of different rows taken as uncorrelated), the
factor 1/2 is left out (it does not change any ranking), and the gradient is the one of the unquantized model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moecompress.arch.layout import ModelLayout
from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.sensitivity.capture import BlockCapture, LayerCapture
from moecompress.sensitivity.deltas import CandidateWeights, QuantizerSettings
from moecompress.sensitivity.measured import captured_costs


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of predicting token s+1 from position s, over pairs where both are real tokens.
    logits [B, S, V], input_ids / attention_mask [B, S] -> scalar float32."""
    keep = (attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0)  # [B, S-1]
    pred = logits[:, :-1].float()[keep]  # [n, V]
    target = input_ids[:, 1:][keep]  # [n]
    return F.cross_entropy(pred, target, reduction="sum")


class _NoParamGrads:
    """Parameters stop requiring grad inside the block (no weight-gradient graph), restored on exit."""

    def __init__(self, model: nn.Module):
        self.model, self.flags = model, {}

    def __enter__(self):
        for name, p in self.model.named_parameters():
            self.flags[name] = p.requires_grad
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.flags.get(name, p.requires_grad))


def capture_with_grads(model: nn.Module, layout: ModelLayout, batches: list[tuple[torch.Tensor, torch.Tensor]],
                       progress: bool = True) -> tuple[list[LayerCapture], int]:
    """Inputs and output gradients of every experts module on the held-out batches (one backward per batch)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with _NoParamGrads(model), BlockCapture(model, layout, grads=True) as cap, torch.enable_grad():
            for ids, mask in tqdm(batches, desc="sensitivity forward+backward", unit="batch",
                                  disable=not progress):
                ids, mask = ids.to(device), mask.to(device)
                cap.begin(mask)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, S, V]
                cap.end(next_token_loss(logits, ids, mask))
    finally:
        model.train(was)
    return cap.captures(), cap.num_tokens


def loss_aware_costs(model: nn.Module, layout: ModelLayout, batches: list[tuple[torch.Tensor, torch.Tensor]],
                     candidates: tuple[int, ...], settings: QuantizerSettings, granularity: str = "expert",
                     stats: CalibrationStats | None = None, progress: bool = True,
                     context_model: nn.Module | None = None, weights: CandidateWeights | None = None,
                     device: str | torch.device | None = None) -> dict[str, dict[int, float]]:
    """Item key -> bits -> gradient-weighted block-output damage on the held-out `batches`; inputs and gradients
    from `context_model` (default `model`), candidate weights quantized from `model`'s (or given: `weights`)."""
    captures, n = capture_with_grads(model if context_model is None else context_model, layout, batches, progress)
    return captured_costs(model, layout, captures, n, candidates, settings, granularity, stats, True, progress,
                          weights, device)
