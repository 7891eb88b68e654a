"""Hessian sensitivity: the damage of quantizing an expert, from the calibration Hessians, without a forward pass.

Units: expected squared error added to the residual stream (the MoE block output) per calibration token, so
damages compare across experts and layers: damage = (1/N) * sum over routed tokens of ||w_t * (y_t - y^_t)||^2,
N = stats.num_tokens, w_t the routing weight.

- down: exact under the recorded inputs: tr(dW H_w dW^T) / N, H_w = sum_t w_t^2 z_t z_t^T (`weighted=True`).
- gate_up / up: the error lives in the intermediate space; it is carried to the block output by two documented
  approximations, per intermediate unit i (I units):
  1. pre-activation -> activation: the row error E_r = (dW H_w dW^T)_rr of row r (gate g_i or up u_i) times
     a gain gamma_r = E[w^2 z_i^2] / E[w^2 r^2], both energies measured: E[w^2 z_i^2] = diag(H_down,w)_i,
     E[w^2 r^2] = diag(W H_w W^T)_r. For the up path (z = a(g) u) this is E[a(g)^2] exactly when u and g are
     independent; for the gate path it treats the activation as positively homogeneous (a(g) = a'(g) g: exact
     for ReLU, close for SiLU/GELU), giving E[a'(g)^2 u^2]. Ungated experts (z = a(u)) use the same rule.
     GPT-OSS computes z = (u + 1) * glu(g): its up gain is E[w^2 z^2] / E[w^2 (u + 1)^2], with
     E[w^2 (u + 1)^2] ~ diag(W_u H_w W_u^T) + sum_t w_t^2 (the cross term 2 E[w^2 u] dropped) and
     sum_t w_t^2 ~ mass^2 / tokens (exact when an expert's routing weights are equal). Biases are left out of
     E[w^2 r^2]; GPT-OSS's clamps are not modelled.
  2. activation -> output: dz_i reaches the output through column i of W_down: times ||W_down[:, i]||^2, errors
     of different units taken as uncorrelated (independent rounding of different rows).
- 16 bits -> 0. Damages are made non-increasing in bits (a running minimum) so allocators can rely on it.
- Floor (only when stats.all_experts: the unweighted Hessians saw every token): damage = max(weighted damage,
  floor), floor = prior_weight * s_l * m_e, with m_e the expert's mean per-token error over *all* tokens (from the
  unweighted Hessians, same two approximations) and s_l = mean_e(mass_e^2 / tokens_e) / N, the typical
  sum_t w_t^2 / N of an expert of that layer. So prior_weight = 0.1 says: an expert never (or rarely) routed
  costs at least a tenth of an average expert of its layer fed the whole calibration set. Without all_experts an
  unrouted expert has damage 0 at every bit-width (popularity-weighted damage: it is never used).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from moecompress.arch.adapters import proj_weights, split_gate_up
from moecompress.arch.layout import ModelLayout, MoELayer
from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.artifacts.cost_table import ALL_PROJS, item_key
from moecompress.sensitivity.deltas import QuantizerSettings, layer_gptq_hessians, non_increasing, quant_error

# z = (up + UP_OFFSET) * act(gate) instead of up * act(gate), by config.model_type
UP_OFFSET: dict[str, float] = {"gpt_oss": 1.0}
_EXPERT_CHUNK = 16  # experts per batched matmul (bounds the [chunk, out, in] temporary)


def row_errors(dw: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """diag(dW H dW^T) per expert: dw [E, out, in], h [E, in, in] -> [E, out] float32 (sum_t (dW x_t)_r^2)."""
    out = torch.empty(dw.shape[:2], dtype=torch.float32, device=dw.device)
    for s in range(0, dw.shape[0], _EXPERT_CHUNK):
        d = dw[s:s + _EXPERT_CHUNK].to(torch.float32)
        hh = h[s:s + _EXPERT_CHUNK].to(device=dw.device, dtype=torch.float32)
        out[s:s + _EXPERT_CHUNK] = (torch.bmm(d, hh) * d).sum(-1)
    return out


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den is 0 (no signal: no gain)."""
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def first_row_factors(moe: MoELayer, w_first: torch.Tensor, h_first: torch.Tensor, h_down: torch.Tensor,
                      w_down: torch.Tensor, up_offset: float = 0.0, sum_w2: torch.Tensor | None = None,
                      ) -> torch.Tensor:
    """Per row of the first projection (gate_up or up), the factor turning its pre-activation error into block
    output error: gamma_r * ||W_down[:, i(r)]||^2 (approximations 1 and 2 of the module docstring). [E, rows].
    up_offset, sum_w2 [E] (sum of the squared token weights of the Hessians): for z = (u + offset) * act(g)."""
    energy = row_errors(w_first, h_first)  # [E, rows]: sum_t w_t^2 r_t^2
    z_energy = torch.diagonal(h_down.to(device=w_first.device, dtype=torch.float32), dim1=-2, dim2=-1)  # [E, I]
    col = (w_down.to(torch.float32) ** 2).sum(-2)  # [E, I]: ||W_down[:, i]||^2
    factors = torch.zeros_like(energy)
    if moe.projs[0].name == "gate_up":
        (f_gate, f_up), (e_gate, e_up) = split_gate_up(factors, moe, dim=-1), split_gate_up(energy, moe, dim=-1)
        f_gate.copy_(_ratio(z_energy, e_gate) * col)
        if up_offset and sum_w2 is not None:
            e_up = e_up + up_offset ** 2 * sum_w2.to(device=e_up.device, dtype=e_up.dtype).unsqueeze(-1)
        f_up.copy_(_ratio(z_energy, e_up) * col)
    else:
        factors.copy_(_ratio(z_energy, energy) * col)
    return factors


def layer_damages(moe: MoELayer, experts: nn.Module, stats: CalibrationStats, candidates: tuple[int, ...],
                  settings: QuantizerSettings, prior_weight: float = 0.1, up_offset: float = 0.0,
                  device: str | torch.device | None = None) -> dict[str, dict[int, torch.Tensor]]:
    """proj -> bits -> damage [E] float64 of one MoE layer (units: see the module docstring)."""
    layer, E = moe.layer, moe.num_experts
    first, down = moe.projs[0].name, "down"
    w = {p.name: proj_weights(experts, moe, p).detach().to(device=device, dtype=torch.float32)
         for p in moe.projs}  # [E, out, in]
    device = w[down].device
    hw = {p: stats.hessian(layer, p, weighted=True).to(device) for p in (first, down)}
    n = max(int(stats.num_tokens), 1)
    tokens = stats.tokens[layer].to(torch.float64)
    sum_w2 = stats.mass[layer] ** 2 / tokens.clamp(min=1)  # [E] ~ sum_t w_t^2 (exact for equal weights)
    factors_w = first_row_factors(moe, w[first], hw[first], hw[down], w[down], up_offset, sum_w2)
    floor = stats.all_experts and prior_weight > 0
    if floor:
        ha = {p: stats.hessian(layer, p, weighted=False).to(device) for p in (first, down)}
        counts = stats.hessian_tokens[layer] if stats.hessian_tokens is not None else torch.full((E,), n)
        factors_a = first_row_factors(moe, w[first], ha[first], ha[down], w[down], up_offset, counts)
        s_l = float(sum_w2.mean()) / n
        floor_scale = (prior_weight * s_l / counts.to(torch.float64).clamp(min=1)).to(device)  # [E]
    out: dict[str, dict[int, torch.Tensor]] = {}
    for proj in (first, down):
        hessians = layer_gptq_hessians(stats, layer, proj, E, settings)
        by_bits = {}
        for bits in candidates:
            dw = quant_error(w[proj], bits, settings, hessians)
            rows = row_errors(dw, hw[proj])  # [E, out]
            if proj == first:
                rows = rows * factors_w
            dmg = rows.sum(-1).to(torch.float64) / n
            if floor:
                rows_a = row_errors(dw, ha[proj])
                if proj == first:
                    rows_a = rows_a * factors_a
                dmg = torch.maximum(dmg, rows_a.sum(-1).to(torch.float64) * floor_scale)
            by_bits[bits] = torch.nan_to_num(dmg, nan=0.0, posinf=torch.finfo(torch.float64).max).cpu()
        out[proj] = non_increasing(by_bits)
    return out


def damages_to_items(moe: MoELayer, per_group: dict[str, dict[int, torch.Tensor]], combine: bool = False,
                     ) -> dict[str, dict[int, float]]:
    """Item key -> bits -> damage. One item per (expert, group), a group being a proj name or "*" (the whole
    expert); combine: one whole-expert item per expert, the sum over the groups."""
    items = {}
    for e in range(moe.num_experts):
        if combine:
            bits = next(iter(per_group.values())).keys()
            items[item_key(moe.experts_path, e, ALL_PROJS)] = {
                b: float(sum(by_bits[b][e] for by_bits in per_group.values())) for b in bits}
        else:
            for group, by_bits in per_group.items():
                items[item_key(moe.experts_path, e, group)] = {b: float(d[e]) for b, d in by_bits.items()}
    return items


def hessian_costs(model: nn.Module, layout: ModelLayout, stats: CalibrationStats, candidates: tuple[int, ...],
                  settings: QuantizerSettings, granularity: str = "expert", prior_weight: float = 0.1,
                  progress: bool = True, device: str | torch.device | None = None) -> dict[str, dict[int, float]]:
    """Item key -> bits -> damage for every routed expert of the model, from the calibration Hessians (computed
    on `device`, default: where the experts are)."""
    items = {}
    for moe in tqdm(layout.moe_layers, desc=f"sensitivity (hessian, {settings.quantizer})", unit="layer",
                    disable=not progress):
        per_proj = layer_damages(moe, model.get_submodule(moe.experts_path), stats, candidates, settings,
                                 prior_weight, UP_OFFSET.get(layout.model_type, 0.0), device)
        items.update(damages_to_items(moe, per_proj, combine=granularity == "expert"))
    return items
