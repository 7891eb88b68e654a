"""Block-wise output reconstruction (AutoRound / OmniQuant style): after GPTQ, fit each MoE layer's scales to
that layer's output, one layer at a time, on quantized inputs.

For each MoE layer in order (the layers before it already reconstructed), the experts module of the quantized
model is run on what it receives in the quantized model (hidden states x_q and its own routing), and its output is
fitted to what the unquantized model's experts module gives on the unquantized model's inputs (x_f, routing f):

    min over the layer's scales  mean_t || E_q(x_q,t; routing_q) - E_f(x_f,t; routing_f) ||^2

so each layer also corrects the drift the layers before it left in its inputs, which layer-wise GPTQ (fitted on
unquantized inputs) cannot. As in tune.py, integers and zero-points are fixed and every stored float16 scale
is s = s0 * exp(theta), trained with Adam on token minibatches. Only one layer's activations are held at a time,
so it scales to models whose full end-to-end graph would not fit. The last `holdout` share of the sequences is
never fitted on; a layer keeps its new scales only when its held-out output error goes down.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.func import functional_call

from moecompress.arch.experts_call import routing_args
from moecompress.arch.layout import ModelLayout
from moecompress.artifacts.quantized import QuantizedTensors
from moecompress.errors import MoecompressError
from moecompress.quantize.capture import module_inputs, split_holdout
from moecompress.quantize.tune import _MAX_SCALE, _MIN_SCALE, _params, _weights


@dataclass(frozen=True)
class BlockwiseOptions:
    steps: int = 200  # Adam steps per MoE layer (0: off)
    lr: float = 5e-3  # on theta = log(scale / initial scale)
    tokens: int = 4096  # tokens per step
    holdout: float = 0.1  # share of the sequences (the last ones) used only to accept or reject each layer's fit
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.tokens < 1 or not self.lr > 0 or not 0 < self.holdout < 1:
            raise MoecompressError(f"blockwise options: steps >= 0, tokens >= 1, lr > 0, 0 < holdout < 1; got {self}")


def _output(experts: nn.Module, weights: dict | None, x, idx, w, chunk: int = 16384) -> torch.Tensor:
    """The experts module's output [T, H] (float32) on captured inputs, with `weights` (attr -> tensor) substituted."""
    outs = []
    for i in range(0, x.shape[0], chunk):
        args = (x[i:i + chunk], idx[i:i + chunk], w[i:i + chunk])
        y = experts(*args) if weights is None else functional_call(experts, weights, args=args)
        outs.append(y.float())
    return torch.cat(outs)


def reconstruct_blocks(model: nn.Module, layout: ModelLayout, quantized: QuantizedTensors,
                       batches: list[tuple[torch.Tensor, torch.Tensor]],
                       options: BlockwiseOptions = BlockwiseOptions()) -> tuple[QuantizedTensors, dict]:
    """`quantized` with each MoE layer's expert scales refitted to the layer's output (same integers and zeros,
    new float16 scales), and a report with each layer's held-out output error before and after. `model`: the
    unquantized model (read only); `batches`: (input_ids, attention_mask) calibration batches."""
    if options.steps == 0 or not quantized.weights:
        return quantized, {"steps": 0, "layers": []}
    fit_b, hold_b = split_holdout(batches, options.holdout)
    if not fit_b:
        raise MoecompressError("block-wise reconstruction needs at least 2 calibration sequences")
    dtype = next(model.parameters()).dtype
    params = _params(model, layout, quantized)
    scales = [p.scales for p in params]
    current = _weights(params, scales, dtype)  # parameter name -> quantized weight, updated layer by layer
    gen = torch.Generator().manual_seed(options.seed)
    layers = []
    for m in layout.moe_layers:
        mine = [i for i, p in enumerate(params) if p.name.startswith(m.experts_path + ".") and not p.linear]
        if not mine:
            continue
        experts = model.get_submodule(m.experts_path)
        rel = {i: params[i].name[len(m.experts_path) + 1:] for i in mine}

        def inputs(weights, part):
            x, idx, w = module_inputs(model, weights, m.experts_path, part, routing_args)
            return x, idx.long(), w

        with torch.no_grad():
            y_fit = _output(experts, None, *inputs(None, fit_b))  # [T, H] targets
            y_hold = _output(experts, None, *inputs(None, hold_b))
        q_fit, q_hold = inputs(current, fit_b), inputs(current, hold_b)

        def error(sc, q, y, pick=None):
            """Mean squared output error with scales `sc` (one tensor per param of this layer); on all of q
            without grad, or with grad on the tokens `pick`."""
            ws = _weights([params[i] for i in mine], sc, dtype)
            sub = {rel[i]: ws[params[i].name] for i in mine}
            if pick is None:
                with torch.no_grad():
                    return float(((_output(experts, sub, *q) - y) ** 2).sum(-1).mean())
            out = functional_call(experts, sub, args=tuple(t[pick] for t in q)).float()
            return ((out - y[pick]) ** 2).sum(-1).mean()

        thetas = [torch.zeros_like(params[i].scales, requires_grad=True) for i in mine]
        before = error([params[i].scales for i in mine], q_hold, y_hold)
        opt = torch.optim.Adam(thetas, lr=options.lr)
        n = y_fit.shape[0]
        with torch.enable_grad():
            for _ in range(options.steps):
                pick = torch.randint(0, n, (min(options.tokens, n),), generator=gen).to(y_fit.device)
                loss = error([params[i].scales * torch.exp(th) for i, th in zip(mine, thetas)], q_fit, y_fit, pick)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():  # the float16 values that will be stored
            tuned = [(params[i].scales * torch.exp(th)).clamp(_MIN_SCALE, _MAX_SCALE).to(torch.float16).float()
                     for i, th in zip(mine, thetas)]
        after = error(tuned, q_hold, y_hold)
        fitted = [replace(params[i], scales=t) for i, t in zip(mine, tuned)]
        kept = after < before
        layers.append({"layer": m.layer, "holdout_err_before": before, "holdout_err_after": after, "kept": kept,
                       "target_norm": float((y_hold ** 2).sum(-1).mean())})
        if kept:
            for i, p in zip(mine, fitted):
                params[i] = p
            current.update(_weights(fitted, [p.scales for p in fitted], dtype))
    weights = dict(quantized.weights)
    for p in params:
        for e, key in enumerate(p.keys):
            if key is not None:
                old = weights[key]
                weights[key] = replace(old, scales=p.scales[e].to(device=old.scales.device, dtype=torch.float16))
    report = {"steps": options.steps, "lr": options.lr, "tokens": options.tokens,
              "holdout_sequences": sum(ids.shape[0] for ids, _ in hold_b), "layers": layers}
    return QuantizedTensors(weights=weights, fallbacks=quantized.fallbacks, method=quantized.method), report

