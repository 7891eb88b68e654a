"""The GPU tier on the slot table (runtime/store/slots.py, gpu_layer.py): decode steps computed by the CUDA pair path
over the device slots plus the pinned host copy equal the fully resident model's (the same kernels) bit for bit at
every budget and policy, and a step adds no host sync to the resident model's. Needs CUDA and Triton (skipped
without); the index logic is tested on the CPU in test_store_slots.py."""
from __future__ import annotations

import warnings

import pytest
import torch

import moecompress
from moecompress.runtime import cuda
from moecompress.runtime.experts.packed_experts import PackedExperts
from moecompress.runtime.store import StoreConfig, attach_store, detach_store

from helpers import decode_logits
from test_store_slots import build_packed_checkpoint

pytestmark = pytest.mark.skipif(not cuda.available(), reason=f"GPU slot table: {cuda.unavailable_reason()}")
STEPS = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_packed_checkpoint(tmp_path_factory.mktemp("gpu_slots") / "ck", dtype=torch.bfloat16)


def _model(ckpt):
    return moecompress.from_pretrained(ckpt, dtype=torch.bfloat16, verify=False, device_map="cuda").eval()


@pytest.fixture(scope="module")
def reference(ckpt):
    ids = torch.randint(0, 100, (1, STEPS), generator=torch.Generator().manual_seed(0)).cuda()
    return ids, decode_logits(_model(ckpt), ids)


@pytest.mark.parametrize("graphs", [False, True])  # True: each layer call one CUDA graph replay (slot_graphs.py)
def test_slot_path_equals_the_resident_kernels_at_every_budget(ckpt, reference, graphs):
    ids, ref = reference
    model = _model(ckpt)
    modules = [m for m in model.modules() if isinstance(m, PackedExperts)]
    probe = attach_store(model, ckpt, StoreConfig(budget=1 << 40, tier="pinned", gpu_slots=True))
    total, smallest, tier = sum(probe.cache.layout.nbytes.values()), probe.cache.min_budget, probe.cache.tier
    detach_store(modules)
    for budget, fields in ((smallest, dict(policy="lru")), (total // 4, dict(prefetch="router", pin_share=0.5)),
                           (total // 2, dict(policy="lfu", prefetch="paths")), (total // 2, dict(policy="demand")),
                           (total, dict(policy="lru"))):
        config = StoreConfig(budget=budget, tier="pinned", gpu_slots=True, gpu_graphs=graphs, **fields)
        store = attach_store(model, ckpt, config, tier=tier)
        tier = store.cache.tier
        try:
            assert store.slot_path is not None
            got = decode_logits(model, ids)
            c = store.counters()
        finally:
            detach_store(modules)
        assert c["slot_error"] is None, c["slot_error"]  # the slot path ran (no fallback to the per-expert one)
        assert c["graph_error"] is None, c["graph_error"]  # (graphs: every call a replay, none fell back)
        if graphs:
            calls = store.slot_path.layers.graphs.values()
            assert sum(g.submitted for g in calls) == STEPS * len(modules)  # every decode call replayed a graph
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), (budget, fields)
        assert c["peak_bytes"] <= budget and c["uses"] > 0
        table = store.slot_path.table  # per projection and width a pool within the budget (test_store_slots.py)
        assert table.device_bytes <= len(table.pools) * budget
        if budget < total // 2:
            assert c["misses"] > 0  # misses computed from the host copy, its time measured (graphs: where torch can)
            assert c["stall_s"] > 0 or (graphs and not store.slot_path.graph_timing)
        if budget == total:
            assert c["hits"] > c["misses"]


PREDICT = dict(policy="lru", prefetch="router", prefetch_refine=True, prefetch_min_precision=0.5, gpu_graphs=True,
               graph_prediction=True)


@pytest.mark.parametrize("graphs", [False, True, "predict"])  # predict: + the router prediction inside the graphs
def test_a_step_adds_no_host_sync(ckpt, reference, graphs):
    """With every expert resident, a decode step synchronizes the host no more often than the resident model's."""
    ids, _ = reference
    resident = _model(ckpt)
    model = _model(ckpt)
    modules = [m for m in model.modules() if isinstance(m, PackedExperts)]
    fields = PREDICT if graphs == "predict" else dict(policy="lru", gpu_graphs=graphs)
    store = attach_store(model, ckpt, StoreConfig(budget=1 << 40, tier="pinned", gpu_slots=True, **fields))
    try:
        decode_logits(model, ids[:, :4])  # every expert read in and seen resident (the host-memory plan skipped)
        decode_logits(model, ids[:, :4])
        store.counters()  # the bookkeeping thread idle
        counts = []
        for m in (resident, model):
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    decode_logits(m, ids[:, :2])
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
        assert counts[1] <= counts[0], counts
    finally:
        detach_store(modules)


@pytest.mark.parametrize("wrong", [False, True])
def test_graph_prediction_is_the_routers_and_never_changes_outputs(ckpt, reference, wrong):
    """StoreConfig(graph_prediction=True): each layer's graph writes layer l+1's prediction: the first equal (as a
    set) to the top-k of RouterPredictor.scores on the call's input; the bookkeeping thread reads ahead from it; the
    logits equal the resident model's with the model's routers and with random ones."""
    from moecompress.runtime.store.prefetch import RouterPredictor

    ids, ref = reference
    model = _model(ckpt)
    modules = [m for m in model.modules() if isinstance(m, PackedExperts)]
    probe = attach_store(model, ckpt, StoreConfig(budget=1 << 40, tier="pinned", **PREDICT))
    total, tier, predictor = sum(probe.cache.layout.nbytes.values()), probe.cache.tier, probe.predictor
    detach_store(modules)
    if wrong:
        gen = torch.Generator().manual_seed(1)
        predictor = RouterPredictor([None if r is None else torch.randn(r.shape, generator=gen).to(r) for r in
                                     predictor.routers], predictor.norms, predictor.eps)
    inputs: dict = {}  # layer -> the experts' inputs, call by call
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: inputs.setdefault(i, []).append(args[0].clone()))
             for i, m in enumerate(modules)]
    store = attach_store(model, ckpt, StoreConfig(budget=total // 2, tier="pinned", pin_share=0.5, **PREDICT),
                         predictor=predictor, tier=tier)
    predicted: dict = {}
    account, book = store.slot_path.account, store.slot_path.book

    def logged(r):
        if r.predicted is not None:
            predicted.setdefault(r.layer, []).append(r.predicted[0].tolist())
        account(r)

    book.handle = logged
    try:
        got = decode_logits(model, ids)
        c = store.counters()
        queued = len(store.prefetcher.requests)  # (the prefetch threads': the bookkeeping thread read ahead itself)
    finally:
        for h in hooks:
            h.remove()
        detach_store(modules)
    assert c["graph_error"] is None and c["slot_error"] is None
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert c["prefetches"] > 0 and queued == 0
    last = len(modules) - 1
    assert set(predicted) == set(range(last))  # every layer but the last predicts its successor
    for layer, calls in predicted.items():
        assert len(calls) == STEPS
        for x, got_ids in zip(inputs[layer], calls):
            scores = predictor.scores(layer, x.reshape(-1, x.shape[-1]), None, None)
            assert set(got_ids) == set(torch.topk(scores, len(got_ids)).indices.tolist())
