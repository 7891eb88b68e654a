"""KL sensitivity (sensitivity/kl.py): each damage is the model's next-token KL with that one item quantized."""
import copy

import pytest
import torch
import torch.nn.functional as F

from moecompress.arch import describe, proj_weights
from moecompress.calibrate import CalibrationData, CalibrationOptions, calibrate
from moecompress.errors import MoecompressError
from moecompress.quantize.rtn import fake_quantize
from moecompress.sensitivity import SensitivityOptions, estimate_costs
from moecompress.sensitivity.deltas import QuantizerSettings, layer_gptq_hessians, quantized
from moecompress.sensitivity.kl import _merged

GS = 32
CAND = (2, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    """A calibrated tiny Mixtral (all-experts Hessians) with its batches: (model, layout, batches, stats)."""
    from moecompress.arch.tiny import tiny_model

    model = tiny_model("mixtral")
    ids = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    data = CalibrationData(ids, torch.ones_like(ids))
    stats = calibrate(model, None, data, CalibrationOptions(samples=16, seq_len=32, batch_size=8, all_experts=True,
                                                            progress=False))
    return model, describe(model), [(i, m) for i, m, _ in data.batches(8)], stats


def _kl_by_hand(model, ids, mask, reference):
    """Mean KL(p_reference || p_model) over the next-token positions, computed directly in float64."""
    with torch.no_grad():
        lp = F.log_softmax(reference(input_ids=ids, attention_mask=mask).logits[:, :-1].double(), -1)
        lq = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_damage_is_the_kl_with_that_item_alone_quantized(setup, quantizer):
    model, layout, batches, stats = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = estimate_costs(model, layout, stats, SensitivityOptions("kl", "projection", quantizer, holdout=0.5),
                           CAND, GS, calibration_batches=batches, progress=False)
    # the model is restored exactly
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    by_key = {it.key: it for it in table.items}
    moe = layout.moe_layers[1]
    ids, mask = batches[-1]  # holdout 0.5 of 2 batches = the last one
    settings = QuantizerSettings(GS, False, quantizer)
    for proj, e in ((moe.projs[0].name, 0), (moe.projs[-1].name, 5)):
        item = next(it for it in table.items if it.path == moe.experts_path and it.proj == proj and it.expert == e)
        assert item is by_key[item.key]
        other = copy.deepcopy(model)
        w = proj_weights(other.get_submodule(moe.experts_path), moe, proj)
        with torch.no_grad():
            h = layer_gptq_hessians(stats, moe.layer, proj, moe.num_experts, settings)
            w[e].copy_(quantized(w.detach().clone(), 2, settings, h)[e])
        want = _kl_by_hand(other, ids, mask, model)
        got = dict(zip(item.bits, item.damage))
        assert want > 0
        assert got[2] == pytest.approx(want, rel=1e-4, abs=1e-9)
        assert got[16] == 0.0


def test_gptq_costs_see_what_gptq_leaves(setup):
    """With the gptq quantizer the 2-bit KL differs from RTN's (other weights), and is lower in total: GPTQ leaves
    less output error than round-to-nearest."""
    model, layout, batches, stats = setup
    tables = {q: estimate_costs(model, layout, stats, SensitivityOptions("kl", "expert", q, holdout=0.5), (2, 16), GS,
                                calibration_batches=batches, progress=False) for q in ("rtn", "gptq")}
    total = {q: sum(it.damage[0] for it in t.items) for q, t in tables.items()}
    assert total["gptq"] < total["rtn"]
    # whole-expert items quantize every projection of the expert together
    moe, e = layout.moe_layers[0], 3
    other = copy.deepcopy(model)
    experts = other.get_submodule(moe.experts_path)
    with torch.no_grad():
        for p in moe.projs:
            w = proj_weights(experts, moe, p)
            w[e].copy_(fake_quantize(w[e:e + 1].detach().clone(), 2, GS, False, "mse")[0])
    item = next(it for it in tables["rtn"].items if it.path == moe.experts_path and it.expert == e)
    assert item.damage[0] == pytest.approx(_kl_by_hand(other, *batches[-1], model), rel=1e-4, abs=1e-9)


def test_merged_batches_and_refusals(setup):
    model, layout, batches, stats = setup
    a = [(torch.arange(8).view(2, 4), torch.ones(2, 4)), (torch.arange(8, 16).view(2, 4), torch.ones(2, 4)),
         (torch.arange(6).view(2, 3), torch.ones(2, 3))]
    merged = _merged(a, chunk_tokens=16)
    assert [tuple(i.shape) for i, _ in merged] == [(4, 4), (2, 3)]
    assert torch.equal(merged[0][0], torch.arange(16).view(4, 4))
    assert [tuple(i.shape) for i, _ in _merged(a, chunk_tokens=8)] == [(2, 4), (2, 4), (2, 3)]
    with pytest.raises(MoecompressError, match="no context_model"):
        estimate_costs(model, layout, stats, SensitivityOptions("kl", "expert"), CAND, GS,
                       calibration_batches=batches, progress=False, context_model=copy.deepcopy(model))
    with pytest.raises(MoecompressError, match="loss_aware"):
        estimate_costs(model, layout, stats, SensitivityOptions("kl", "expert"), CAND, GS,
                       calibration_batches=batches, progress=False, linears=(layout.attention_linears[0],))


@pytest.mark.parametrize("method", ["loss_aware", pytest.param("kl", marks=pytest.mark.slow)])
def test_candidate_weights_make_costs_quantizer_exact(setup, method):
    """Given weights equal to the simulated GPTQ ones, the costs are the simulated ones exactly; given other weights
    (here RTN's), the costs are those of the given weights; the label says "exact"."""
    model, layout, batches, stats = setup
    settings = QuantizerSettings(GS, False, "gptq")

    def given(quantizer):
        s = QuantizerSettings(GS, False, quantizer)

        def weights(moe, proj, bits):
            w = proj_weights(model.get_submodule(moe.experts_path), moe, proj).detach().clone()
            return quantized(w, bits, s, layer_gptq_hessians(stats, moe.layer, proj, moe.num_experts, s))
        return weights

    def costs(quantizer, weights=None):
        granularity = "projection" if method == "loss_aware" else "expert"  # kl: one forward per item, keep it short
        t = estimate_costs(model, layout, stats, SensitivityOptions(method, granularity, quantizer, holdout=0.5),
                           (2, 16), GS, calibration_batches=batches, progress=False, candidate_weights=weights)
        return t, [d for it in t.items for d in it.damage]

    sim_gptq, sim_rtn = costs("gptq")[1], costs("rtn")[1]
    table, exact = costs("gptq", given("gptq"))
    assert "exact" in table.method and settings.quantizer == "gptq"
    assert exact == pytest.approx(sim_gptq, rel=1e-6, abs=1e-12)
    assert costs("gptq", given("rtn"))[1] == pytest.approx(sim_rtn, rel=1e-6, abs=1e-12)
    assert sim_rtn != pytest.approx(sim_gptq, rel=1e-3)
    with pytest.raises(MoecompressError, match="candidate_weights"):
        estimate_costs(model, layout, stats, SensitivityOptions("hessian"), (2, 16), GS, progress=False,
                       candidate_weights=given("rtn"))
