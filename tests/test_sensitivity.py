"""Sensitivity: damages fall with bits, the Hessian estimate equals brute force, measured modes agree with it."""
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moecompress.arch import describe, proj_weights
from moecompress.artifacts.cost_table import ALL_PROJS
from moecompress.calibrate import CalibrationData, CalibrationOptions, calibrate
from moecompress.errors import MoecompressError
from moecompress.quantize.rtn import fake_quantize
from moecompress.quantize.stage import expert_hessian
from moecompress.sensitivity import SensitivityOptions, estimate_costs
from moecompress.sensitivity.deltas import gptq_hessian
from moecompress.sensitivity.loss_aware import next_token_loss

GS = 32
CAND = (2, 3, 4, 8, 16)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REF_MODEL, REF_CALIB = SHARED / "models" / "refmoe-qwen3", SHARED / "data" / "corpus" / "calib.jsonl.gz"


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=16, seq=32, seed=0):
    ids = torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(seed))
    return CalibrationData(ids, torch.ones_like(ids))


def _batches(data, bs=8):
    return [(ids, mask) for ids, mask, _ in data.batches(bs)]


def _calibrate(model, data, all_experts=False):
    return calibrate(model, None, data, CalibrationOptions(samples=data.num_sequences, seq_len=data.seq_len,
                                                           batch_size=8, all_experts=all_experts, progress=False))


@pytest.fixture(scope="module")
def setup():
    """A calibrated tiny Mixtral: (model, layout, data, stats)."""
    from moecompress.arch.tiny import tiny_model

    model = tiny_model("mixtral")
    data = _data()
    return model, describe(model), data, _calibrate(model, data)


def _costs(setup, stats=None, **opts):
    model, layout, data, st = setup
    batches = _batches(data)
    return estimate_costs(model, layout, st if stats is None else stats, SensitivityOptions(**opts),
                          CAND, GS, calibration_batches=batches, progress=False)


def _by_key(table):
    return {it.key: it for it in table.items}


def _spearman(a, b):
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.mark.parametrize("method", ["hessian", "measured", "loss_aware"])
def test_damage_falls_with_bits_and_is_zero_at_16(setup, method):
    table = _costs(setup, method=method, holdout=0.5)
    assert len(table.items) == 3 * 8 and all(it.proj == ALL_PROJS for it in table.items)
    stats = setup[3]
    for it in table.items:
        assert it.bits == CAND and it.damage[-1] == 0.0
        d = torch.tensor(it.damage)
        if stats.tokens[it.layer, it.expert] > 0:
            assert (d[:-1] > 0).all() and (d[1:] < d[:-1]).all(), (it.key, it.damage)
        assert list(it.bytes) == sorted(it.bytes)


def _routed(model, layout, batches):
    """Brute force: per MoE layer, every (token, slot) the experts module got: (x [R, H], expert [R], w [R])."""
    got = {m.layer: [] for m in layout.moe_layers}
    handles = []
    for m in layout.moe_layers:
        def hook(mod, args, layer=m.layer):
            x, idx, w = args
            tok, k = torch.nonzero(torch.ones_like(idx, dtype=torch.bool), as_tuple=True)
            got[layer].append((x[tok], idx[tok, k], w[tok, k]))
        handles.append(model.get_submodule(m.experts_path).register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids, mask in batches:
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in handles:
        h.remove()
    return {l: tuple(torch.cat(c) for c in zip(*parts)) for l, parts in got.items()}


def test_hessian_down_damage_equals_brute_force(setup):
    model, layout, data, stats = setup
    table = _by_key(_costs(setup, granularity="projection"))
    routed = _routed(model, layout, _batches(data))
    n = data.input_ids.numel()
    for m in layout.moe_layers:
        experts = model.get_submodule(m.experts_path)
        w_gu = proj_weights(experts, m, "gate_up").detach().double()
        w_dn = proj_weights(experts, m, "down").detach()
        x, expert, w = routed[m.layer]
        for bits in (2, 4):
            dw = (w_dn - fake_quantize(w_dn, bits, GS, False, "mse")).double()  # down-only, the default clip
            for e in range(m.num_experts):
                sel = expert == e
                gate, up = (x[sel].double() @ w_gu[e].T).chunk(2, dim=-1)
                z = F.silu(gate) * up  # Mixtral's intermediate
                brute = float((w[sel].double() ** 2 * ((z @ dw[e].T) ** 2).sum(-1)).sum()) / n
                est = table[f"{m.experts_path}.{e}.down"].damage[CAND.index(bits)]
                assert est == pytest.approx(brute, rel=1e-4)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_measured_down_equals_hessian_down(tiny_model, model_type):
    """On the calibration sequences themselves, the measured down error is the Hessian trace (no approximation
    for down); gate_up goes through the documented gain approximation and stays within a factor 2."""
    model = tiny_model(model_type)
    layout, data = describe(model), _data(4, 32)
    setup = (model, layout, data, _calibrate(model, data))
    hess = _by_key(_costs(setup, granularity="projection"))
    meas = _by_key(_costs(setup, method="measured", granularity="projection", holdout=1.0))
    for key, it in hess.items():
        for b, dh, dm in zip(it.bits, it.damage, meas[key].damage):
            if it.proj == "down":
                assert dh == pytest.approx(dm, rel=1e-4, abs=1e-12), (key, b)
            elif b < 16 and dm > 0:
                assert 0.5 < dh / dm < 2, (key, b, dh, dm)


def test_measured_ranks_experts_like_hessian(setup):
    hess, meas = _by_key(_costs(setup)), _by_key(_costs(setup, method="measured", holdout=0.5))
    pairs = [(it.damage[i], meas[k].damage[i]) for k, it in hess.items() for i in range(len(CAND) - 1)]
    assert _spearman(*zip(*pairs)) > 0.9
    at4 = [(it.damage[CAND.index(4)], meas[k].damage[CAND.index(4)]) for k, it in hess.items()]
    assert _spearman(*zip(*at4)) > 0.5  # across experts at one bit-width, held-out half vs all calibration


def test_projection_items_sum_to_expert_items(setup):
    whole, split = _costs(setup), _by_key(_costs(setup, granularity="projection"))
    assert len(split) == 2 * len(whole.items)
    for it in whole.items:
        parts = [split[f"{it.path}.{it.expert}.{p}"] for p in ("gate_up", "down")]
        for i, d in enumerate(it.damage):
            assert d == pytest.approx(sum(p.damage[i] for p in parts), rel=1e-9)
        assert it.bytes == tuple(map(sum, zip(*(p.bytes for p in parts))))


def _without_expert(stats, layer, e):
    """Stats as if expert e of `layer` had received no token (routed counts and weighted Hessians zeroed)."""
    tokens, mass = stats.tokens.clone(), stats.mass.clone()
    tokens[layer, e], mass[layer, e] = 0, 0
    hessians = dict(stats.hessians)
    for key in [k for k in hessians if k.startswith(f"{layer}.") and k.endswith(".weighted")]:
        hessians[key] = hessians[key].clone()
        hessians[key][e] = 0
    return dataclasses.replace(stats, tokens=tokens, mass=mass, hessians=hessians)


def test_zero_token_experts_get_finite_damage_and_a_floor_with_all_experts(setup):
    model, layout, data, stats = setup
    key = f"{layout.moe_layers[0].experts_path}.3"
    plain = _by_key(_costs(setup, stats=_without_expert(stats, 0, 3)))[key]
    assert plain.damage == (0.0,) * len(CAND)  # popularity-weighted: never routed, never damaged
    all_stats = _without_expert(_calibrate(model, data, all_experts=True), 0, 3)
    floors = {}
    for prior in (0.0, 0.1, 0.2):
        table = _by_key(_costs(setup, stats=all_stats, prior_weight=prior))
        assert all(all(map(lambda d: d == d and d < float("inf"), it.damage)) for it in table.values())
        floors[prior] = torch.tensor(table[key].damage)
    assert (floors[0.0] == 0).all()
    assert (floors[0.1][:-1] > 0).all() and (floors[0.1][1:] < floors[0.1][:-1]).all()
    torch.testing.assert_close(floors[0.2], 2 * floors[0.1], rtol=1e-6, atol=0)
    # the floor stays small next to a routed expert of the layer
    other = torch.tensor(_by_key(_costs(setup, stats=all_stats, prior_weight=0.1))[f"{key[:-1]}0"].damage)
    assert floors[0.1][0] < other[0]


def test_more_popular_expert_gets_larger_damage(setup):
    """Experts 0 and 1 with equal weights; expert 1 saw every routed token of expert 0 three times."""
    model, layout, data, stats = setup
    m = layout.moe_layers[1]
    experts = model.get_submodule(m.experts_path)
    with torch.no_grad():
        for p in m.projs:
            w = proj_weights(experts, m, p)
            w[1] = w[0]
    tokens, mass, hessians = stats.tokens.clone(), stats.mass.clone(), dict(stats.hessians)
    tokens[1, 1], mass[1, 1] = 3 * tokens[1, 0], 3 * mass[1, 0]
    for key in [k for k in hessians if k.startswith("1.")]:
        hessians[key] = hessians[key].clone()
        hessians[key][1] = 3 * hessians[key][0]
    popular = dataclasses.replace(stats, tokens=tokens, mass=mass, hessians=hessians)
    table = _by_key(_costs(setup, stats=popular))
    d0, d1 = (torch.tensor(table[f"{m.experts_path}.{e}"].damage) for e in (0, 1))
    assert (d1[:-1] > d0[:-1]).all()
    torch.testing.assert_close(d1, 3 * d0, rtol=1e-5, atol=0)


def test_gptq_estimate_is_no_worse_than_rtn_and_picks_the_quantize_stage_hessian(setup):
    model, layout, data, stats = setup
    rtn = _by_key(_costs(setup, granularity="projection"))
    gptq = _by_key(estimate_costs(model, layout, stats, SensitivityOptions(granularity="projection",
                                                                            quantizer="gptq", min_tokens=4),
                                  (2, 16), GS, progress=False))
    for key, it in gptq.items():
        if stats.tokens[it.layer, it.expert] >= 4:  # GPTQ kept only where it beats RTN on this very Hessian
            assert it.damage[0] <= rtn[key].damage[0] * (1 + 1e-6)
    assert sum(it.damage[0] for it in gptq.values()) < sum(it.damage[0] for it in rtn.values())
    for m in layout.moe_layers:
        for p in m.projs:
            for e in range(m.num_experts):
                ours, theirs = gptq_hessian(stats, m.layer, p.name, e, 4), expert_hessian(stats, m.layer, p.name, e, 4)[0]
                assert (ours is None and theirs is None) or torch.equal(ours, theirs)


def test_next_token_loss_matches_the_model_loss(setup):
    model, _, data, _ = setup
    ids, mask = data.input_ids[:2], data.attention_mask[:2].clone()
    mask[1, 20:] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        labels = ids.masked_fill(mask == 0, -100)
        ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    n = int(((mask[:, 1:] > 0) & (mask[:, :-1] > 0)).sum())
    assert float(next_token_loss(logits, ids, mask)) == pytest.approx(float(ref) * n, rel=1e-5)


def test_user_errors(setup):
    model, layout, data, stats = setup
    with pytest.raises(MoecompressError, match="calibration batches"):
        estimate_costs(model, layout, stats, SensitivityOptions(method="measured"), CAND, GS, progress=False)
    with pytest.raises(MoecompressError, match="allowed: hessian, measured, loss_aware"):
        SensitivityOptions(method="fisher")
    with pytest.raises(MoecompressError, match="holdout"):
        SensitivityOptions(holdout=0)
    with pytest.raises(MoecompressError, match="group_size"):
        estimate_costs(model, layout, stats, SensitivityOptions(), CAND, 48, progress=False)
    with pytest.raises(MoecompressError, match="candidate bits"):
        estimate_costs(model, layout, stats, SensitivityOptions(), (5,), GS, progress=False)


@pytest.mark.slow
@pytest.mark.skipif(not (REF_MODEL.is_dir() and REF_CALIB.is_file()), reason="../shared reference absent")
def test_reference_model_measured_ranks_experts_like_hessian():
    """On the trained reference MoE, the Hessian estimate (calibration text) ranks the 96 experts at each
    bit-width like the measured block error on other sequences (seen: Spearman ~0.91 here, ~0.85 with
    128 x 256 calibration and 16 x 256 held-out tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecompress.calibrate import build_calibration_data

    model = AutoModelForCausalLM.from_pretrained(REF_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(REF_MODEL)
    layout = describe(model)
    stats = calibrate(model, tok, str(REF_CALIB), CalibrationOptions(samples=32, seq_len=128, progress=False))
    held = build_calibration_data(str(REF_CALIB), tok, 8, 128, seed=1)
    batches = [(ids, mask) for ids, mask, _ in held.batches(8)]
    cand = (2, 3, 4, 16)
    hess = _by_key(estimate_costs(model, layout, stats, SensitivityOptions(), cand, 64, progress=False))
    meas = _by_key(estimate_costs(model, layout, stats, SensitivityOptions(method="measured", holdout=1.0), cand, 64,
                                  calibration_batches=batches, progress=False))
    for i in range(len(cand) - 1):
        assert _spearman([it.damage[i] for it in hess.values()], [meas[k].damage[i] for k in hess]) > 0.7
