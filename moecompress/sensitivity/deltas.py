"""The weight error dW = W - Q(W) of a stack of expert matrices, with the quantizer the quantize stage will use.

RTN (the default estimate) is one vectorised call per projection and bit-width. GPTQ runs once per expert,
projection and candidate bit-width (costly: use it when the recipe quantizes with GPTQ and the sensitivity must
see what GPTQ will really leave), with the quantize stage's rules, mirrored here because stages do not import
each other (tests/test_sensitivity.py checks that both pick the same Hessian):
- the Hessian is the routing-weighted one of the expert's own tokens; an expert with fewer than `min_tokens`
  tokens uses the all-tokens Hessian when calibration recorded one (all_experts), else plain RTN;
- GPTQ's result is kept only where it beats RTN on that Hessian's output error.

Only the pure primitives `quantize.rtn` and `quantize.gptq` are imported from the quantize package.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.artifacts.cost_table import ALL_PROJS
from moecompress.errors import MoecompressError
from moecompress.quantize.gptq import gptq_quantize, layer_output_error
from moecompress.quantize.rtn import check_clip, fake_quantize, quantize_rtn

QUANTIZERS = ("rtn", "gptq")

# (MoE layer, proj name, bits) -> the candidate's dequantized weights [E, out, in] of that layer's experts: costs
# measured on the very weights a quantize run made (quantizer-exact) instead of simulating them
CandidateWeights = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class QuantizerSettings:
    """How the candidate bit-widths are simulated; GPTQ fields as in QuantizeOptions."""

    group_size: int = 64
    symmetric: bool = False
    quantizer: str = "rtn"  # "rtn" | "gptq"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    min_tokens: int = 16
    clip: str = "mse"

    def __post_init__(self):
        if self.quantizer not in QUANTIZERS:
            raise MoecompressError(f"sensitivity quantizer {self.quantizer!r}; allowed: {', '.join(QUANTIZERS)}")
        check_clip(self.clip, "sensitivity clip")


def gptq_hessian(stats: CalibrationStats, layer: int, proj: str, expert: int, min_tokens: int):
    """The Hessian [in, in] GPTQ uses for one expert projection, or None for RTN (the quantize stage's rule)."""
    tokens = int(stats.tokens[layer, expert])
    if tokens >= max(min_tokens, 1):
        return stats.hessian(layer, proj, weighted=True)[expert]
    if stats.all_experts:
        return stats.hessian(layer, proj)[expert]
    return None


def layer_gptq_hessians(stats: CalibrationStats | None, layer: int, proj: str, num_experts: int,
                        settings: QuantizerSettings) -> list[torch.Tensor | None] | None:
    """Per expert the GPTQ Hessian (or None = RTN); None altogether when the quantizer is RTN."""
    if settings.quantizer == "rtn":
        return None
    if stats is None:
        raise MoecompressError("the gptq sensitivity quantizer needs calibration statistics with Hessians")
    return [gptq_hessian(stats, layer, proj, e, settings.min_tokens) for e in range(num_experts)]


def quant_error(w: torch.Tensor, bits: int, settings: QuantizerSettings,
                hessians: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """dW = W - Q(W) for w [E, out, in] (float32) at `bits`; zeros at 16 bits. `hessians`: one per expert
    from `layer_gptq_hessians` (None: RTN for all)."""
    if bits == 16:
        return torch.zeros_like(w)
    rtn = fake_quantize(w, bits, settings.group_size, settings.symmetric, settings.clip)  # [E, out, in]
    if hessians is None:
        return w - rtn
    if len(hessians) != w.shape[0]:
        raise ValueError(f"{len(hessians)} Hessians for {w.shape[0]} experts")
    q = rtn.clone()
    for e, h in enumerate(hessians):
        if h is None:
            continue
        h = h.to(device=w.device, dtype=torch.float32)
        q[e] = quantize_rtn(w[e], bits, settings.group_size, settings.symmetric, settings.clip,
                            h.diagonal()).dequantize(torch.float32)  # the stage's RTN: clip weighted by diag H
        res = gptq_quantize(w[e], h, bits, settings.group_size, settings.symmetric, damp=settings.damp,
                            block_size=settings.block_size, act_order=settings.act_order, clip=settings.clip)
        if res.fallback is None and res.loss <= layer_output_error(w[e], q[e], h):
            q[e] = res.weight.dequantize(torch.float32)
    return w - q


def quantized(w: torch.Tensor, bits: int, settings: QuantizerSettings,
              hessians: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Q(W) for w [E, out, in] (float32); w itself at 16 bits."""
    return w if bits == 16 else w - quant_error(w, bits, settings, hessians)


def candidate(moe, proj: str, bits: int, orig: torch.Tensor, settings: QuantizerSettings,
              hessians: Sequence[torch.Tensor | None] | None = None,
              weights: CandidateWeights | None = None) -> torch.Tensor:
    """One projection's candidate weights at `bits` [E, out, in], in orig's dtype: the given ones (`weights`), else
    simulated from `orig` with `settings` (and the layer's GPTQ Hessians)."""
    q = quantized(orig.to(torch.float32), bits, settings, hessians) if weights is None else weights(moe, proj, bits)
    return q.to(orig)


def non_increasing(by_bits: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Running minimum over increasing bits: damage never grows with more bits."""
    out, best = {}, None
    for b in sorted(by_bits):
        best = by_bits[b] if best is None else torch.minimum(best, by_bits[b])
        out[b] = best
    return out


# (projs quantized together, proj -> its candidate weights [E, out, in] (made on call), label) -> damage [E] float64
Measure = Callable[[list[str], Callable[[str], torch.Tensor], str], torch.Tensor]


def candidate_damages(moe, orig: dict[str, torch.Tensor], candidates: tuple[int, ...], settings: QuantizerSettings,
                      granularity: str, stats: CalibrationStats | None, weights: CandidateWeights | None,
                      measure: Measure) -> dict[str, dict[int, torch.Tensor]]:
    """proj (or "*" for granularity "expert") -> bits -> damage [E] float64 of one MoE layer: for each group of
    projections quantized together and each candidate below 16 bits, `measure` gets a function giving each
    projection's candidate weights (the given ones, else simulated with `settings` and the layer's GPTQ Hessians;
    made on call, so a caller may hold one projection's at a time); 16 bits -> 0; made non-increasing."""
    E = moe.num_experts
    hessians = {p: layer_gptq_hessians(stats, moe.layer, p, E, settings) for p in orig}
    groups = [ALL_PROJS] if granularity == "expert" else list(orig)
    out = {}
    for group in groups:
        projs = list(orig) if group == ALL_PROJS else [group]
        by_bits = {}
        for bits in candidates:
            if bits == 16:
                by_bits[bits] = torch.zeros(E, dtype=torch.float64)
                continue
            def weights_of(p: str, bits: int = bits) -> torch.Tensor:
                return candidate(moe, p, bits, orig[p], settings, hessians[p], weights)

            by_bits[bits] = measure(projs, weights_of, f"{group} {bits}-bit")
        out[group] = non_increasing(by_bits)
    return out
