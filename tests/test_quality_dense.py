"""Dense linears in the allocation: their loss-aware costs (sensitivity/linears.py) and their items in the table."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moecompress.allocate import AllocationRules, Budget, allocate
from moecompress.errors import MoecompressError
from moecompress.format.sizes import matrix_bytes
from moecompress.quantize.rtn import fake_quantize
from moecompress.sensitivity import SensitivityOptions, estimate_costs
from moecompress.sensitivity.deltas import QuantizerSettings
from moecompress.sensitivity.linears import linear_costs


class _Toy(nn.Module):
    """embedding -> tanh(linear) -> head: a causal LM call signature with one dense linear."""

    def __init__(self, vocab=40, hidden=32):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden, bias=True)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.head(torch.tanh(self.proj(self.emb(input_ids)))))


def _loss(logits, ids, mask):
    keep = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
    return F.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep], reduction="sum")


def test_linear_damage_equals_the_fisher_form_computed_by_hand():
    model = _Toy()
    ids = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # padding is left out
    settings = QuantizerSettings(group_size=16, clip="minmax")
    got = linear_costs(model, ("proj",), [(ids[:2], mask[:2]), (ids[2:], mask[2:])], (2, 3, 16), settings,
                       progress=False)["proj"]
    # by hand: z = W x + b; g = d loss / d z per token; damage = mean over kept tokens of (g . dW x)^2
    want, n = {2: 0.0, 3: 0.0}, 0
    w = model.proj.weight.detach()
    for sl in (slice(0, 2), slice(2, 3)):
        x = model.emb(ids[sl]).detach()
        z = model.proj(x).detach().requires_grad_(True)
        loss = _loss(model.head(torch.tanh(z)), ids[sl], mask[sl])
        (g,) = torch.autograd.grad(loss, z)
        keep = mask[sl].bool()
        n += int(keep.sum())
        for b in want:
            dw = fake_quantize(w, b, 16, False, "minmax") - w
            want[b] += float((((x @ dw.T) * g)[keep].sum(-1) ** 2).sum())
    assert got[16] == 0.0
    for b in want:
        assert got[b] == pytest.approx(want[b] / n, rel=1e-4)
    assert got[2] >= got[3] > 0
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored


def test_cost_table_with_attention_items_allocates_one_budget_over_both(calibrated_qwen3):
    model, layout, batches, stats = calibrated_qwen3
    attn = tuple(layout.attention_linears)
    assert attn
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opts = SensitivityOptions("loss_aware", "projection", holdout=1.0)
        table = estimate_costs(model, layout, stats, opts, (2, 4, 8, 16), 32, calibration_batches=batches,
                               progress=False, linears=attn)
        plain = estimate_costs(model, layout, stats, opts, (2, 4, 8, 16), 32, calibration_batches=batches,
                               progress=False)
    finally:
        torch.set_num_threads(n)
    lin = [it for it in table.items if it.kind == "linear"]
    assert sorted(it.path for it in lin) == sorted(attn)
    for it in lin:
        mod = model.get_submodule(it.path)
        assert it.bytes == tuple(matrix_bytes(mod.out_features, mod.in_features, b, 32, False) for b in it.bits)
        assert it.damage[-1] == 0.0 and list(it.damage) == sorted(it.damage, reverse=True)
    # the experts' items do not change when linears join the table
    assert [it for it in table.items if it.kind == "expert"] == list(plain.items)
    # a budget of experts at 3 bits plus bf16 attention: the allocation spends it on both, within it
    experts_budget = allocate(plain, Budget(avg_bits=3.0), AllocationRules(candidates=(2, 4, 8))).budget_bytes
    total = experts_budget + sum(it.bytes[-1] for it in lin)
    a = allocate(table, Budget(bytes=total), AllocationRules(candidates=(2, 4, 8, 16)))
    assert a.bytes <= total
    with pytest.raises(MoecompressError, match="loss_aware"):
        estimate_costs(model, layout, stats, SensitivityOptions("measured"), (2, 16), 32,
                       calibration_batches=batches, progress=False, linears=attn)
    with pytest.raises(MoecompressError, match="not an nn.Linear"):
        estimate_costs(model, layout, stats, opts, (2, 16), 32, calibration_batches=batches, progress=False,
                       linears=(layout.moe_layers[0].experts_path,))
