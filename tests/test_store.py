"""The tiered expert store (runtime/store/): exact outputs under every exact policy and budget, the budget held, wrong
predictions harmless, low-bit substitution only under its threshold, the smallest workable budget."""
from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

import moecompress
from moecompress.arch.adapters import describe, proj_weights
from moecompress.errors import MoecompressError
from moecompress.export.checkpoint import export_checkpoint
from moecompress.format.expert_stats import ExpertStats, write_expert_stats
from moecompress.quantize.rtn import quantize_rtn
from moecompress.runtime.experts.packed_experts import PackedExperts
from moecompress.runtime.store import StoreConfig, attach_store

from helpers import quantize_tiny

STEPS = 3  # decode steps after the prompt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small qwen3_moe checkpoint with every bit-width (float32), its statistics, and 2-bit RTN copies. Every
    projection has at least 256 outputs, as in real models: see store.py on exactness and kernel threading."""
    from conftest import _build

    model = _build("qwen3_moe", hidden_size=256, moe_intermediate_size=128, intermediate_size=128)
    layout, plan, quantized = quantize_tiny(model)
    out = tmp_path_factory.mktemp("store") / "ck"
    export_checkpoint(model, layout, plan, quantized, out, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    L, E = len(layout.moe_layers), layout.moe_layers[0].num_experts
    stats = ExpertStats.from_counts(torch.rand(L, E, generator=gen), torch.randint(0, 9, (L, E), generator=gen),
                                    torch.rand(L - 1, E, E, generator=gen))
    write_expert_stats(out, stats)
    copies = {}
    for layer, m in enumerate(layout.moe_layers):
        experts = model.get_submodule(m.experts_path)
        copies[layer] = {}
        for p in m.projs:
            qw = quantize_rtn(proj_weights(experts, m, p.name).detach().float(), 2, plan.group_size, plan.symmetric)
            copies[layer][p.name] = {"bits": 2, "qweight": qw.packed(), "scales": qw.scales, "zeros": qw.zeros}
    return out, copies


def _load(ckpt_dir):
    """A fresh fully resident model. Loaded, not deep-copied: a copy moves the memory-mapped weights to other
    addresses, and a one-row float GEMV may sum in another order at another alignment."""
    return moecompress.from_pretrained(ckpt_dir, dtype=torch.float32, verify=False).eval()


def _run(model) -> list[torch.Tensor]:
    """Prompt logits, then STEPS greedy decode steps with a KV cache: every step's logits."""
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 8], [1, 2, 3, 4, 5, 6, 7, 9]])
    outs = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        outs.append(out.logits)
        past = out.past_key_values
        for _ in range(STEPS):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, cache=past, use_cache=True)
            past = out.past_key_values
            outs.append(out.logits)
    return outs


@pytest.fixture(scope="module")
def reference(ckpt):
    return _run(_load(ckpt[0]))


def _total_and_min(ckpt_dir) -> tuple[int, int]:
    with _attached(ckpt_dir, StoreConfig(budget=1 << 40)) as (_, store):
        return sum(store.cache.layout.nbytes.values()), store.cache.min_budget


@pytest.fixture(scope="module")
def sizes(ckpt):
    return _total_and_min(ckpt[0])


@contextmanager
def _attached(ckpt_dir, config: StoreConfig, model=None, load=None, **kw):
    """(model, store): a fresh model (or `model`) with an ExpertStore attached (to kw's `modules` where given); the
    store is closed on exit."""
    model = model if model is not None else (load or _load)(ckpt_dir)
    store = attach_store(None if "modules" in kw else model, ckpt_dir, config, **kw)
    try:
        yield model, store
    finally:
        store.close()


def _store_run(ckpt_dir, config: StoreConfig, run=None, **kw):
    """(every step's logits, the store's counters) of `run` (default _run) under a store."""
    with _attached(ckpt_dir, config, **kw) as (model, store):
        return (run or _run)(model), store.counters()


GRID = [(p, s) for p in ("lru", "lfu", "popularity", "demand", "cyclic") for s in (0.0, 0.3, 0.6, 1.0)]
FAST = {("lru", 0.0), ("lru", 0.6), ("lru", 1.0), ("lfu", 0.3), ("popularity", 0.3), ("demand", 0.6), ("cyclic", 0.3)}


@pytest.mark.parametrize("policy,share", [pytest.param(*ps, marks=() if ps in FAST else pytest.mark.slow) for ps in GRID])
def test_exact_under_every_policy_and_budget(ckpt, reference, sizes, policy, share):
    total, smallest = sizes
    budget = max(smallest, int(share * total))
    outs, c = _store_run(ckpt[0], StoreConfig(budget=budget, policy=policy))
    for got, ref in zip(outs, reference):
        assert torch.equal(got, ref)
    assert c["peak_bytes"] <= budget
    assert c["uses"] == c["hits"] + c["misses"] and c["substitutions"] == 0
    if share == 1.0 and policy != "demand":  # everything fits: each expert read once, nothing evicted
        assert c["evictions"] == 0 and c["bytes_fetched"] <= total + c["misses"] * 6 * 8192  # O_DIRECT alignment
    if share == 0.0:
        assert c["misses"] > 0 and c["bytes_fetched"] > 0


@pytest.mark.parametrize("prefetch,direct_io", [("paths", True), ("router", False), ("both", True)])
def test_pinning_and_prefetch_exact_and_within_budget(ckpt, reference, sizes, prefetch, direct_io):
    total, smallest = sizes
    budget = max(smallest, total // 2)
    outs, c = _store_run(ckpt[0], StoreConfig(budget=budget, pin_share=0.5, prefetch=prefetch, direct_io=direct_io))
    for got, ref in zip(outs, reference):
        assert torch.equal(got, ref)
    assert 0 < c["pinned_bytes"] <= budget // 2
    assert c["peak_bytes"] <= budget
    assert c["prefetches"] > 0 and 0 <= c["useful_prefetches"] <= c["prefetches"]


def test_prefetch_score_floor_reads_only_confident_predictions(ckpt, reference, sizes):
    """prefetch_floor (a multiple of the uniform score 1 / experts): experts scored below it are not read ahead (a
    floor above every possible score reads none); the results stay exact."""
    total, smallest = sizes
    budget = max(smallest, total // 2)
    counts = {}
    for floor in (0.0, 1000.0):
        outs, c = _store_run(ckpt[0], StoreConfig(budget=budget, prefetch="router", prefetch_floor=floor))
        for got, ref in zip(outs, reference):
            assert torch.equal(got, ref)
        counts[floor] = c["prefetches"]
    assert counts[0.0] > 0 and counts[1000.0] == 0


def test_rank_precision_reads_ahead_only_precise_ranks():
    """Each rank's precision is an exponential average of "was routed at the layer's next call" (starting at 1); a
    rank below the minimum is not read ahead, and is again once its predictions come true."""
    from moecompress.runtime.store.prefetch import RankPrecision

    gate = RankPrecision(min_precision=0.5, rate=0.5)
    assert gate.predicted(1, [3, 5]) == [3, 5]  # nothing measured yet: every rank
    gate.routed(1, {3, 8})  # rank 0 right, rank 1 wrong
    assert gate.precision == {(1, 0): 1.0, (1, 1): 0.5}
    assert gate.predicted(1, [3, 6]) == [3, 6]  # 0.5 >= 0.5
    gate.routed(1, {3})
    assert gate.precision[(1, 1)] == 0.25
    assert gate.predicted(1, [4, 7]) == [4]  # rank 1 not read ahead, still checked
    gate.routed(1, {7, 9})
    assert gate.precision == {(1, 0): 0.5, (1, 1): 0.625}
    assert gate.predicted(1, [2, 9]) == [2, 9]
    gate.routed(2, {1})  # no prediction pending for layer 2: nothing changes
    assert (2, 0) not in gate.precision


def test_evicted_row_buffers_serve_the_next_reads_within_the_budget():
    """tiers.BufferPool: a buffer given back is handed to the next read of its size; the pool keeps at most `limit`
    bytes (plus each buffer's ROW_PAD), dropping the sizes least recycled first."""
    from moecompress.runtime.store.tiers import ROW_PAD, BufferPool

    pool = BufferPool()
    a, b, c = pool.take(1000), pool.take(1000), pool.take(300)
    assert pool.nbytes == 0 and a.numel() == 1000 and c.numel() == 300
    pool.give([a, b, c], limit=2000)  # 2300 bytes > 2000 + 3 * ROW_PAD: the 300-byte size (one buffer) goes
    assert pool.nbytes == 2000
    assert pool.take(1000).data_ptr() == b.data_ptr() and pool.take(1000).data_ptr() == a.data_ptr()
    assert pool.take(1000).data_ptr() not in (a.data_ptr(), b.data_ptr()) and pool.nbytes == 0
    pool.give([c], limit=300 - ROW_PAD)  # within limit + ROW_PAD: kept
    assert pool.nbytes == 300
    pool.give([], limit=0)
    assert pool.nbytes == 0


def test_second_prediction_from_the_residual_stream_is_exact_and_unhooked(ckpt, reference, sizes):
    """prefetch_refine: hooks keep each MoE block's input stream; after a layer's experts computed, layer l+1 is
    predicted again from the stream + the output. Results stay exact, the hooks go with the store."""
    total, smallest = sizes
    config = StoreConfig(budget=max(smallest, total // 2), pin_share=0.5, prefetch="router", prefetch_refine=True,
                         prefetch_min_precision=0.5)
    with _attached(ckpt[0], config) as (model, store):
        norms = [layer.post_attention_layernorm for layer in model.model.layers]
        assert len(store.hooks) == len(norms) and all(len(n._forward_pre_hooks) == 1 for n in norms)
        outs = _run(model)
        c = store.counters()
    for got, ref in zip(outs, reference):
        assert torch.equal(got, ref)
    assert c["peak_bytes"] <= config.budget
    later = {layer for layer, _ in store.refine_precision.precision}
    assert later == set(range(1, len(norms)))  # every layer after the first was predicted a second time
    assert all(not n._forward_pre_hooks for n in norms) and not store.residuals


class WrongPredictor:
    """Ranks first the experts layer l+1's router likes least."""

    def __init__(self, model):
        self.routers = [m.gate.weight for m in (layer.mlp for layer in model.model.layers)]

    def scores(self, layer, hidden, top_k_index, top_k_weights):
        if layer + 1 >= len(self.routers):
            return None
        return -torch.softmax(hidden @ self.routers[layer + 1].t(), -1).sum(0)


def test_a_wrong_prediction_never_changes_results(ckpt, reference, sizes):
    total, smallest = sizes
    model = _load(ckpt[0])
    outs, c = _store_run(ckpt[0], StoreConfig(budget=max(smallest, total // 3)), model=model,
                         predictor=WrongPredictor(model))
    for got, ref in zip(outs, reference):
        assert torch.equal(got, ref)
    assert c["prefetches"] > 0 and c["prefetch_accuracy"] < 0.5


def _substitution_run(ckpt_dir, copies, budget, threshold, **fields):
    """Run with copies; record every experts call's routing and every acquire (key, substituted)."""
    calls, acquired = [], []
    with _attached(ckpt_dir, StoreConfig(budget=budget, copy_threshold=threshold, **fields), copies=copies) as (
            model, store):
        hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append((args[1].clone(), args[2].clone())))
                 for m in model.modules() if isinstance(m, PackedExperts)]
        classify = store.cache.classify

        def recording(requests, **kw):
            kinds = classify(requests, **kw)
            acquired.extend((key, kind == "copy") for (key, _), kind in zip(requests, kinds))
            return kinds

        store.cache.classify = recording
        try:
            outs = _run(model)
        finally:
            for h in hooks:
                h.remove()
        return outs, store.counters(), calls, acquired


@pytest.mark.parametrize("relative", [False, True])
def test_low_bit_substitution_only_under_threshold_and_counted(ckpt, reference, sizes, relative):
    """copy_relative: the threshold is in units of the token's mean top-k weight."""
    ckpt_dir, copies = ckpt
    total, smallest = sizes
    copy_bytes = sum(t.numel() * t.element_size() for by in copies.values() for d in by.values()
                     for k, t in d.items() if k != "bits")
    budget = smallest + copy_bytes + total // 4
    # threshold 0: never substitutes, exact
    outs, c, _, _ = _substitution_run(ckpt_dir, copies, budget, 0.0, copy_relative=relative)
    assert c["substitutions"] == 0 and c["copy_bytes"] == copy_bytes and c["peak_bytes"] <= budget
    assert all(torch.equal(a, b) for a, b in zip(outs, reference))
    # a middle threshold: substituted uses all have routing weight below it, and are counted
    threshold = 0.9 if relative else 0.45
    outs, c, calls, acquired = _substitution_run(ckpt_dir, copies, budget, threshold, copy_relative=relative)
    assert c["peak_bytes"] <= budget
    num_layers = len(copies)
    per_call = []  # (layer, expert) -> max routing weight, in call order
    for i, (idx, w) in enumerate(calls):
        layer = i % num_layers
        weights = {}
        w = w.float() / w.float().mean(-1, keepdim=True) if relative else w
        for e, v in zip(idx.reshape(-1).tolist(), w.reshape(-1).tolist()):
            weights[e] = max(weights.get(e, 0.0), v)
        per_call.extend(((layer, e), weights[e]) for e in sorted(weights))
    by_key = {}
    for key, weight in per_call:
        by_key.setdefault(key, []).append(weight)
    substituted = [key for key, sub in acquired if sub]
    assert len(substituted) == c["substitutions"] > 0
    lows = sum(1 for key, weight in per_call if weight < threshold)
    assert c["substitutions"] <= lows
    for key, sub in acquired:
        if sub:  # this use's weight is among those below the threshold
            assert min(by_key[key]) < threshold
    assert not all(torch.equal(a, b) for a, b in zip(outs, reference))  # copies do change results


def test_budget_below_the_largest_expert_is_a_clear_error(ckpt, sizes):
    total, smallest = sizes
    model = _load(ckpt[0])
    stored = 0
    for m in model.modules():
        if isinstance(m, PackedExperts):
            for proj in m.proj_names:
                for g in getattr(m, proj).children():
                    per_expert = sum(t.numel() * t.element_size() for t in g.buffers()) // len(g.experts)
                    stored = max(stored, per_expert)
    assert smallest >= stored  # at least the largest single projection
    with pytest.raises(MoecompressError, match=f"smallest workable budget {smallest} bytes"):
        attach_store(model, ckpt[0], StoreConfig(budget=smallest - 1))
    with pytest.raises(MoecompressError, match="smallest workable budget"):
        moecompress.from_pretrained(ckpt[0], dtype=torch.float32, verify=False, expert_budget=smallest - 1)


def test_without_overlap_every_miss_is_read_first_and_outputs_stay_exact(ckpt, reference, sizes):
    """overlap=False (the A/B of bench_store.py --tier gpu): a call waits for its misses' reads, then computes (at
    the smallest budget, where the call's experts do not fit together, as with the overlap: no deadlock)."""
    total, smallest = sizes
    for budget in (smallest, total // 2):
        outs, c = _store_run(ckpt[0], StoreConfig(budget=budget, overlap=False, prefetch="router"))
        assert all(torch.equal(a, b) for a, b in zip(outs, reference))
        assert c["misses"] > 0 and c["peak_bytes"] <= budget


def test_deterministic_copies_depend_on_the_routing_alone(ckpt, sizes):
    """copy_deterministic: a use under the threshold runs on its copy, resident or not. Without pinning the outputs
    are the same at every budget, policy and prefetch (so whatever the reads' timing), substitutions included; with
    pinning the pinned experts' copies are dropped (their bytes go to the slots) and pinned experts always hit."""
    ckpt_dir, copies = ckpt
    total, smallest = sizes
    copy_bytes = sum(t.numel() * t.element_size() for by in copies.values() for d in by.values()
                     for k, t in d.items() if k != "bits")
    det = dict(copy_threshold=0.9, copy_relative=True, copy_deterministic=True)
    runs = [_store_run(ckpt_dir, StoreConfig(budget=budget, **det, **fields), copies=copies)
            for budget, fields in ((smallest + copy_bytes, dict(policy="demand")),
                                   (copy_bytes + total // 2, dict(prefetch="router", read_threads=1, copy_fetch=True)),
                                   (copy_bytes + total, dict(policy="lfu")))]
    assert all(torch.equal(a, b) for outs, _ in runs[1:] for a, b in zip(outs, runs[0][0]))
    assert len({c["substitutions"] for _, c in runs}) == 1 and runs[0][1]["substitutions"] > 0
    budget = copy_bytes + total // 2
    config = StoreConfig(budget=budget, pin_share=0.5, copy_threshold=1000.0, copy_deterministic=True)
    with _attached(ckpt_dir, config, copies=copies) as (model, store):
        pinned = {k for k, s in store.cache.slots.items() if s.pinned}
        layer_rows = {layer: set(g[next(iter(g))].slot) for layer, g in store.copies.items()}
        capacity = store.cache.capacity
        _run(model)
        c = store.counters()
    assert pinned and all((layer, e) not in pinned for layer, rows in layer_rows.items() for e in rows)
    assert sum(len(r) for r in layer_rows.values()) + len(pinned) == sum(len(by[next(iter(by))]["qweight"])
                                                                         for by in copies.values())
    assert c["copy_bytes"] < copy_bytes and capacity == budget - c["copy_bytes"] and c["peak_bytes"] <= budget
    assert c["misses"] == 0 and c["hits"] > 0 and c["substitutions"] > 0  # pinned: hits; the others: copies


def test_copy_fetch_serves_every_miss_from_the_copy_and_reads_it_for_next_time(ckpt, reference, sizes):
    """copy_fetch (HOBBIT): a miss under the threshold (here every miss) is computed by its copy, never waited for,
    and its full expert is read in the background: with room for everything, each expert is substituted at most
    until its read lands, then hit, and ends resident; the budget holds."""
    ckpt_dir, copies = ckpt
    total, smallest = sizes
    copy_bytes = sum(t.numel() * t.element_size() for by in copies.values() for d in by.values()
                     for k, t in d.items() if k != "bits")
    budget = copy_bytes + total
    with _attached(ckpt_dir, StoreConfig(budget=budget, copy_threshold=2.0, copy_fetch=True), copies=copies) as (
            model, store):
        kinds = []  # (key, kind) of every use
        classify = store.cache.classify

        def recording(requests, **kw):
            got = classify(requests, **kw)
            kinds.extend(zip([key for key, _ in requests], got))
            return got

        store.cache.classify = recording
        first = _run(model)
        store._readers.shutdown(wait=True)  # the background reads done
        c = store.counters()
        resident = store.cache.resident()
    substituted = {key for key, kind in kinds if kind == "copy"}
    assert c["misses"] == 0 and c["substitutions"] == sum(kind == "copy" for _, kind in kinds) > 0
    assert c["uses"] == c["hits"] + c["substitutions"] and c["peak_bytes"] <= budget
    assert resident == substituted and c["copy_fetches"] == len(resident)  # each read once, all fit: all stay
    assert not all(torch.equal(a, b) for a, b in zip(first, reference))
    # without copy_fetch the same threshold substitutes every miss and reads nothing
    outs, c = _store_run(ckpt_dir, StoreConfig(budget=budget, copy_threshold=2.0), copies=copies)
    assert c["bytes_fetched"] == 0 and c["copy_fetches"] == 0 and c["hits"] == 0


def test_from_pretrained_with_a_budget(ckpt, reference, sizes):
    total, smallest = sizes
    model = moecompress.from_pretrained(ckpt[0], dtype=torch.float32, verify=False, expert_budget=total // 2)
    try:
        outs = _run(model)
        c = model.expert_store.counters()
    finally:
        model.expert_store.close()
    assert all(torch.equal(a, b) for a, b in zip(outs, reference))
    assert c["pinned_bytes"] > 0 and c["peak_bytes"] <= total // 2 and c["tokens"] == 2 * 8 + 2 * STEPS


def test_bad_settings_are_clear_errors():
    with pytest.raises(MoecompressError, match="unknown eviction policy 'fifo'"):
        StoreConfig(budget=1, policy="fifo")
    with pytest.raises(MoecompressError, match="unknown prefetch predictor"):
        StoreConfig(budget=1, prefetch="oracle")
    with pytest.raises(MoecompressError, match="prefetch_floor .* must be >= 0"):
        StoreConfig(budget=1, prefetch="router", prefetch_floor=-1.0)
    with pytest.raises(MoecompressError, match="prefetch_min_precision must be in 0..1"):
        StoreConfig(budget=1, prefetch="router", prefetch_min_precision=1.5)
    with pytest.raises(MoecompressError, match="copy_fetch .* give copy_threshold"):
        StoreConfig(budget=1, copy_fetch=True)
    with pytest.raises(MoecompressError, match="copy_relative .* give copy_threshold"):
        StoreConfig(budget=1, copy_relative=True)
    with pytest.raises(MoecompressError, match="copy_threshold .* must be >= 0"):
        StoreConfig(budget=1, copy_threshold=-0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned-memory -> GPU tier needs CUDA")
@pytest.mark.parametrize("gpu_slots", [False, True])  # float32: the per-expert path, over its own slots or the table's
def test_gpu_tier_exact(ckpt, sizes, gpu_slots):
    total, smallest = sizes
    model = moecompress.from_pretrained(ckpt[0], dtype=torch.float32, verify=False, device_map="cuda")
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 8]], device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
    config = StoreConfig(budget=max(smallest, total // 3), tier="pinned", prefetch="router", gpu_slots=gpu_slots)
    with _attached(ckpt[0], config, model=model) as (_, store):
        with torch.no_grad():
            got = model(ids).logits
        c = store.counters()
    # the resident general path sums a token's experts with index_add_ (CUDA atomics: any order), the store in k
    # order: equal up to float32 summation order
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert c["peak_bytes"] <= max(smallest, total // 3) and c["misses"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned-memory -> GPU tier needs CUDA")
def test_gpu_tier_bf16_same_at_every_budget(ckpt, sizes):
    """bf16 on the GPU: the fully resident layer takes the CUDA kernels' fused path and the store its per-expert path
    (other kernels, other rounding): equal across budgets, policies and prefetch (each token's experts summed in k
    order, no atomics), close to the resident model."""
    total, smallest = sizes
    model = moecompress.from_pretrained(ckpt[0], dtype=torch.bfloat16, verify=False, device_map="cuda")
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 8]], device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()
    outs = []
    for budget, fields in ((smallest, dict(prefetch="router")), (total // 2, dict(overlap=False)),
                           (total, dict(policy="lfu"))):
        config = StoreConfig(budget=budget, tier="pinned", gpu_slots=False, **fields)  # the per-expert path
        with _attached(ckpt[0], config, model=model) as (_, store):
            with torch.no_grad():
                outs.append(model(ids).logits.float())
            c = store.counters()
        assert c["peak_bytes"] <= budget and c["misses"] > 0 and c["tier_busy_s"] > 0
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert float((outs[0] - ref).abs().max()) <= 0.05 * float(ref.abs().max())


def test_one_rank_s_experts_under_a_store(ckpt, reference, sizes):
    """The edge runtime's form: some MoE layers' modules with their global ordinals and paths (layer 0 stays whole)."""
    total, smallest = sizes
    model = _load(ckpt[0])
    paths = {layer: f"model.layers.{layer}.mlp.experts" for layer in (1, 2)}
    modules = {layer: model.get_submodule(p) for layer, p in paths.items()}
    with _attached(ckpt[0], StoreConfig(budget=smallest, pin_share=0.0, prefetch="paths"), model=model,
                   modules=modules, paths=paths) as (_, store):
        outs = _run(model)
        c = store.counters()
    assert all(torch.equal(a, b) for a, b in zip(outs, reference))
    assert c["misses"] > 0 and c["peak_bytes"] <= smallest and set(k[0] for k in store.cache.layout.nbytes) == {1, 2}


def test_cyclic_policy_evicts_the_layer_needed_last():
    """3 layers, decoding: while layer 0 runs, plain LRU evicts layer 1's expert used at the last token (needed next);
    `cyclic` evicts the one of layer 2 used at the last token instead (its layer comes back last), and an entry not
    used at its layer's last call before both; an entry read ahead for the next call counts as used by it."""
    from moecompress.runtime.store.policies import EVICTION_POLICIES

    lru, cyc = EVICTION_POLICIES["lru"](), EVICTION_POLICIES["cyclic"]()
    for p in (lru, cyc):
        for layer in range(3):  # token 0: layer l uses expert 0 (and layer 2 also expert 1)
            p.on_call(layer)
            for e in ((0, 1) if layer == 2 else (0,)):
                p.on_insert((layer, e))
                p.on_use((layer, e))
        p.on_call(0)  # token 1, layer 0 runs
    keys = {(1, 0), (2, 0), (2, 1)}
    assert lru.victim(keys) == (1, 0) and cyc.victim(keys) == (2, 0)
    cyc.on_call(1)
    cyc.on_use((1, 0))
    cyc.on_call(2)
    cyc.on_use((2, 1))  # layer 2's call of token 1 uses expert 1 only: expert 0 is one call old
    cyc.on_call(0)
    cyc.on_insert((1, 5))  # read ahead for layer 1's next call
    assert cyc.victim({(1, 0), (2, 0), (2, 1), (1, 5)}) == (2, 0)
    assert cyc.victim({(1, 0), (2, 1), (1, 5)}) == (2, 1)
    assert cyc.victim({(1, 0), (1, 5)}) == (1, 0)  # the entry read ahead stays


def test_two_threads_filling_one_expert_read_it_once():
    """Two readers wait for room for the same expert; the second must find it resident (or in flight), not read it
    again over the first's slot (that leaked its bytes and left a slot `in use` forever: a deadlock under load)."""
    import threading

    from moecompress.runtime.store.cache import ExpertCache, Slot, StoreLayout

    layout = StoreLayout(shapes=[{0: {}, 1: {}}], nbytes={(0, 0): 100, (0, 1): 100}, group_size=32, symmetric=False,
                         compute_dtype=torch.float32)
    reads = []

    class Recorded(ExpertCache):
        def _build(self, key):
            reads.append(key)
            return Slot({}, self.layout.nbytes[key])

    cache = Recorded(layout, tier=None, budget=100)  # room for one expert
    cache.fill((0, 1))
    assert cache.classify([((0, 1), False)]) == ["hit"]  # (0, 1) in use: no room until it is released
    threads = [threading.Thread(target=cache.fill, args=((0, 0),)) for _ in range(2)]
    for t in threads:
        t.start()
    while sum(t.is_alive() for t in threads) < 2:
        pass
    import time
    time.sleep(0.2)  # both are waiting for room
    cache.release((0, 1))
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert reads == [(0, 1), (0, 0)]
    assert set(cache.slots) == {(0, 0)} and cache.used == 100 and cache.reserved == 0
    assert cache.slots[(0, 0)].in_use == 0


# -- the fused CPU decode call (store/fused.py): bf16, every expert 2/3/4/8-bit, so the resident layers take it ------

@pytest.fixture(scope="module")
def ckpt_fused(tmp_path_factory):
    """A bf16 qwen3_moe checkpoint whose experts are all 2/3/4/8-bit (mixed within a layer): decode steps of the
    fully resident model take cpu_moe's fused call. Returns (dir, its 2-bit RTN copies)."""
    from conftest import _build
    from helpers import mixed_plan

    from moecompress.runtime.kernels import cpu_lowbit

    if not cpu_lowbit.available():
        pytest.skip("no C++ compiler: the fused decode call is not built")
    model = _build("qwen3_moe", hidden_size=256, moe_intermediate_size=128, intermediate_size=128)
    layout = describe(model)
    plan = mixed_plan(layout)
    plan = type(plan)(plan.group_size, plan.symmetric,
                      {p: {proj: tuple(8 if b == 16 else b for b in bits) for proj, bits in by.items()}
                       for p, by in plan.experts.items()})
    layout, plan, quantized = quantize_tiny(model, plan)
    out = tmp_path_factory.mktemp("store_fused") / "ck"
    export_checkpoint(model, layout, plan, quantized, out, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    L, E = len(layout.moe_layers), layout.moe_layers[0].num_experts
    write_expert_stats(out, ExpertStats.from_counts(torch.rand(L, E, generator=gen), torch.randint(0, 9, (L, E), generator=gen),
                                                    torch.rand(L - 1, E, E, generator=gen)))
    copies = {}
    for layer, m in enumerate(layout.moe_layers):
        experts = model.get_submodule(m.experts_path)
        copies[layer] = {p.name: dict(zip(("bits", "qweight", "scales", "zeros"), (2, *(lambda q: (q.packed(), q.scales, q.zeros))(
            quantize_rtn(proj_weights(experts, m, p.name).detach().float(), 2, plan.group_size, plan.symmetric)))))
            for p in m.projs}
    return out, copies


def _load_bf16(ckpt_dir):
    return moecompress.from_pretrained(ckpt_dir, dtype=torch.bfloat16, verify=False).eval()


def _run_one(model) -> list[torch.Tensor]:
    """Batch 1 (decode steps of one token: the fused call): prompt logits, then STEPS greedy steps."""
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 8]])
    outs = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        outs.append(out.logits)
        for _ in range(STEPS):
            out = model(out.logits[:, -1:].argmax(-1), cache=out.past_key_values, use_cache=True)
            outs.append(out.logits)
    return outs


def test_fused_decode_exact_at_every_budget(ckpt_fused):
    from moecompress.runtime.experts import cpu_moe

    ckpt_dir, _ = ckpt_fused
    resident = _load_bf16(ckpt_dir)
    experts = [m for m in resident.modules() if isinstance(m, PackedExperts)]
    assert all(cpu_moe.fused_layer(m, torch.zeros(1, 256, dtype=torch.bfloat16)) is not None for m in experts)
    reference = _run_one(resident)
    total = sum(sum(t.numel() * t.element_size() for t in m.buffers()) for m in experts)
    del resident
    top_k = _load_bf16(ckpt_dir).config.num_experts_per_tok
    for share, config in [(0.0, dict(policy="lru")), (0.0, dict(policy="lru", overlap=False)),
                          (0.4, dict(policy="lru", pin_share=0.5, prefetch="router")),
                          (0.7, dict(policy="lfu")), (1.0, dict(policy="lru"))]:
        model = _load_bf16(ckpt_dir)
        probe_budget = max(1, int(share * total))
        try:
            store = attach_store(model, ckpt_dir, StoreConfig(budget=probe_budget, **config))
        except MoecompressError as err:  # below the smallest workable budget: use that
            assert f"one token's {top_k} routed experts" in str(err)
            smallest = int(str(err).split("smallest workable budget ")[1].split()[0])
            store = attach_store(model, ckpt_dir, StoreConfig(budget=smallest, **config))
        try:
            assert store.cache.working_set == top_k
            outs = _run_one(model)
            c = store.counters()
            decided = store.fused.decided.values()
            assert decided and all(v is not None for v in decided)  # it took the fused call
        finally:
            store.close()
        for got, ref in zip(outs, reference):
            assert torch.equal(got, ref)
        assert c["peak_bytes"] <= store.cache.budget and c["substitutions"] == 0
        if share == 0.0:
            assert c["misses"] > 0


@pytest.mark.parametrize("copy_fetch", [False, True])
def test_fused_decode_low_bit_copies_in_the_same_call(ckpt_fused, copy_fetch):
    ckpt_dir, copies = ckpt_fused
    reference = _run_one(_load_bf16(ckpt_dir))
    config = StoreConfig(budget=1 << 40, copy_threshold=1.1, copies_in_budget=False, copy_fetch=copy_fetch)
    # nothing resident at first and every weight < 1.1: the first uses run on the copies
    outs, c = _store_run(ckpt_dir, config, run=_run_one, load=_load_bf16, copies=copies)
    assert c["substitutions"] > 0 and c["misses"] == 0
    assert (c["copy_fetches"] > 0) == copy_fetch and (c["bytes_fetched"] > 0) == copy_fetch
    assert not torch.equal(outs[1], reference[1])


# -- a deployment: every server's experts under a store (deploy(..., expert_budget=), --expert-budget) ---------------

def _server_stores(d) -> dict:
    """server -> its ExpertStore in a simulated deployment (the home's and every other server's)."""
    from moecompress.runtime.edge.dispatcher import DispatchedExperts

    out = {}
    for m in d.model.modules():
        if isinstance(m, DispatchedExperts) and m.local is not None and m.local.expert_store is not None:
            out[d.home] = m.local.expert_store.store
    for n, handler in getattr(d.transport, "handlers", {}).items():  # simulated servers (in this process)
        for m in handler.inner.experts.values():
            if m.expert_store is not None:
                out[n] = m.expert_store.store
    return out


def test_deployment_with_an_expert_budget_equals_the_resident_one(tmp_path_factory):
    from edge_bundles import IDS, MASK, checkpoint, expert_bundles

    from moecompress.runtime.edge import deploy

    ck, _, _ = checkpoint(tmp_path_factory)
    out = expert_bundles(ck, ck.parent / "out2-store", 2)
    with deploy(out, simulate=True) as d:
        ref = d(IDS, MASK)
    with deploy(out, simulate=True, expert_budget=1 << 40) as d:
        sizes = {n: (sum(s.cache.layout.nbytes.values()), s.cache.min_budget) for n, s in _server_stores(d).items()}
    assert set(sizes) == {0, 1}
    budget = max(max(m for _, m in sizes.values()), min(t for t, _ in sizes.values()) // 3)
    with deploy(out, simulate=True, expert_budget=budget) as d:
        got = d(IDS, MASK)
        counters = {n: s.counters() for n, s in _server_stores(d).items()}
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-5 * ref.abs().max().item(), diff  # float32: equal up to summation order (bit-equal at 1 thread)
    for n, c in counters.items():
        assert c["misses"] > 0 and c["peak_bytes"] <= budget, (n, c)


def test_fused_rows_summed_apart_equal_the_one_call(ckpt_fused):
    """The overlap on a miss (store.py): the resident experts' rows and the late ones' come from two calls; their sum in
    the one call's order equals the one call bit for bit (float32 out, 3 tokens of 4 experts, random split), while
    simply adding the two calls' sums does not."""
    from moecompress.runtime.store.fused import FusedSettings, fused_call, fused_rows, weighted_sum

    ckpt_dir, _ = ckpt_fused
    with _attached(ckpt_dir, StoreConfig(budget=1 << 40), load=_load_bf16) as (model, store):
        module = next(m for m in model.modules() if isinstance(m, PackedExperts))
        settings = store.fused.settings(0, module, torch.zeros(1, 256, dtype=torch.bfloat16))
        assert isinstance(settings, FusedSettings)
        E, K = module.num_experts, 4  # more than the model's top-2: the sum's order matters from 3 terms on
        for e in range(E):
            store.cache.fill((0, e))
        table = {e: (store.cache.slots[(0, e)].groups, 0) for e in range(E)}
        gen = torch.Generator().manual_seed(3)
        differs = 0
        for trial in range(6):
            hidden = torch.randn(3, 256, generator=gen)
            index = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(3)])
            weights = torch.rand(3, K, generator=gen)
            args = (settings, module.proj_names, E, hidden)
            full = fused_call(*args, index, weights, table)
            early = set(torch.randperm(E, generator=gen)[:E // 2].tolist())
            a = {e: v for e, v in table.items() if e in early}
            b = {e: v for e, v in table.items() if e not in early}
            got = weighted_sum([fused_rows(*args, index, a), fused_rows(*args, index, b)], weights, torch.float32)
            assert full.dtype == torch.float32 and torch.equal(got, full)
            differs += not torch.equal(fused_call(*args, index, weights, a) + fused_call(*args, index, weights, b), full)
        assert differs > 0


def test_server_processes_with_an_expert_budget_equal_the_resident_run(tmp_path_factory, monkeypatch):
    """`deploy(simulate=False, expert_budget=B)`: real gloo processes on loopback (file rendezvous, bounded by the
    timeout), the other server's store in its own process (`serve --expert-budget`): logits equal the unbudgeted
    run's; the server process's store missed and stayed within B (its counters, written at its exit)."""
    from edge_bundles import IDS, MASK, checkpoint, expert_bundles

    from moecompress.runtime.edge import deploy
    from moecompress.runtime.store.rank import COUNTERS_ENV

    ck, _, _ = checkpoint(tmp_path_factory)
    out = expert_bundles(ck, ck.parent / "out2-store-proc", 2)
    with deploy(out, simulate=True, expert_budget=1 << 40) as d:
        sizes = {n: (sum(s.cache.layout.nbytes.values()), s.cache.min_budget) for n, s in _server_stores(d).items()}
    budget = max(max(m for _, m in sizes.values()), min(t for t, _ in sizes.values()) // 3)
    assert budget < min(t for t, _ in sizes.values())  # neither server can hold all its experts
    with deploy(out, simulate=True) as d:  # unbudgeted (the process run equals it: test_edge_expert.py)
        ref = d(IDS, MASK)
    where = tmp_path_factory.mktemp("store-counters")
    monkeypatch.setenv(COUNTERS_ENV, str(where))
    with deploy(out, simulate=False, timeout=60, expert_budget=budget) as d:
        got = d(IDS, MASK)
        home = _server_stores(d)[d.home].counters()
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-5 * ref.abs().max().item(), diff  # float32: up to summation order (bit-equal at 1 thread)
    remote = json.loads((where / "store-server-1.json").read_text())
    for c in (home, remote):
        assert c["misses"] > 0 and c["peak_bytes"] <= budget and c["budget"] == budget, c
