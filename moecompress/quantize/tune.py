"""Scale tuning: the stored float16 scales of every quantized matrix fitted to the model's own outputs.

After GPTQ the integers (and zero-points) are fixed; only the scales move. Each scale is parametrised as
s = s0 * exp(theta), theta = 0 at the start (so it stays positive), and all thetas of the model are trained
together with Adam to minimise the KL divergence between the unquantized model's next-token distribution and the
quantized model's, on the calibration sequences: end to end, so errors of one layer can be compensated by the
scales of the next (what layer-wise GPTQ cannot do). The checkpoint format does not change (still float16 scales,
rounded at the end), and nothing but scales is touched.

The last `holdout` share of the sequences is never trained on: the KL there, before and after, is the report, and
the tuned scales are kept only when they lower it. Batches are drawn with a seeded generator, so a run on CPU is
reproducible bit for bit. Memory: the model, its integers as int16 (one per weight) and the fp32 weights
rebuilt each step with their gradient graph; fine for models that fit on one device, not for the largest ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from moecompress.arch.adapters import proj_weights
from moecompress.arch.layout import ModelLayout
from moecompress.artifacts.quantized import QuantizedTensors, QuantizedWeight, expert_key
from moecompress.errors import MoecompressError
from moecompress.format.pack import dequantize_values

_MIN_SCALE, _MAX_SCALE = 2.0**-24, 65504.0  # float16's positive finite range, as rtn.py


@dataclass(frozen=True)
class TuneOptions:
    steps: int = 300
    lr: float = 3e-3  # Adam step on theta = log(scale / initial scale)
    batch_size: int = 16  # sequences per step
    holdout: float = 0.1  # share of the sequences (the last ones) kept out of training for the before/after check
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0 or not 0 < self.holdout < 1:
            raise MoecompressError(f"tune options: steps >= 0, batch_size >= 1, lr > 0, 0 < holdout < 1; got {self}")


@dataclass(frozen=True)
class _Param:
    """One model parameter rebuilt from integers and scales: w = where(keep, w0, codes * scales) per expert."""

    name: str  # parameter name in the model
    transposed: bool  # stored [E, in, out] (or [in, out])
    keys: tuple[str | None, ...]  # QuantizedTensors key per expert (None: not quantized, w0 kept)
    w0: torch.Tensor  # [E, out, in] float32, original weights (used where keys[e] is None)
    codes: torch.Tensor  # [E, out, in] int16, q - z (0 where not quantized)
    scales: torch.Tensor  # [E, out, in/g] float32 initial scales (1 where not quantized)
    group_size: int
    linear: bool  # a dense nn.Linear (no expert dimension in the model)


def _params(model: nn.Module, layout: ModelLayout, quantized: QuantizedTensors) -> list[_Param]:
    out = []

    def build(name, transposed, w0, keys, linear):
        qws = [quantized.weights[k] if k else None for k in keys]
        g = next(q.group_size for q in qws if q is not None)
        codes = torch.zeros(w0.shape, dtype=torch.int16, device=w0.device)
        scales = torch.ones(*w0.shape[:-1], w0.shape[-1] // g, device=w0.device)
        for e, q in enumerate(qws):
            if q is not None:
                zeros = None if q.zeros is None else q.zeros.repeat_interleave(g, -1)
                codes[e] = dequantize_values(q.q, torch.ones(()), zeros, q.bits).to(device=w0.device,
                                                                                     dtype=torch.int16)
                scales[e] = q.scales.to(device=w0.device, dtype=torch.float32)
        out.append(_Param(name, transposed, tuple(keys), w0, codes, scales, g, linear))

    for m in layout.moe_layers:
        experts = model.get_submodule(m.experts_path)
        for p in m.projs:
            keys = [expert_key(m.experts_path, p.name, e) for e in range(m.num_experts)]
            keys = [k if k in quantized.weights else None for k in keys]
            if any(keys):
                w0 = proj_weights(experts, m, p.name).detach().float()
                build(f"{m.experts_path}.{p.attr}", m.transposed, w0, keys, False)
    expert_keys = {k for p in out for k in p.keys}
    for path in quantized.weights:
        if path not in expert_keys:  # a dense nn.Linear, keyed by its module path
            build(path + ".weight", False, model.get_submodule(path).weight.detach().float()[None], [path], True)
    return out


def _weights(params: list[_Param], scales: list[torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Parameter name -> weight rebuilt from the integers and `scales` (one [E, out, in/g] tensor per param)."""
    out = {}
    for p, sc in zip(params, scales):
        w = p.codes.to(torch.float32) * sc.repeat_interleave(p.group_size, -1)
        keep = torch.tensor([k is None for k in p.keys], device=w.device)
        w = torch.where(keep[:, None, None], p.w0, w)
        w = w[0] if p.linear else w
        out[p.name] = (w.transpose(-2, -1) if p.transposed else w).to(dtype)
    return out


def quantized_weights(model: nn.Module, layout: ModelLayout, quantized: QuantizedTensors) -> dict[str, torch.Tensor]:
    """Parameter name -> dequantized weight, in the model's dtype and layout, for every parameter that holds a
    quantized matrix of `quantized` (experts not in it keep their weights): substituted with
    torch.func.functional_call, this is the quantized model without copying `model`."""
    dtype = next(model.parameters()).dtype
    params = _params(model, layout, quantized)
    with torch.no_grad():
        return _weights(params, [p.scales for p in params], dtype)


def _kl(model: nn.Module, weights: dict | None, ids: torch.Tensor, mask: torch.Tensor,
        teacher: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of KL(teacher || model) of the next-token distributions; teacher = log-probs."""
    kwargs = dict(input_ids=ids, attention_mask=mask)
    logits = (model(**kwargs) if weights is None else functional_call(model, weights, args=(), kwargs=kwargs)).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    kl = (teacher.exp() * (teacher - logp)).sum(-1)
    keep = mask > 0
    return kl[keep].mean()


@torch.no_grad()
def _teacher(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)


def _eval_kl(model, params, scales, batches, dtype) -> float:
    total = n = 0.0
    with torch.no_grad():
        weights = _weights(params, scales, dtype)
        for ids, mask in batches:
            tokens = float((mask > 0).sum())
            total += float(_kl(model, weights, ids, mask, _teacher(model, ids, mask))) * tokens
            n += tokens
    return total / max(n, 1.0)


def tune_scales(model: nn.Module, layout: ModelLayout, quantized: QuantizedTensors,
                batches: list[tuple[torch.Tensor, torch.Tensor]], options: TuneOptions = TuneOptions(),
                progress: bool = True) -> tuple[QuantizedTensors, dict]:
    """Tuned copy of `quantized` (same integers and zeros, new float16 scales) and a report
    {"holdout_kl_before", "holdout_kl_after", "kept", "steps", ...}. `batches`: (input_ids, attention_mask)
    calibration batches; `model`: the unquantized model (read only)."""
    if not quantized.weights:
        raise MoecompressError("nothing to tune: the quantized tensors are empty")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids = torch.cat([i for i, _ in batches]).to(device)
    mask = torch.cat([m for _, m in batches]).to(device)
    n_hold = max(1, math.ceil(len(ids) * options.holdout))
    if len(ids) - n_hold < 1:
        raise MoecompressError(f"scale tuning needs at least 2 calibration sequences, got {len(ids)}")
    train_ids, train_mask = ids[:-n_hold], mask[:-n_hold]
    hold = [(ids[i:i + options.batch_size], mask[i:i + options.batch_size])
            for i in range(len(ids) - n_hold, len(ids), options.batch_size)]
    params = _params(model, layout, quantized)
    thetas = [torch.zeros_like(p.scales, requires_grad=True) for p in params]
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        before = _eval_kl(model, params, [p.scales for p in params], hold, dtype)
        opt = torch.optim.Adam(thetas, lr=options.lr)
        gen = torch.Generator().manual_seed(options.seed)
        bar = tqdm(range(options.steps), desc="tune scales", disable=not progress)
        for _ in bar:
            pick = torch.randint(0, len(train_ids), (min(options.batch_size, len(train_ids)),), generator=gen)
            x, m = train_ids[pick.to(device)], train_mask[pick.to(device)]
            scales = [p.scales * torch.exp(th) for p, th in zip(params, thetas)]
            loss = _kl(model, _weights(params, scales, dtype), x, m, _teacher(model, x, m))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(kl=f"{loss.item():.4f}")
        with torch.no_grad():  # the float16 values that will be stored, finite and positive
            tuned = [(p.scales * torch.exp(th)).clamp(_MIN_SCALE, _MAX_SCALE).to(torch.float16)
                     for p, th in zip(params, thetas)]
        after = _eval_kl(model, params, [s.float() for s in tuned], hold, dtype)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
        model.train(was_training)
    kept = after < before
    weights = dict(quantized.weights)
    if kept:
        for p, s in zip(params, tuned):
            for e, key in enumerate(p.keys):
                if key is not None:
                    old = weights[key]
                    weights[key] = replace(old, scales=s[e].to(old.scales.device))
    report = {"steps": options.steps, "lr": options.lr, "batch_size": options.batch_size,
              "train_sequences": len(train_ids), "holdout_sequences": n_hold, "holdout_kl_before": before,
              "holdout_kl_after": after, "kept": kept}
    return QuantizedTensors(weights=weights, fallbacks=quantized.fallbacks, method=quantized.method), report

