"""The sensitivity stage: CalibrationStats (+ model, + held-out batches) -> CostTable.

Methods (SensitivityOptions.method, as recipe.SensitivityMethod):
- "hessian" (default): tr(dW H_w dW^T) from the routing-weighted calibration Hessians (hessian.py); no forward.
- "measured": the real MoE-block output error on held-out sequences (measured.py).
- "loss_aware": that error weighted by the loss gradient at the block output (loss_aware.py).
- "kl": the model's next-token KL with one item alone quantized, end to end (kl.py; one forward per item and bits).
The first three give damage in one unit (squared block-output error per token; loss-aware: squared first-order loss
change per token), comparable across experts and layers. Bytes per item come from format/sizes.py through
artifacts.cost_table.build_cost_table. Dense linears get items only when `linears` names them (loss_aware;
linears.py); otherwise their bits come from the recipe's protect rules.
Option `layer_scale` (measured methods): each MoE layer's damages rescaled to the real KL with the whole layer
quantized (layer_scale.py). Which text the measured methods run is the caller's: the pipeline passes the held-back
split of the calibration text (calibration.held_back, calibrate/split.py) or the calibration sequences, of which
the last `holdout` share is run.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from moecompress.arch.layout import ModelLayout
from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.artifacts.cost_table import CostTable, build_cost_table
from moecompress.errors import MoecompressError
from moecompress.sensitivity.capture import holdout_batches
from moecompress.sensitivity.deltas import QUANTIZERS, CandidateWeights, QuantizerSettings
from moecompress.sensitivity.hessian import hessian_costs
from moecompress.sensitivity.kl import kl_costs
from moecompress.sensitivity.layer_scale import SCALE_BITS, layer_factors, layer_kl, scale_layers
from moecompress.sensitivity.linears import linear_costs, linear_shapes
from moecompress.sensitivity.loss_aware import loss_aware_costs
from moecompress.sensitivity.measured import measured_costs

METHODS = ("hessian", "measured", "loss_aware", "kl")
GRANULARITIES = ("expert", "projection")
CANDIDATE_BITS = (2, 3, 4, 8, 16)


def _value(v):
    """A recipe enum (str Enum) or a plain string -> the plain string."""
    return getattr(v, "value", v)


@dataclass(frozen=True)
class SensitivityOptions:
    method: str = "hessian"  # "hessian" | "measured" | "loss_aware" | "kl"  (recipe: sensitivity.method)
    granularity: str = "expert"  # "expert": one item per expert | "projection": per (expert, proj)
    quantizer: str = "rtn"  # how candidates are simulated: "rtn" (fast default) | "gptq" (per expert and bits)
    prior_weight: float = 0.1  # Hessian floor for rarely routed experts, needs all_experts stats (hessian.py)
    holdout: float = 0.25  # share of the calibration sequences (the last ones) the measured methods run
    min_tokens: int = 16  # GPTQ: below this an expert uses the all-tokens Hessian (as the quantize stage)
    damp: float = 0.01  # GPTQ settings, as QuantizeOptions
    block_size: int = 128
    act_order: bool = False
    clip: str = "mse"  # group ranges as the quantize stage: "minmax" | "mse"
    # measured methods: rescale each MoE layer's damages to the model's real KL with the whole layer quantized at
    # 2 and 3 bits (layer_scale.py; 2 extra forward passes over the held-out batches per layer)
    layer_scale: bool = False
    device: str | None = None  # where the per-layer damages are computed (default: where the experts are)

    def __post_init__(self):
        for name, allowed in (("method", METHODS), ("granularity", GRANULARITIES), ("quantizer", QUANTIZERS)):
            v = _value(getattr(self, name))
            object.__setattr__(self, name, v)
            if v not in allowed:
                raise MoecompressError(f"sensitivity {name} {v!r}; allowed: {', '.join(allowed)}")
        if not 0 < self.holdout <= 1:
            raise MoecompressError(f"sensitivity holdout must be in (0, 1], got {self.holdout}")
        if not self.prior_weight >= 0:
            raise MoecompressError(f"sensitivity prior_weight must be >= 0, got {self.prior_weight}")

    def quantizer_settings(self, group_size: int, symmetric: bool) -> QuantizerSettings:
        return QuantizerSettings(group_size=group_size, symmetric=symmetric, quantizer=self.quantizer,
                                 damp=self.damp, block_size=self.block_size, act_order=self.act_order,
                                 min_tokens=self.min_tokens, clip=self.clip)


def _check_inputs(layout: ModelLayout, stats: CalibrationStats | None, candidates: tuple[int, ...],
                  group_size: int) -> None:
    bad = [b for b in candidates if b not in CANDIDATE_BITS]
    if not candidates or bad:
        raise MoecompressError(f"candidate bits {list(candidates)}: give one or more of {list(CANDIDATE_BITS)}")
    for moe in layout.moe_layers:
        for p in moe.projs:
            if group_size <= 0 or p.in_features % group_size:
                raise MoecompressError(f"group_size {group_size} does not divide {moe.experts_path}.{p.name} "
                                       f"in_features {p.in_features}; pick a group_size that divides it")
    if stats is not None:
        want = tuple(m.experts_path for m in layout.moe_layers)
        if tuple(stats.experts_paths) != want or any(m.num_experts != stats.num_experts for m in layout.moe_layers):
            raise MoecompressError("the calibration statistics were recorded on another model (experts paths "
                                   f"{list(stats.experts_paths)[:2]}..., expected {list(want)[:2]}...); re-calibrate")


def estimate_costs(model: nn.Module, layout: ModelLayout, stats: CalibrationStats | None,
                   config: SensitivityOptions = SensitivityOptions(), candidates: Iterable[int] = CANDIDATE_BITS,
                   group_size: int = 64, symmetric: bool = False, calibration_batches: Iterable[tuple] | None = None,
                   progress: bool = True, context_model: nn.Module | None = None,
                   linears: Iterable[str] = (), candidate_weights: CandidateWeights | None = None) -> CostTable:
    """What each candidate bit-width would cost, for every routed expert (or expert projection) of `model`.

    stats: needed by the hessian method and by the gptq quantizer. calibration_batches: (input_ids [B, S],
    attention_mask [B, S], ...) tuples, needed by the measured methods, which run the last `config.holdout` share
    of the sequences.
    context_model: (measured methods) the model whose inputs and loss gradients every experts module is measured
    in -- by default `model` itself; progressive allocation passes the model with the experts quantized as already
    planned, so each damage is re-estimated where the rest of the model is quantized. The candidate weights are
    always quantized from `model`'s (the original) weights.
    linears: dense nn.Linear paths (e.g. layout.attention_linears) that get cost items too, so that one budget
    covers them and the experts (loss_aware method only: linears.py gives them the experts' unit).
    candidate_weights: (measured methods) the experts' candidate weights as a quantize run made them, (MoE layer,
    proj, bits) -> [E, out, in] (deltas.CandidateWeights): the costs are then quantizer-exact instead of simulated.
    """
    candidates = tuple(sorted({int(b) for b in candidates}))
    _check_inputs(layout, stats, candidates, group_size)
    settings = config.quantizer_settings(group_size, symmetric)
    linears = tuple(linears)
    if linears and config.method != "loss_aware":
        raise MoecompressError(f"dense linears get costs only with the loss_aware method (got {config.method!r}), "
                               "the one whose unit (squared loss change per token) holds for experts and linears")
    if config.method == "hessian":
        if stats is None:
            raise MoecompressError("the hessian sensitivity method needs calibration statistics (run calibrate)")
        if candidate_weights is not None:
            raise MoecompressError("the hessian method simulates its candidates; candidate_weights need method "
                                   "measured, loss_aware or kl")
        if context_model is not None:
            raise MoecompressError("the hessian method runs no forward pass, so it takes no context_model; use "
                                   "method measured or loss_aware for in-context (progressive) sensitivity")
        damage = hessian_costs(model, layout, stats, candidates, settings, config.granularity, config.prior_weight,
                               progress, config.device)
        label = f"hessian-trace {config.quantizer}"
    else:
        if calibration_batches is None:
            raise MoecompressError(f"the {config.method} sensitivity method needs calibration batches "
                                   "(held-out sequences); pass calibration_batches or use method hessian")
        batches = holdout_batches(calibration_batches, config.holdout)
        quantizer = config.quantizer if candidate_weights is None else "exact"
        if config.method == "kl":
            if context_model is not None and context_model is not model:
                raise MoecompressError("the kl sensitivity method measures each item in the unquantized model; "
                                       "it takes no context_model (use loss_aware for progressive allocation)")
            damage = kl_costs(model, layout, batches, candidates, settings, config.granularity, stats, progress,
                              candidate_weights)
            return build_cost_table(layout, damage, group_size=group_size, symmetric=symmetric,
                                    method=f"kl {quantizer} holdout={config.holdout:g} "
                                           f"granularity={config.granularity}")
        costs = measured_costs if config.method == "measured" else loss_aware_costs
        damage = costs(model, layout, batches, candidates, settings, config.granularity, stats, progress,
                       context_model=context_model, weights=candidate_weights, device=config.device)
        label = f"{config.method} {quantizer} holdout={config.holdout:g}"
        if config.layer_scale:
            kl = layer_kl(model, layout, batches, SCALE_BITS, settings, stats, candidate_weights)
            factors = layer_factors(damage, layout, kl)
            damage = scale_layers(damage, layout, factors)
            label += " layer-scaled x(" + ",".join(f"{f:.3g}" for f in factors.values()) + ")"
        if context_model is not None and context_model is not model:
            label += " in-context"
        if linears:
            damage = {**damage, **linear_costs(model, linears, batches, candidates, settings, progress,
                                               context_model=context_model)}
            label += f" +{len(linears)} linears"
    return build_cost_table(layout, damage, group_size=group_size, symmetric=symmetric,
                            method=f"{label} granularity={config.granularity}",
                            linear_shapes=linear_shapes(model, linears) if linears else None)
