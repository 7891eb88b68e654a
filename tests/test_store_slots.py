"""The GPU tier's slot table (runtime/store/slots.py), its index logic on the CPU: slots hold the right experts' bytes,
the device and host lookups of one snapshot split every routed expert between them exactly once, and a layer
computed as the two lookups' pairs (each pair's row from one of them) equals the layer computed from its own groups.
The CUDA side (the kernels over the slots, no host sync) is tested in test_store_gpu.py."""
from __future__ import annotations

import pytest
import torch

import moecompress
from moecompress.artifacts.bit_plan import BitPlan
from moecompress.errors import MoecompressError
from moecompress.export.checkpoint import export_checkpoint
from moecompress.format.expert_stats import ExpertStats, write_expert_stats
from moecompress.format.pack import unpack
from moecompress.runtime.experts.packed_experts import PackedExperts
from moecompress.runtime.store.slots import HostExperts, SlotTable, slot_table_supported

from helpers import decode_logits, quantize_tiny

PACKED_BITS = (2, 3, 4, 8)


def packed_plan(layout, group_size: int = 32) -> BitPlan:
    """Every packed bit-width in every layer, the projections of one expert at different widths."""
    experts = {m.experts_path: {p.name: tuple(PACKED_BITS[(e + m.layer + 2 * j) % 4] for e in range(m.num_experts))
                                for j, p in enumerate(m.projs)} for m in layout.moe_layers}
    return BitPlan(group_size=group_size, symmetric=False, experts=experts, linears={})


def build_packed_checkpoint(out, dtype=torch.float32):
    from conftest import _build

    from moecompress.arch.adapters import describe

    model = _build("qwen3_moe", hidden_size=256, moe_intermediate_size=128, intermediate_size=128)
    layout, plan, quantized = quantize_tiny(model, plan=packed_plan(describe(model)))
    export_checkpoint(model, layout, plan, quantized, out, dtype=dtype)
    gen = torch.Generator().manual_seed(0)  # routing statistics (pinning, the paths predictor)
    L, E = len(layout.moe_layers), layout.moe_layers[0].num_experts
    write_expert_stats(out, ExpertStats.from_counts(torch.rand(L, E, generator=gen),
                                                    torch.randint(0, 9, (L, E), generator=gen),
                                                    torch.rand(L - 1, E, E, generator=gen)))
    return out


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    ckpt = build_packed_checkpoint(tmp_path_factory.mktemp("slots") / "ck")
    model = moecompress.from_pretrained(ckpt, dtype=torch.float32, verify=False).eval()
    return dict(enumerate(m for m in model.modules() if isinstance(m, PackedExperts)))


def _nbytes(host: HostExperts) -> dict:
    out = {}
    for layer, by_proj in host.groups.items():
        for groups in by_proj.values():
            for g, _ in groups:
                for e, row in g.slot.items():
                    out[(layer, e)] = out.get((layer, e), 0) + sum(t[row].numel() * t.element_size()
                                                                   for t in g.buffers())
    return out


def _table(modules, share: float):
    host = HostExperts(modules, pin=False)
    nbytes = _nbytes(host)
    num_experts = {layer: m.num_experts for layer, m in modules.items()}
    return host, nbytes, SlotTable(host, nbytes, int(share * sum(nbytes.values())), "cpu", num_experts)


def _dequantized(group, row: int) -> torch.Tensor:
    """float32 [out, in] of one row (expert) of a packed group."""
    q = unpack(group.qweight[row], group.bits, group.in_features).float()
    s = group.scales[row].float().repeat_interleave(group.group_size, -1)
    z = group.zeros[row].float().repeat_interleave(group.group_size, -1)
    return (q - z) * s


def _pairs(groups, lut: list[int], x: torch.Tensor, flat: list[int], top_k: int) -> torch.Tensor:
    """The pair path's semantics: row p = x[p // top_k] @ W(expert of pair p)^T where the lookup places the expert
    in a group, else zeros (dropped)."""
    out_f = groups[0][0].out_features
    rows = torch.zeros(len(flat), out_f)
    for p, e in enumerate(flat):
        pos = lut[e]
        for g, pos0 in groups:
            if pos0 <= pos < pos0 + len(g.experts):
                rows[p] = x[p // top_k] @ _dequantized(g, pos - pos0).T
    return rows


def test_slots_hold_the_experts_bytes_and_lookups_split_them(modules):
    host, nbytes, table = _table(modules, 0.4)
    assert slot_table_supported(modules)
    layer, E = 1, modules[1].num_experts
    for e in range(E // 2):
        table.read_expert((layer, e))
    for e in range(0, E // 2, 3):  # evict some, read others into their slots
        table.evict((layer, e))
    for e in range(E // 2, E // 2 + 2):
        table.read_expert((layer, e))
    resident = {e for (l, e) in table.taken if l == layer}
    assert resident == (set(range(E // 2 + 2)) - set(range(0, E // 2, 3)))
    table.lookups(layer)
    projs = list(host.groups[layer])
    for i, proj in enumerate(projs):
        dev, hst = table.lut_device[layer][i].tolist(), table.lut_host[layer][i].tolist()
        drop_d, drop_h = int(table.drop_device[layer][i]), int(table.drop_host[layer][i])
        for e in range(E):
            assert (dev[e] < drop_d) == (e in resident) and (hst[e] < drop_h) == (e not in resident)
        assert dev[E] == drop_d and hst[E] == drop_h  # the sentinel (dropped pairs) in neither
        for e in resident:  # the device lookup points at the expert's own bytes
            g, row = host.where(layer, proj, e)
            pool, pos0 = next((p, p0) for p, p0 in table.device_groups(layer, proj) if p0 <= dev[e] < p0 + len(p.experts))
            for name in ("qweight", "scales", "zeros"):
                assert torch.equal(pool._buffers[name][dev[e] - pos0], g._buffers[name][row])
    # a flag set after the snapshot (the side stream finishing a copy) changes nothing until the next snapshot
    table.read_expert((layer, E - 1))
    assert table.lut_host[layer][0, E - 1] < table.drop_host[layer][0]
    table.lookups(layer)
    assert table.lut_device[layer][0, E - 1] < table.drop_device[layer][0]


def test_two_lookups_compute_the_layer_exactly(modules):
    """Pairs from the device slots + pairs from the host copy (the two plans of gpu_layer.py) == the layer from its
    own groups, for both projections, whatever is resident."""
    host, nbytes, table = _table(modules, 0.5)
    layer, module = 0, modules[0]
    gen = torch.Generator().manual_seed(0)
    for e in torch.randperm(module.num_experts, generator=gen)[:module.num_experts // 3].tolist():
        table.read_expert((layer, e))
    table.lookups(layer)
    x = torch.randn(3, 256, generator=gen)
    flat = torch.randint(0, module.num_experts, (3 * 4,), generator=gen).tolist()
    for i, proj in enumerate(module.proj_names):
        xin = x if i == 0 else torch.randn(len(flat), getattr(module, proj).children().__next__().in_features,
                                           generator=gen)
        div = 4 if i == 0 else 1
        own = _pairs(host.groups[layer][proj], host.lookup[layer][proj], xin, flat, div)
        split = (_pairs(table.device_groups(layer, proj), table.lut_device[layer][i].tolist(), xin, flat, div)
                 + _pairs(host.groups[layer][proj], table.lut_host[layer][i].tolist(), xin, flat, div))
        assert torch.equal(split, own)
        assert bool(own.abs().sum(-1).gt(0).all())  # every pair computed (none dropped by both)


def test_capacity_is_what_the_budget_holds(modules):
    host, nbytes, table = _table(modules, 0.25)
    budget = int(0.25 * sum(nbytes.values()))
    # a pool of one projection and width holds at most what the budget holds of the experts using it: each pool's
    # bytes are within the budget (a model of one width: the pools are the budget)
    for key, pool in table.pools.items():
        assert sum(t.numel() * t.element_size() for t in pool.buffers()) <= budget
    for (layer, proj), by_bits in table.keys.items():  # the kernels' group bounds: multiples of 16 at any budget
        spans = table.kernel_groups(layer, proj)
        assert [pos0 for _, pos0 in spans] == [pos0 for _, pos0 in table.device_groups(layer, proj)]
        for (g, pos0), (pool, _) in zip(spans, table.device_groups(layer, proj)):
            assert pos0 % 16 == 0 and len(g.experts) % 16 == 0 and len(g.experts) >= len(pool.experts)
        i = list(host.groups[layer]).index(proj)
        assert int(table.drop_device[layer][i]) == spans[-1][1] + len(spans[-1][0].experts)
    with pytest.raises(MoecompressError, match="no free slot"):
        for layer in host.groups:
            for e in range(modules[layer].num_experts):
                table.read_expert((layer, e))


class _CpuSlotLayers:
    """gpu_layer.SlotLayers with the pair path's semantics in torch (the device plan's rows + the host plan's rows,
    the top_k rows of a token summed in k order), so the store's slot-table path (lookups per call, bookkeeping
    thread, reads and evictions through the table) runs on the CPU; each call also checks that the two plans give
    exactly the rows of the layer computed from its own groups."""

    def __init__(self, table):
        self.table, self.mismatches, self.calls = table, 0, 0

    def eligible(self, layer, module, hidden, top_k_index) -> bool:
        return layer in self.table.host.groups

    def _layer(self, module, plans, x, flat, weights, top_k):
        (g1, lut1), (g2, lut2) = plans
        h = _pairs(g1, lut1, x, flat, top_k)
        h = module._gate_fn(module, h)
        return _pairs(g2, lut2, h, flat, 1)

    def forward(self, layer, module, x, flat, weights, top_k, host_pass, timing=None):
        t, names = self.table, module.proj_names
        flat = flat.tolist()
        dev = [(t.device_groups(layer, n), t.lut_device[layer][i].tolist()) for i, n in enumerate(names)]
        hst = [(t.host.groups[layer][n], t.lut_host[layer][i].tolist()) for i, n in enumerate(names)]
        own = [(t.host.groups[layer][n], t.host.lookup[layer][n]) for n in names]
        y = self._layer(module, dev, x.float(), flat, weights, top_k)
        if host_pass:
            y = y + self._layer(module, hst, x.float(), flat, weights, top_k)
        self.mismatches += not torch.equal(y, self._layer(module, own, x.float(), flat, weights, top_k))
        self.calls += 1
        y = y * weights.float()[:, None]
        return y.view(x.shape[0], top_k, -1).sum(1).to(x.dtype)


@pytest.mark.parametrize("share,fields", [(0.3, dict(policy="lru")), (0.6, dict(policy="lfu", prefetch="paths")),
                                          (0.5, dict(policy="lru", prefetch="router", prefetch_refine=True,
                                                     prefetch_min_precision=0.5)),
                                          (0.5, dict(policy="demand"))])
def test_store_on_the_slot_table(tmp_path_factory, modules, share, fields):
    """The store's slot-table path end to end on the CPU: every call split exactly between the two plans, the
    table's residents = the cache's, counters consistent, the budget held."""
    from moecompress.runtime.store import StoreConfig, attach_store, detach_store
    from moecompress.runtime.store.slot_path import SlotPath

    ckpt = tmp_path_factory.getbasetemp() / "slots0" / "ck"
    model = moecompress.from_pretrained(ckpt, dtype=torch.float32, verify=False).eval()
    mods = dict(enumerate(m for m in model.modules() if isinstance(m, PackedExperts)))
    host = HostExperts(mods, pin=False)
    total = sum(_nbytes(host).values())
    store = attach_store(model, ckpt, StoreConfig(budget=int(share * total), **fields))
    try:
        table = SlotTable(host, store.cache.layout.nbytes, store.cache.capacity, "cpu",
                          {layer: m.num_experts for layer, m in mods.items()})
        store.cache.tier.host, store.cache.tier.slots = host, table
        store.slot_path = SlotPath(store, _CpuSlotLayers(table))
        ids = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 8, 11, 23]])
        decode_logits(model, ids)
        c = store.counters()
        layers = store.slot_path.layers
        assert c["slot_error"] is None and layers.calls == ids.shape[1] * len(mods) and layers.mismatches == 0
        assert set(table.taken) == set(store.cache.slots)  # fills and evictions went through the table
        assert c["hits"] + c["misses"] == c["uses"] > 0 and c["peak_bytes"] <= int(share * total)
        if fields["policy"] == "demand":
            assert c["hits"] == 0 and not table.taken  # on demand: every use from the host copy
        else:
            assert c["hits"] > 0 and c["misses"] > 0 and c["bytes_fetched"] > 0
        if fields.get("prefetch"):
            assert c["prefetches"] > 0  # read ahead through the table too
        # the slot path's reads build no PackedGroups (its launches read the pools): the groups wait for a use
        from moecompress.runtime.store.cache import LazyGroups

        assert all(isinstance(s.groups, LazyGroups) and s.groups._groups is None for s in store.cache.slots.values())
        book = store.slot_path.book.cpu_s
        assert book > 0 and c["background_cpu_s"] >= book  # the bookkeeping thread's CPU time is counted
    finally:
        detach_store(model.modules())  # closes the one store once per MoE layer (3 here): must return


class _DecodeOnly(_CpuSlotLayers):
    """Takes one-token calls only: a prompt's call runs on the store's per-expert path over the table's slots."""

    def eligible(self, layer, module, hidden, top_k_index) -> bool:
        return hidden.shape[0] == 1 and super().eligible(layer, module, hidden, top_k_index)


def test_per_expert_path_over_the_slot_table(tmp_path_factory, modules):
    """Calls the slot path does not take (a prompt here; on a GPU also float32, copies, overlap=False) compute one
    expert at a time from the table's slots (views of its pools): the same logits as the fully resident model, the
    table's residents = the cache's, the budget held."""
    from moecompress.runtime.store import StoreConfig, attach_store, detach_store
    from moecompress.runtime.store.slot_path import SlotPath

    ckpt = tmp_path_factory.getbasetemp() / "slots0" / "ck"
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 8, 11, 23]])
    resident = moecompress.from_pretrained(ckpt, dtype=torch.float32, verify=False).eval()
    model = moecompress.from_pretrained(ckpt, dtype=torch.float32, verify=False).eval()
    mods = dict(enumerate(m for m in model.modules() if isinstance(m, PackedExperts)))
    host = HostExperts(mods, pin=False)
    budget = int(0.4 * sum(_nbytes(host).values()))
    store = attach_store(model, ckpt, StoreConfig(budget=budget, policy="lru"))
    try:
        table = SlotTable(host, store.cache.layout.nbytes, store.cache.capacity, "cpu",
                          {layer: m.num_experts for layer, m in mods.items()})
        store.cache.tier.host, store.cache.tier.slots = host, table
        store.slot_path = SlotPath(store, _DecodeOnly(table))
        # the prompt (6 tokens) takes the per-expert path, then one token per call the slot path
        outs = [decode_logits(m, ids, prompt=6) for m in (resident, model)]
        c = store.counters()
        layers = store.slot_path.layers
        assert layers.calls == (ids.shape[1] - 6) * len(mods) and layers.mismatches == 0
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
        assert set(table.taken) == set(store.cache.slots) and c["peak_bytes"] <= budget
        assert c["misses"] > 0 and c["hits"] > 0 and c["slot_error"] is None
        assert any(s.groups._groups is not None for s in store.cache.slots.values())  # the prompt's built them
    finally:
        detach_store(model.modules())


class _CpuGraphCall:
    """slot_graphs.GraphCall's interface on the CPU: a 'replay' computes with _CpuSlotLayers and writes the record
    (with a graph_predict.GraphPrediction, layer l+1's ranked prediction after it) into one reused buffer (as the
    graph writes its pinned one), and logs what it wrote."""

    def __init__(self, layers, layer, module, x, flat, weights, top_k, predict=None):
        self.layers, self.layer, self.module, self.top_k, self.predict = layers, layer, module, top_k, predict
        self.width = layers.table.snap[layer].numel()
        rows, width = (predict.rows, predict.width) if predict is not None else (0, 0)
        self.record = torch.zeros(self.width + flat.numel() + rows * width, dtype=torch.int64)
        self.snapshot, self.routed = self.record[:self.width], self.record[self.width:self.width + flat.numel()]
        self.predicted = self.record[self.width + flat.numel():].view(rows, width)
        self.values = torch.zeros(rows, width)
        self.event, self.graphs, self.timing = None, {}, {False: None, True: None}
        self.submitted = self.read = self.waits = 0

    pending = property(lambda self: self.read != self.submitted)

    def release(self, seq):
        self.read = seq

    def load(self, x, flat, weights, residual=None):
        self.x, self.flat, self.weights = x.clone(), flat.clone(), weights.clone()
        self.residual = None if residual is None else residual.reshape(x.shape).clone()
        return self.predict is not None and self.predict.refine and residual is not None

    def capture(self, host_pass):
        self.graphs[host_pass] = True

    def replay(self, host_pass):
        table = self.layers.table
        table.lookups(self.layer)
        out = self.layers.forward(self.layer, self.module, self.x, self.flat, self.weights, self.top_k, host_pass)
        self.record[:self.width].copy_(table.snap[self.layer])
        self.record[self.width:self.width + self.flat.numel()].copy_(self.flat)
        if self.predict is not None:
            residual = self.residual if self.residual is not None else torch.zeros_like(self.x)
            values, ids = self.predict(self.x, residual, out)
            self.predicted.copy_(ids)
            self.values.copy_(values)
            self.layers.predicted.append((self.layer, self.x, residual, out, ids.clone()))
        self.layers.written.append((self.layer, self.record.tolist()))
        self.submitted += 1
        return out


class _CpuGraphLayers(_CpuSlotLayers):
    def __init__(self, table):
        super().__init__(table)
        self.graphs, self.written, self.predicted = {}, [], []

    def graph_call(self, layer, module, x, flat, weights, top_k, predict=None):
        key = (layer, x.shape[0], top_k)
        if key not in self.graphs:
            self.graphs[key] = _CpuGraphCall(self, layer, module, x, flat, weights, top_k, predict)
        return self.graphs[key]


def test_graph_records_are_read_before_they_are_overwritten(tmp_path_factory, modules):
    """StoreConfig(gpu_graphs=True): a layer call's record lives in a buffer its next replay reuses; with the
    bookkeeping thread held back, the next call of that layer waits for it (counted), and the thread reads every
    record exactly as its call wrote it, in order."""
    import threading

    from moecompress.runtime.store import StoreConfig, attach_store, detach_store
    from moecompress.runtime.store.slot_path import SlotPath

    ckpt = tmp_path_factory.getbasetemp() / "slots0" / "ck"
    model = moecompress.from_pretrained(ckpt, dtype=torch.float32, verify=False).eval()
    mods = dict(enumerate(m for m in model.modules() if isinstance(m, PackedExperts)))
    host = HostExperts(mods, pin=False)
    total = sum(_nbytes(host).values())
    store = attach_store(model, ckpt, StoreConfig(budget=int(0.5 * total), policy="lru", gpu_graphs=True))
    try:
        table = SlotTable(host, store.cache.layout.nbytes, store.cache.capacity, "cpu",
                          {layer: m.num_experts for layer, m in mods.items()})
        store.cache.tier.host, store.cache.tier.slots = host, table
        path = store.slot_path = SlotPath(store, _CpuGraphLayers(table))
        gate, read, account, drain = threading.Event(), [], path.account, path.book.drain

        def held_account(r):  # the first record waits until the compute thread has to wait for it
            gate.wait(timeout=60)
            read.append((r.layer, torch.cat([r.snapshot, r.routed]).tolist()))
            account(r)

        def opening_drain():
            gate.set()
            drain()

        path.book.handle, path.book.drain = held_account, opening_drain
        ids = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 8]])
        decode_logits(model, ids)
        c = store.counters()
        layers = path.layers
        assert c["graph_error"] is None and c["graph_waits"] >= 1
        assert read == layers.written and len(read) == ids.shape[1] * len(mods)  # each record as written, in order
        assert layers.mismatches == 0 and c["hits"] + c["misses"] == c["uses"] > 0 and c["hits"] > 0
        assert set(table.taken) == set(store.cache.slots) and c["peak_bytes"] <= int(0.5 * total)
    finally:
        detach_store(model.modules())


def _decode_on_cpu_graphs(ckpt, mods, config, predictor=None, steps: int = 10):
    """Decode `steps` tokens with the store's slot path on _CpuGraphLayers -> (logits, store counters, layers)."""
    from moecompress.runtime.store import attach_store, detach_store
    from moecompress.runtime.store.slot_path import SlotPath

    model = moecompress.from_pretrained(ckpt, dtype=torch.float32, verify=False).eval()
    mods = dict(enumerate(m for m in model.modules() if isinstance(m, PackedExperts)))
    host = HostExperts(mods, pin=False)
    store = attach_store(model, ckpt, config, predictor=predictor)
    try:
        table = SlotTable(host, store.cache.layout.nbytes, store.cache.capacity, "cpu",
                          {layer: m.num_experts for layer, m in mods.items()})
        store.cache.tier.host, store.cache.tier.slots = host, table
        store.slot_path = SlotPath(store, _CpuGraphLayers(table))
        ids = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 8, 11, 23, 1, 77][:steps]])
        logits = decode_logits(model, ids)
        c = store.counters()
        c["requests_left"] = None if store.prefetcher is None else len(store.prefetcher.requests)
        assert set(table.taken) == set(store.cache.slots)
        return logits, c, store.slot_path.layers, store
    finally:
        detach_store(model.modules())


def test_graph_prediction_is_the_routers_and_reads_ahead(tmp_path_factory, modules):
    """StoreConfig(graph_prediction=True) (graph_predict.py): each layer call's 'graph' writes layer l+1's ranked
    prediction with its record: the first equal to the top-k of RouterPredictor.scores on the call's input, the
    refined one to that of residual_scores on the stream + the call's output; the bookkeeping thread reads ahead from
    it itself (nothing queued for the prefetch threads), the precision gate applies, and the logits equal those of
    the same store without prefetch and of one with a wrong router (a prediction never changes results)."""
    from moecompress.runtime.store import StoreConfig
    from moecompress.runtime.store.prefetch import RouterPredictor

    ckpt = tmp_path_factory.getbasetemp() / "slots0" / "ck"
    total = sum(_nbytes(HostExperts(modules, pin=False)).values())
    base = dict(budget=int(0.5 * total), policy="lru", gpu_graphs=True)
    ref, c0, _, _ = _decode_on_cpu_graphs(ckpt, modules, StoreConfig(**base))
    fields = dict(base, prefetch="router", prefetch_refine=True, prefetch_min_precision=0.5)
    got, c, layers, store = _decode_on_cpu_graphs(ckpt, modules, StoreConfig(**fields))
    assert all(torch.equal(a, b) for a, b in zip(got, ref)) and layers.mismatches == 0
    top_k = next(iter(layers.graphs.values())).top_k
    predictor = store.predictor
    last = max(modules)
    assert layers.predicted and all(layer < last for layer, *_ in layers.predicted)  # none for the last layer
    assert {layer for layer, *_ in layers.predicted} == set(range(last))
    for layer, x, residual, out, ids in layers.predicted:
        first = torch.topk(predictor.scores(layer, x, None, None), top_k).indices
        refined = torch.topk(predictor.residual_scores(layer, residual + out), top_k).indices
        assert ids.shape == (2, top_k) and torch.equal(ids[0], first) and torch.equal(ids[1], refined)
    assert c["prefetches"] > 0 and c["requests_left"] == 0  # read ahead from the bookkeeping thread
    assert c["hits"] + c["misses"] == c["uses"] == c0["uses"] and c["peak_bytes"] <= base["budget"]
    assert c["graph_error"] is None and c["slot_error"] is None
    # the gate: a rank is read ahead only while its precision is >= 0.5, and every rank was checked
    assert store.precision.precision and all(0.0 <= p <= 1.0 for p in store.precision.precision.values())
    # a wrong router (random weights) changes what is read ahead, never the logits
    gen = torch.Generator().manual_seed(1)
    wrong = RouterPredictor([torch.randn(predictor.routers[i].shape, generator=gen) if predictor.routers[i] is not None
                             else None for i in range(len(predictor.routers))], predictor.norms, predictor.eps)
    bad, cw, _, _ = _decode_on_cpu_graphs(ckpt, modules, StoreConfig(**fields), predictor=wrong)
    assert all(torch.equal(a, b) for a, b in zip(bad, ref)) and cw["prefetches"] > 0


def test_request_ranked_applies_floor_and_gate():
    """ExpertStore._request_ranked (the graph prediction's and the decode thread's common rules): the score floor
    (x the mean score), ranks whose precision fell below the gate, experts not held at layer l+1; inline fills stop
    at the first that finds no room."""
    from types import SimpleNamespace

    from moecompress.runtime.store.prefetch import RankPrecision
    from moecompress.runtime.store.store import ExpertStore

    filled, requested = [], []
    cache = SimpleNamespace(layout=SimpleNamespace(shapes=[{0: 1, 1: 1}, {e: 1 for e in range(6) if e != 4}]),
                            fill=lambda key, **kw: filled.append(key) or key[1] != 2)
    store = SimpleNamespace(cache=cache, config=SimpleNamespace(prefetch_floor=1.0),
                            prefetcher=SimpleNamespace(request=lambda layer, ranked: requested.append((layer, ranked))))
    precision = RankPrecision(0.5)
    precision.precision[(1, 1)] = 0.25  # rank 1 proved imprecise
    ranked, values = [3, 5, 4, 2, 0, 1], [0.4, 0.3, 0.2, 0.05, 0.03, 0.02]  # mean score 1/6
    ExpertStore._request_ranked(store, 0, ranked, values, 1 / 6, precision)
    assert requested == [(1, [3])] and precision.pending[1] == [3, 5, 4]  # floor; then the gate (5), 4 not held
    requested.clear()
    ExpertStore._request_ranked(store, 0, [0, 2, 1, 3], None, None, RankPrecision(0.5), inline=True)
    assert filled == [(1, 0), (1, 2)] and not requested  # stops at the fill that found no room
    ExpertStore._request_ranked(store, 1, [0], None, None, precision, inline=True)  # no layer after the last
    assert filled == [(1, 0), (1, 2)]


def test_gpu_tier_defaults():
    """default_config(tier="pinned"): pin 0.5 + LRU + router prefetch (+ refine, precision >= 0.5) made inside each
    layer call's graph (the H200's only setting meeting both 50 % goals, session 27); no pinning without statistics;
    the file tier keeps pin + router prefetch on the decode path."""
    from moecompress.runtime.store.config import default_config

    gpu, cpu = default_config(1 << 30, tier="pinned"), default_config(1 << 30)
    assert (gpu.tier, gpu.policy, gpu.pin_share, gpu.prefetch, gpu.prefetch_refine, gpu.prefetch_min_precision,
            gpu.gpu_slots, gpu.gpu_graphs, gpu.graph_prediction) == \
        ("pinned", "lru", 0.5, "router", True, 0.5, True, True, True)
    assert default_config(1 << 30, has_stats=False, tier="pinned").pin_share == 0.0
    assert (cpu.tier, cpu.prefetch, cpu.pin_share, cpu.budget) == ("file", "router", 0.5, 1 << 30)
    assert default_config(1 << 30, has_stats=False).pin_share == 0.0
