"""Pure per-token metrics from logits: next-token NLL and KL(reference || model), padding excluded.

Conventions: `logits` [B, L, V] predict the token after each position, so position t scores token t+1; a target
counts when both it and the position predicting it are real tokens (attention_mask 1). The first token of a
sequence is never scored (there is nothing before it). Computed in float32 (float64 logits stay float64).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moecompress.errors import MoecompressError


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def target_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L-1] bool: which next-token predictions are scored (both the position and its target are real)."""
    m = attention_mask.bool()
    return m[:, :-1] & m[:, 1:]


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L-1] negative log-likelihood (nats) of each next token; 0 where not scored."""
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise MoecompressError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}; "
                               "expected [B, L, V] and [B, L]")
    lp = F.log_softmax(_wide(logits[:, :-1]), dim=-1)  # [B, L-1, V]
    nll = -lp.gather(-1, input_ids[:, 1:, None].to(lp.device)).squeeze(-1)  # [B, L-1]
    return nll * target_mask(attention_mask).to(nll.device)


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L-1] KL(reference || model) in nats of the next-token distributions; 0 where not scored."""
    if ref_logits.shape != logits.shape:
        raise MoecompressError(f"reference logits {tuple(ref_logits.shape)} and model logits {tuple(logits.shape)} "
                               "differ; KL needs the same vocabulary and the same inputs")
    lp = F.log_softmax(_wide(logits[:, :-1]), dim=-1)  # [B, L-1, V]
    lq = F.log_softmax(_wide(ref_logits[:, :-1].to(lp.device)).to(lp.dtype), dim=-1)  # [B, L-1, V]
    kl = (lq.exp() * (lq - lp)).sum(-1).clamp_min(0.0)  # [B, L-1]; clamp: rounding can give -1e-9
    return kl * target_mask(attention_mask).to(kl.device)


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean NLL per token); NaN when no token was scored."""
    return math.exp(nll_sum / tokens) if tokens else float("nan")
