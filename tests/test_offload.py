"""One decoder layer on the device at a time (pipeline/offload.py), run on the CPU through the same code path: the
layer computes on copies of its host tensors made at its forward, one layer at a time, and every stage gives the
same numbers as with the whole model on one device."""
from __future__ import annotations

import pytest
import torch

from moecompress.arch.adapters import describe
from moecompress.calibrate.options import CalibrationOptions
from moecompress.calibrate.run import calibrate
from moecompress.pipeline.offload import LayerOffload, model_bytes, wants_offload
from moecompress.quantize.stage import QuantizeOptions, quantize_model
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.sensitivity import SensitivityOptions, estimate_costs

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(vocab: int, n: int = 2):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, 4, 16), generator=g)
    mask = torch.ones(n, 4, 16, dtype=torch.int64)
    mask[0, 1, 12:] = 0
    return [(ids[i], mask[i]) for i in range(n)]


def test_forward_loads_one_layer_at_a_time_on_copies(tiny_model):
    model = tiny_model("qwen3_moe")
    layout = describe(model)
    ids, mask = _batches(model.config.vocab_size)[0]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    layers = list(model.get_submodule(layout.decoder_layers_path))
    host = {id(p): p.data_ptr() for p in model.parameters()}
    seen, log = [], []
    probe = layers[1].self_attn.register_forward_pre_hook(  # inside the layer's forward: the copies are in place
        lambda m, a: seen.append(all(p.data_ptr() != host[id(p)] for p in layers[1].parameters())))
    try:
        with LayerOffload(model, layout, "cpu", log=log), torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
    finally:
        probe.remove()
    assert torch.equal(out, ref)
    n = len(layers)
    assert log == [(what, i) for i in range(n) for what in ("load", "unload")]  # never two layers at once
    assert seen == [True]
    assert all(p.data_ptr() == host[id(p)] for p in model.parameters())  # the host storage is back, unchanged
    assert not any(h for layer in layers for h in layer._forward_pre_hooks.values())


def test_stages_equal_the_whole_model_path(tiny_model):
    model = tiny_model("olmoe")
    layout = describe(model)
    batches = _batches(model.config.vocab_size)
    data = [(i, m) for i, m in batches]
    opts = CalibrationOptions(samples=8, seq_len=16, batch_size=4, all_experts=True, progress=False)

    def stages():
        from moecompress.calibrate.dataset import CalibrationData

        cd = CalibrationData(torch.cat([i for i, _ in data]), torch.cat([m for _, m in data]))
        stats = calibrate(model, None, cd, opts)
        costs = {m: estimate_costs(model, layout, stats, SensitivityOptions(m, "projection", holdout=1.0),
                                   candidates=(2, 3, 16), group_size=16, calibration_batches=data, progress=False)
                 for m in ("loss_aware", "kl")}
        q = quantize_model(model, layout, BitPlan.uniform(layout, 3, 16), stats, QuantizeOptions(), progress=False,
                           device="cpu")
        return stats, costs, q

    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = stages()
    with LayerOffload(model, layout, "cpu"):
        off = stages()
    for k, v in model.state_dict().items():  # the kl method's candidate weights were restored on the host
        assert torch.equal(v, before[k]), k
    assert torch.equal(plain[0].tokens, off[0].tokens)
    for m in layout.moe_layers:
        for p in m.projs:
            torch.testing.assert_close(off[0].hessian(m.layer, p.name, weighted=True),
                                       plain[0].hessian(m.layer, p.name, weighted=True), rtol=1e-6, atol=1e-7)
    for method in ("loss_aware", "kl"):  # the loss-aware backward ran through the host-saved tensors
        a, b = plain[1][method].items, off[1][method].items
        assert [it.key for it in a] == [it.key for it in b]
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(y.damage), torch.tensor(x.damage), rtol=1e-5, atol=1e-12)
    assert plain[2].weights.keys() == off[2].weights.keys()
    for k, w in plain[2].weights.items():
        assert torch.equal(w.q, off[2].weights[k].q) and torch.equal(w.scales, off[2].weights[k].scales), k


def test_when_to_offload(tiny_model):
    model = tiny_model("qwen3_moe")
    n = model_bytes(model)
    assert n == sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert not wants_offload("none", "cuda", n) and wants_offload("layer", "cpu", n)
    assert not wants_offload("auto", "cpu", n)  # host memory is where the model is anyway


@pytest.mark.slow  # two runs of calibrate .. quantize on a tiny model: ~30 s of CPU
def test_pipeline_offload_equals_whole_model(tmp_path_factory):
    from helpers import make_job_inputs

    from moecompress.artifacts.calibration_stats import CalibrationStats
    from moecompress.artifacts.cost_table import CostTable
    from moecompress.artifacts.quantized import QuantizedTensors
    from moecompress.errors import MoecompressError
    from moecompress.pipeline import quantize
    from moecompress.recipe import recipe_from_dict

    inputs = make_job_inputs(tmp_path_factory.mktemp("offload"), 20, 400)
    runs = {}
    for mode in ("none", "layer"):
        recipe = recipe_from_dict({
            "model": str(inputs / "model"), "output": str(inputs / mode), "dtype": "float32", "offload": mode,
            "calibration": {"dataset": str(inputs / "data.jsonl.gz"), "samples": 8, "seq_len": 32, "batch_size": 4,
                            "held_back": 0.3},
            "sensitivity": {"method": "loss_aware", "granularity": "projection", "holdout": 0.5},
            "allocation": {"budget": {"avg_bits": 3.5}, "candidates": [2, 3, 4, 8]},
            "quantize": {"method": "gptq", "group_size": 32}, "tune": {"steps": 0}})
        run = quantize(recipe, stop_after="quantize", progress=False)
        runs[mode] = (CostTable.load(run / "sensitivity" / "cost_table.json"), QuantizedTensors.load(run / "quantized"))
        # GPTQ's statistics saw all 8 sequences; the sensitivity's candidates those of the 4 fit sequences only
        assert CalibrationStats.load(run / "calibration").samples == 8
        assert CalibrationStats.load(run / "calibration" / "fit").samples == 4
        if mode == "layer":  # the fit statistics are checked with the stage when a run resumes
            quantize(recipe, stop_after="quantize", progress=False)
            with open(run / "calibration" / "fit" / "summary.json", "a") as f:
                f.write(" ")
            with pytest.raises(MoecompressError, match="summary.json"):
                quantize(recipe, stop_after="quantize", progress=False)
    (ca, qa), (cb, qb) = runs["none"], runs["layer"]
    assert "holdout=1" in ca.method  # every held-back sequence, none of the calibration's
    for x, y in zip(ca.items, cb.items, strict=True):
        assert x.key == y.key
        torch.testing.assert_close(torch.tensor(y.damage), torch.tensor(x.damage), rtol=1e-5, atol=1e-12)
    assert qa.weights.keys() == qb.weights.keys()
    for k, w in qa.weights.items():
        assert torch.equal(w.q, qb.weights[k].q) and torch.equal(w.scales, qb.weights[k].scales), k


def test_recipe_and_cli_offload_values(tmp_path, capsys):
    import yaml

    from moecompress.cli import main
    from moecompress.errors import MoecompressError
    from moecompress.recipe import recipe_from_dict

    base = {"model": "m", "output": str(tmp_path / "o")}
    assert recipe_from_dict(base).offload == "none" and recipe_from_dict({**base, "offload": "auto"}).offload == "auto"
    with pytest.raises(MoecompressError, match="recipe key offload: .*allowed: none, layer, auto"):
        recipe_from_dict({**base, "offload": "disk"})
    if not torch.cuda.is_available():  # --offload reaches the recipe; a CUDA device is still refused up front
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(base))
        assert main(["quantize", "--recipe", str(recipe), "--offload", "layer", "--device", "cuda", "--quiet"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err and not (tmp_path / "o").exists()
