"""The recipe's sensitivity.quantizer reaches the sensitivity stage: gptq costs are those of GPTQ's weights."""
from __future__ import annotations

from pathlib import Path

import pytest

from moecompress.artifacts.cost_table import CostTable
from moecompress.errors import MoecompressError
from moecompress.pipeline import quantize
from moecompress.recipe import Quantizer, load_recipe, recipe_from_dict
from helpers import make_job_inputs

ROOT = Path(__file__).resolve().parents[1]


def _recipe(inputs: Path, out: str, quantizer: str | None) -> dict:
    sens = {"method": "loss_aware", "granularity": "projection", "holdout": 0.5}
    return {"model": str(inputs / "model"), "output": str(inputs / out), "dtype": "float32",
            "calibration": {"dataset": str(inputs / "data.jsonl.gz"), "samples": 8, "seq_len": 32, "batch_size": 4},
            "sensitivity": sens if quantizer is None else {**sens, "quantizer": quantizer},
            "allocation": {"budget": {"avg_bits": 3.5}, "candidates": [2, 3, 4, 8]},
            "quantize": {"method": "gptq", "group_size": 32}, "tune": {"steps": 0}}


@pytest.mark.slow  # two calibrate+sensitivity runs: ~20 s of CPU
def test_sensitivity_quantizer_from_the_recipe(tmp_path_factory):
    inputs = make_job_inputs(tmp_path_factory.mktemp("sens"), 20, 400)
    tables = {}
    for q in (None, "gptq"):
        run = quantize(recipe_from_dict(_recipe(inputs, f"q-{q}", q)), stop_after="sensitivity", progress=False)
        tables[q] = CostTable.load(run / "sensitivity" / "cost_table.json")
    assert "loss_aware rtn" in tables[None].method  # the default stays the fast RTN proxy
    assert "loss_aware gptq" in tables["gptq"].method
    plain = [d for it in tables[None].items for d in it.damage]
    gptq = [d for it in tables["gptq"].items for d in it.damage]
    assert len(plain) == len(gptq) and plain != gptq
    # GPTQ leaves less output error than RTN: the 2-bit damages fall in total
    assert sum(it.damage[0] for it in tables["gptq"].items) < sum(it.damage[0] for it in tables[None].items)
    with pytest.raises(MoecompressError, match="sensitivity.quantizer"):
        recipe_from_dict(_recipe(inputs, "bad", "awq"))


def test_reference_recipe_costs_gptq_weights():
    r = load_recipe(ROOT / "recipes" / "refmoe-qwen3.yaml")
    assert r.sensitivity.quantizer is Quantizer.GPTQ and r.quantize.method.value == "gptq"
