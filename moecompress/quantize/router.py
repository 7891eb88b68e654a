"""Router re-adaptation after quantization (GEMQ-style): refit each MoE layer's router to the quantized model.

Quantized experts change the hidden states that later routers see, so the quantized model routes tokens
differently from the unquantized one. For each MoE layer in order, with the routers before it already refitted,
the router weight W [E, H] is refitted so that the quantized model's routing distribution softmax(W x_q) matches
the unquantized model's softmax(W0 x_f) on the same calibration tokens (x_q, x_f: the router inputs of the
quantized and unquantized model). The objective, mean KL(p_f || softmax(W x_q)) over tokens, is convex in W
(cross-entropy with soft targets of a linear map), so full-batch L-BFGS from W0 solves it in a few dozen steps.

The last `holdout` share of the sequences is never fitted on: each layer keeps its refitted router only when the
routing KL there is lower than with W0. Only router weights change (shape and dtype as before); the experts and
everything else are read only. Pure in the sense of the stage: the model is not modified, the new router weights
are returned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moecompress.arch.layout import ModelLayout
from moecompress.errors import MoecompressError
from moecompress.quantize.capture import module_inputs, split_holdout


@dataclass(frozen=True)
class RouterFitOptions:
    steps: int = 50  # L-BFGS iterations per router (0: off)
    holdout: float = 0.1  # share of the sequences (the last ones) used only to accept or reject each refit
    l2: float = 0.0  # ridge on W - W0 (per element, relative to the mean KL); 0: none

    def __post_init__(self):
        if self.steps < 0 or not 0 < self.holdout < 1 or self.l2 < 0:
            raise MoecompressError(f"router refit options: steps >= 0, 0 < holdout < 1, l2 >= 0; got {self}")


def routing_kl(w: torch.Tensor, x: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(target || softmax(x w^T)); w [E, H], x [T, H], target_logp [T, E] log-probs."""
    logp = torch.log_softmax(x @ w.T, dim=-1)  # [T, E]
    return (target_logp.exp() * (target_logp - logp)).sum(-1).mean()


def topk_agreement(w: torch.Tensor, x: torch.Tensor, target_logp: torch.Tensor, k: int) -> float:
    """Share of tokens whose top-k expert set under softmax(x w^T) equals the target's."""
    mine = torch.topk(x @ w.T, k, dim=-1).indices.sort(-1).values
    ref = torch.topk(target_logp, k, dim=-1).indices.sort(-1).values
    return float((mine == ref).all(-1).float().mean())


def fit_router(w0: torch.Tensor, x: torch.Tensor, target_logp: torch.Tensor, steps: int = 50,
               l2: float = 0.0) -> torch.Tensor:
    """argmin_W routing_kl(W, x, target_logp) + l2 * mean((W - W0)^2), by L-BFGS from W0 (float32 math).
    w0 [E, H], x [T, H] the router inputs to fit on, target_logp [T, E] the routing to match -> W [E, H] float32."""
    w0 = w0.detach().float()
    x, target_logp = x.detach().float(), target_logp.detach().float()
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = routing_kl(w, x, target_logp)
        if l2:
            loss = loss + l2 * ((w - w0) ** 2).mean()
        loss.backward()
        return loss

    if steps:
        with torch.enable_grad():
            opt.step(closure)
    return w.detach()


def refit_routers(model: nn.Module, layout: ModelLayout, weights: dict[str, torch.Tensor],
                  batches: list[tuple[torch.Tensor, torch.Tensor]],
                  options: RouterFitOptions = RouterFitOptions()) -> tuple[dict[str, torch.Tensor], dict]:
    """New router weights for the quantized model, and a report.

    model: the unquantized model (read only). weights: parameter name -> tensor substituted into `model` to make
    the quantized model (e.g. dequantized expert weights, `tune.quantized_weights`). batches: (input_ids,
    attention_mask) calibration batches. Returns ({router_path: W [E, H] in the router's dtype}, report) with,
    per layer, the held-out routing KL and top-k agreement before and after, and whether the refit was kept
    (layers whose refit did not lower the held-out KL keep W0 and are not in the returned dict)."""
    if options.steps == 0:
        return {}, {"steps": 0, "layers": []}
    fit_b, hold_b = split_holdout(batches, options.holdout)
    if not fit_b:
        raise MoecompressError("router refit needs at least 2 calibration sequences (one to fit, one held out)")
    current = dict(weights)
    new, layers = {}, []
    for m in layout.moe_layers:
        router = model.get_submodule(m.router_path)
        w0 = router.weight.detach()
        key = m.router_path + ".weight"
        x_f, = module_inputs(model, None, m.router_path, fit_b)
        x_q, = module_inputs(model, current, m.router_path, fit_b)
        x_f, x_q = x_f.float(), x_q.float()
        target = torch.log_softmax(x_f @ w0.float().T, dim=-1)  # [T, E] the unquantized model's routing
        w = fit_router(w0, x_q, target, options.steps, options.l2)
        hf, = module_inputs(model, None, m.router_path, hold_b)
        hq, = module_inputs(model, current, m.router_path, hold_b)
        hf, hq = hf.float(), hq.float()
        ht = torch.log_softmax(hf @ w0.float().T, dim=-1)
        before, after = float(routing_kl(w0.float(), hq, ht)), float(routing_kl(w, hq, ht))
        kept = after < before
        layers.append({"layer": m.layer, "router": m.router_path, "holdout_kl_before": before,
                       "holdout_kl_after": after, "fit_kl_before": float(routing_kl(w0.float(), x_q, target)),
                       "fit_kl_after": float(routing_kl(w, x_q, target)),
                       "holdout_topk_agree_before": topk_agreement(w0.float(), hq, ht, m.top_k),
                       "holdout_topk_agree_after": topk_agreement(w, hq, ht, m.top_k), "kept": kept})
        if kept:
            new[m.router_path] = w.to(dtype=w0.dtype, device=w0.device)
            current[key] = new[m.router_path]
    held = sum(ids.shape[0] for ids, _ in hold_b)
    return new, {"steps": options.steps, "l2": options.l2, "holdout_sequences": held, "layers": layers}
