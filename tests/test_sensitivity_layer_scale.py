"""Layer-calibrated costs (sensitivity/layer_scale.py): each MoE layer's damages rescaled so that, summed over the
layer at 2 and 3 bits, they equal the measured KL with the whole layer quantized."""
from __future__ import annotations

import pytest
import torch

from moecompress.arch.adapters import describe, proj_weights
from moecompress.sensitivity import SensitivityOptions, estimate_costs
from moecompress.sensitivity.deltas import QuantizerSettings, quantized
from moecompress.sensitivity.kl import HeldOut
from moecompress.sensitivity.layer_scale import layer_factors, layer_kl, scale_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(vocab: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, vocab, (2, 12), generator=g), torch.ones(2, 12, dtype=torch.int64)) for _ in range(2)]


def test_layer_kl_equals_the_kl_by_hand(tiny_model):
    model = tiny_model("qwen3_moe")
    layout = describe(model)
    batches = _batches(model.config.vocab_size)
    settings = QuantizerSettings(group_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kl = layer_kl(model, layout, batches, (2,), settings)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # restored
    moe = layout.moe_layers[1]
    experts = model.get_submodule(moe.experts_path)
    held = HeldOut(model, batches)
    with torch.no_grad():
        for p in moe.projs:
            w = proj_weights(experts, moe, p)
            w.copy_(quantized(w.detach().float(), 2, settings).to(w))
        by_hand = held.kl()
    assert by_hand > 0
    assert kl[1][2] == pytest.approx(by_hand, rel=1e-6)


def test_scaled_costs_match_the_layer_kl_and_keep_the_ranking(tiny_model):
    model = tiny_model("olmoe")
    layout = describe(model)
    batches = _batches(model.config.vocab_size)
    opts = dict(candidates=(2, 3, 4, 16), group_size=16, calibration_batches=batches, progress=False)
    plain = estimate_costs(model, layout, None, SensitivityOptions("loss_aware", "projection", holdout=1.0), **opts)
    scaled = estimate_costs(model, layout, None, SensitivityOptions("loss_aware", "projection", holdout=1.0,
                                                                    layer_scale=True), **opts)
    assert "layer-scaled x(" in scaled.method
    kl = layer_kl(model, layout, batches, (2, 3), QuantizerSettings(group_size=16))
    for moe in layout.moe_layers:
        a = [it for it in plain.items if it.path == moe.experts_path]
        b = [it for it in scaled.items if it.path == moe.experts_path]
        factor = b[0].damage[0] / a[0].damage[0]
        for x, y in zip(a, b):  # one factor per layer: the ranking inside the layer is unchanged
            assert y.damage == pytest.approx(tuple(d * factor for d in x.damage), rel=1e-9)
        measured = kl[moe.layer][2] + kl[moe.layer][3]
        assert sum(it.damage[0] + it.damage[1] for it in b) == pytest.approx(measured, rel=1e-5)


def test_factors_and_scaling_by_hand(tiny_model):
    layout = describe(tiny_model("qwen3_moe"))
    p0, p1 = (m.experts_path for m in layout.moe_layers[:2])
    damage = {f"{p0}.0.down": {2: 1.0, 3: 0.5}, f"{p0}.1.down": {2: 3.0, 3: 0.5}, f"{p1}.0.down": {2: 0.0, 3: 0.0},
              "model.layers.0.self_attn.q_proj": {2: 7.0, 3: 1.0}}
    kl = {m.layer: {2: 1.0, 3: 1.0} for m in layout.moe_layers}
    f = layer_factors(damage, layout, kl)
    assert f[0] == pytest.approx(2.0 / 5.0) and f[1] == 1.0  # a layer predicted at 0 keeps factor 1
    out = scale_layers(damage, layout, f)
    assert out[f"{p0}.1.down"] == {2: pytest.approx(1.2), 3: pytest.approx(0.2)}
    assert out["model.layers.0.self_attn.q_proj"] == damage["model.layers.0.self_attn.q_proj"]  # linears untouched
