"""KL sensitivity: the end-to-end cost of quantizing one item alone, measured in the model's output distribution.

For every item (an expert, or one projection of it: granularity) and candidate bit-width, the whole model is run
on the held-out calibration sequences with only that item's weights replaced by their quantized values -- made
with the quantizer the quantize stage uses (deltas.py: GPTQ with the stage's Hessian rules when the settings say
"gptq", so the cost is that of the weights the export will write, not an RTN proxy) -- and

    damage = (1/N) * sum over the N kept positions of KL(p_ref(. | prefix) || p_item(. | prefix))

in nats per token, p_ref the unquantized model's next-token distribution. Unlike loss_aware (a first-order
Fisher estimate at the block output with the observed token's gradient) nothing is linearised: the damage is the
expected loss increase of that item alone, through every later layer and the output head. Items are taken as
additive (cross terms between items are dropped, as with every method here).

Cost: one forward pass over the held-out batches per item and candidate below 16 bits (layers x groups x experts
x candidates passes; fine for small models and a GPU, not for 30B models), and the reference log-probabilities of
the held-out tokens are held on the model's device ([N, vocab] float32). 16 bits -> 0; damages are made
non-increasing in bits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moecompress.arch.adapters import proj_weights
from moecompress.arch.layout import ModelLayout, MoELayer
from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.sensitivity.deltas import CandidateWeights, QuantizerSettings, candidate_damages
from moecompress.sensitivity.hessian import damages_to_items


def _kept_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 log-probabilities [n, V] of the next token at every position whose next token is real."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, S, V]
    keep = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)  # [B, S-1]
    return F.log_softmax(logits[:, :-1][keep].to(torch.float64), dim=-1)


CHUNK_TOKENS = {"cpu": 8192, "cuda": 32768}  # positions per forward pass: equal-length held-out batches are merged


def _merged(batches: list[tuple[torch.Tensor, torch.Tensor]], chunk_tokens: int = CHUNK_TOKENS["cpu"],
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same sequences in fewer, larger batches: consecutive batches of one length joined while the joined
    batch has at most `chunk_tokens` positions (a batch already larger stays as it is)."""
    out: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for ids, mask in batches:
        last = out[-1] if out else None
        if last and last[0][0].shape[1] == ids.shape[1] and \
                (sum(i.shape[0] for i, _ in last) + ids.shape[0]) * ids.shape[1] <= chunk_tokens:
            last.append((ids, mask))
        else:
            out.append([(ids, mask)])
    return [(torch.cat([i for i, _ in part]), torch.cat([m for _, m in part])) for part in out]


class HeldOut:
    """The held-out batches on the model's device with the reference log-probabilities of their kept tokens."""

    def __init__(self, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        device = next(model.parameters()).device
        self.model = model
        chunk = CHUNK_TOKENS.get(device.type, CHUNK_TOKENS["cpu"])
        self.batches = [(ids.to(device), mask.to(device)) for ids, mask in _merged(batches, chunk)]
        self.ref = [_kept_logprobs(model, ids, mask).to(torch.float32) for ids, mask in self.batches]
        self.num_tokens = max(sum(r.shape[0] for r in self.ref), 1)

    def kl(self) -> float:
        """Mean KL(p_ref || p_model) per kept token with the model as it is now."""
        total = 0.0
        for (ids, mask), ref in zip(self.batches, self.ref):
            logq = _kept_logprobs(self.model, ids, mask)
            logp = ref.to(torch.float64)
            total += float((logp.exp() * (logp - logq)).sum())
        return max(total / self.num_tokens, 0.0)


def _layer_kl(held: HeldOut, moe: MoELayer, experts: nn.Module, candidates: tuple[int, ...],
              settings: QuantizerSettings, granularity: str, stats: CalibrationStats | None, progress: bool,
              weights: CandidateWeights | None = None) -> dict[str, dict[int, torch.Tensor]]:
    """proj (or "*" for granularity "expert") -> bits -> damage [E] float64 of one MoE layer."""
    views = {p.name: proj_weights(experts, moe, p) for p in moe.projs}  # views of the parameters, [E, out, in]
    orig = {p: v.detach().clone() for p, v in views.items()}

    def measure(projs: list[str], weights_of, label: str) -> torch.Tensor:
        q = {p: weights_of(p) for p in projs}
        dmg = torch.zeros(moe.num_experts, dtype=torch.float64)
        for e in tqdm(range(moe.num_experts), desc=f"kl {moe.experts_path} {label}", unit="expert",
                      disable=not progress, leave=False):
            for p in projs:
                views[p][e].copy_(q[p][e])
            try:
                dmg[e] = held.kl()
            finally:
                for p in projs:
                    views[p][e].copy_(orig[p][e])
        return dmg

    return candidate_damages(moe, orig, candidates, settings, granularity, stats, weights, measure)


@torch.no_grad()
def kl_costs(model: nn.Module, layout: ModelLayout, batches: list[tuple[torch.Tensor, torch.Tensor]],
             candidates: tuple[int, ...], settings: QuantizerSettings, granularity: str = "expert",
             stats: CalibrationStats | None = None, progress: bool = True, weights: CandidateWeights | None = None,
             ) -> dict[str, dict[int, float]]:
    """Item key -> bits -> mean next-token KL per held-out token with that item alone quantized. The model's
    weights are changed one item at a time and restored (also on error)."""
    was = model.training
    model.eval()
    try:
        held = HeldOut(model, batches)
        items = {}
        for moe in tqdm(layout.moe_layers, desc=f"sensitivity (kl, {settings.quantizer})", unit="layer",
                        disable=not progress):
            per_group = _layer_kl(held, moe, model.get_submodule(moe.experts_path), candidates, settings,
                                  granularity, stats, progress, weights)
            items.update(damages_to_items(moe, per_group))
    finally:
        model.train(was)
    return items
