"""The robust-costs screen's pieces (eval/bench_quality_robust.py): capture subsets by token, a cost table's damages
replaced column by column, row labels merged across calibration seeds, the oracle's token order and domain mix."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moecompress.allocate.robust import DomainCosts
from moecompress.artifacts.cost_table import CostItem, CostTable
from moecompress.sensitivity.capture import LayerCapture

_root = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_root / "eval"))  # the bench imports its siblings
_spec = importlib.util.spec_from_file_location("bench_quality_robust", _root / "eval/bench_quality_robust.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_subset_keeps_the_selected_tokens_of_every_layer():
    cap = LayerCapture(torch.arange(12.).reshape(6, 2), torch.arange(6).reshape(6, 1), torch.ones(6, 1),
                       -torch.arange(12.).reshape(6, 2))
    sel = torch.tensor([True, False, True, False, False, True])
    (sub,) = bench.subset([cap], sel)
    assert sub.num_tokens == 3
    assert sub.top_k_index.flatten().tolist() == [0, 2, 5]
    assert torch.equal(sub.grad, -sub.hidden)


def test_with_damage_replaces_the_candidates_and_keeps_16_bits_free():
    item = CostItem("expert", "m.experts", "down_proj", 0, 0, 64, (2, 3, 4, 8, 16), (5., 4, 3, 2, 0),
                    (10, 14, 18, 34, 128))
    table = bench.with_damage(CostTable(64, False, "x", (item,)), np.array([[9., 8, 7, 6]]), "new")
    assert table.items[0].damage == (9., 8, 7, 6, 0.0)
    assert table.items[0].bytes == item.bytes and table.method == "new"


def test_family_drops_the_picked_setting():
    assert bench.family("ours robust (kappa 300, tau 1)") == "ours robust (picked)"
    assert bench.family("ours pooled") == "ours pooled"


def test_token_sequences_follow_the_kept_tokens_in_batch_order():
    masks = [torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.tensor([[1, 0, 0]])]
    batches = [(None, m, None) for m in masks]
    assert bench.token_sequences(batches).tolist() == [0, 0, 1, 1, 1, 2]


def _domains(names, tokens) -> DomainCosts:
    n = len(names)
    return DomainCosts(tuple(names), (2, 3, 4, 8), np.zeros(1, dtype=int), np.ones((n, 1, 4)), np.ones((n, 1)),
                       np.array(tokens, dtype=float))


def test_eval_mix_puts_the_eval_shares_on_the_calibration_domains():
    calib = _domains(["a", "b", "c"], [10, 10, 10])
    mix = bench.eval_mix(calib, _domains(["c", "a"], [30, 10]))
    np.testing.assert_allclose(mix, [0.25, 0.0, 0.75])
    with pytest.raises(SystemExit, match="'z'"):  # an eval domain without calibration costs stops the oracle
        bench.eval_mix(calib, _domains(["a", "z"], [1, 1]))
