"""The quantize stage: every expert projection (and chosen dense linear) to its planned bit-width.

GPTQ uses the routing-weighted Hessian of the expert's own tokens (its error reaches the output scaled by the
routing weight). An expert that saw fewer than `min_tokens` tokens uses the all-tokens Hessian when calibration
recorded one (all_experts mode), and otherwise falls back to RTN; every fallback is recorded with its reason.
With a plan's copy_bits, `quantize_copies` makes the low-bit copy of every expert projection with the same
quantizer and Hessians.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from moecompress.arch.adapters import proj_weights
from moecompress.arch.layout import ModelLayout
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.artifacts.quantized import QuantizedTensors, QuantizedWeight, expert_key
from moecompress.errors import MoecompressError
from moecompress.quantize.gptq import gptq_quantize, layer_output_error
from moecompress.quantize.rtn import check_clip, quantize_rtn

METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantizeOptions:
    method: str = "gptq"  # "rtn" | "gptq"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    min_tokens: int = 16
    clip: str = "mse"  # "minmax" | "mse": each group's range by a clipping search (rtn.clipped_params)

    def __post_init__(self):
        if self.method not in METHODS:
            raise MoecompressError(f"quantize method {self.method!r}; allowed: {', '.join(METHODS)}")
        check_clip(self.clip, "quantize clip")


def expert_hessian(stats: CalibrationStats, layer: int, proj: str, expert: int, min_tokens: int):
    """(H [in, in] or None, note): the Hessian GPTQ should use for one expert projection."""
    tokens = int(stats.tokens[layer, expert])
    if tokens >= max(min_tokens, 1):
        return stats.hessian(layer, proj, weighted=True)[expert], None
    if stats.all_experts:
        return stats.hessian(layer, proj)[expert], f"{tokens} routed tokens < {min_tokens}: all-tokens Hessian"
    return None, f"{tokens} routed tokens < {min_tokens} and no all-tokens Hessian: RTN"


def _quantize(w: torch.Tensor, bits: int, plan: BitPlan, hessian, options: QuantizeOptions):
    """(QuantizedWeight, note). GPTQ keeps its result only where it beats RTN on the Hessian's output error."""
    importance = None if hessian is None else hessian.diagonal()
    rtn = quantize_rtn(w, bits, plan.group_size, plan.symmetric, options.clip, importance)
    if options.method == "rtn" or hessian is None:
        return rtn, None
    res = gptq_quantize(w, hessian, bits, plan.group_size, plan.symmetric, damp=options.damp,
                        block_size=options.block_size, act_order=options.act_order, clip=options.clip)
    if res.fallback:
        return res.weight, res.fallback
    if layer_output_error(w, rtn.dequantize(torch.float32), hessian) < res.loss:
        return rtn, "RTN had the lower output error"
    return res.weight, None


def quantize_model(model: nn.Module, layout: ModelLayout, plan: BitPlan, stats: CalibrationStats | None,
                   options: QuantizeOptions = QuantizeOptions(), progress: bool = True,
                   desc: str = "quantize experts", device: str | torch.device | None = None) -> QuantizedTensors:
    """Every planned expert projection (and dense linear) quantized; GPTQ runs on `device` (default: where the
    weights are; a model offloaded to the host layer by layer passes the device it computes on)."""
    if options.method == "gptq" and stats is None:
        raise MoecompressError("GPTQ needs calibration statistics with Hessians; use method rtn or calibrate first")
    weights, fallbacks = {}, {}
    jobs = [(m, p.name, e) for m in layout.moe_layers for p in m.projs
            for e, b in enumerate(plan.experts[m.experts_path][p.name]) if b != 16]
    for m, proj, e in tqdm(jobs, desc=desc, disable=not progress):
        key = expert_key(m.experts_path, proj, e)
        bits = plan.experts[m.experts_path][proj][e]
        w = proj_weights(model.get_submodule(m.experts_path), m, proj)[e].detach().float()
        w = w if device is None else w.to(device)
        hessian, note = (None, None) if options.method == "rtn" else expert_hessian(stats, m.layer, proj, e,
                                                                                     options.min_tokens)
        weights[key], fallback = _quantize(w, bits, plan, hessian, options)
        if note or fallback:
            fallbacks[key] = "; ".join(x for x in (note, fallback) if x)
    for path, bits in tqdm(plan.linears.items(), desc="quantize linears", disable=not progress or not plan.linears):
        if bits == 16:
            continue
        w = model.get_submodule(path).weight.detach().float()
        w = w if device is None else w.to(device)
        hessian = None if stats is None else stats.dense_hessians.get(path)
        if options.method == "gptq" and hessian is None:
            fallbacks[path] = "no dense Hessian recorded: RTN"
        weights[path], fallback = _quantize(w, bits, plan, hessian, options)
        if fallback:
            fallbacks[path] = fallback
    return QuantizedTensors(weights={k: _on_cpu(w) for k, w in weights.items()}, fallbacks=fallbacks,
                            method=options.method)


def quantize_copies(model: nn.Module, layout: ModelLayout, plan: BitPlan, stats: CalibrationStats | None,
                    options: QuantizeOptions = QuantizeOptions(), progress: bool = True,
                    device: str | torch.device | None = None) -> QuantizedTensors:
    """The low-bit copy of EVERY expert projection at plan.copy_bits (whatever its main bits), quantized exactly as
    quantize_model would quantize it at those bits (same method, Hessian choice, clip search and GPTQ-vs-RTN rule)."""
    if plan.copy_bits is None:
        raise MoecompressError("the bit plan has no copy_bits; nothing to copy")
    at_copy_bits = replace(plan, experts={path: {proj: (plan.copy_bits,) * len(bits) for proj, bits in projs.items()}
                                          for path, projs in plan.experts.items()}, linears={}, copy_bits=None)
    return quantize_model(model, layout, at_copy_bits, stats, options, progress=progress, desc="quantize copies",
                          device=device)


def _on_cpu(w: QuantizedWeight) -> QuantizedWeight:
    """The result in host memory, whatever device the model (and so GPTQ) ran on."""
    return replace(w, q=w.q.cpu(), scales=w.scales.cpu(), zeros=None if w.zeros is None else w.zeros.cpu())
