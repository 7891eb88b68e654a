"""Test helpers: mixed bit plans and fake-quantized references for tiny models."""
from __future__ import annotations

import copy

import torch

from moecompress.arch.adapters import describe, proj_weights, set_proj_weights
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.artifacts.quantized import expert_key
from moecompress.quantize.stage import QuantizeOptions, quantize_model

MIXED = (2, 3, 4, 8, 16)


def mixed_plan(layout, group_size: int = 32, symmetric: bool = False, linears: dict | None = None) -> BitPlan:
    """Every bit-width in every layer: expert e of layer l gets MIXED[(e + l + proj) % 5]."""
    experts = {
        m.experts_path: {p.name: tuple(MIXED[(e + m.layer + j) % len(MIXED)] for e in range(m.num_experts))
                         for j, p in enumerate(m.projs)}
        for m in layout.moe_layers
    }
    return BitPlan(group_size=group_size, symmetric=symmetric, experts=experts, linears=linears or {})


def fake_quant_reference(model, layout, plan: BitPlan, quantized):
    """A copy of `model` whose quantized weights are replaced by their dequantized values (float)."""
    ref = copy.deepcopy(model)
    for m in layout.moe_layers:
        experts = ref.get_submodule(m.experts_path)
        for p in m.projs:
            w = proj_weights(experts, m, p.name).detach().clone()
            for e, bits in enumerate(plan.experts[m.experts_path][p.name]):
                if bits != 16:
                    w[e] = quantized.weights[expert_key(m.experts_path, p.name, e)].dequantize(w.dtype)
            set_proj_weights(experts, m, p.name, w)
    with torch.no_grad():
        for path, bits in plan.linears.items():
            if bits != 16:
                lin = ref.get_submodule(path)
                lin.weight.copy_(quantized.weights[path].dequantize(lin.weight.dtype))
    return ref


def quantize_tiny(model, plan: BitPlan | None = None, linears: dict | None = None, method: str = "rtn", stats=None):
    layout = describe(model)
    plan = plan or mixed_plan(layout, linears=linears)
    quantized = quantize_model(model, layout, plan, stats, QuantizeOptions(method=method), progress=False)
    return layout, plan, quantized
