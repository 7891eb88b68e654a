"""The expert store's GPU slot-table path (StoreConfig(tier="pinned", gpu_slots=True)): decode calls that the fully
resident layer would run on the CUDA pair path run the same kernels over the slot table's device pools plus the
pinned host copy (slots.py, gpu_layer.py), equal to the resident layer bit for bit and with no host sync; counting,
the policy, reads into slots and prediction follow on the bookkeeping thread once the device has run the call
(deferred.py). Other calls (prefill, copies, overlap=False) take the store's per-expert path over the same slots.
With StoreConfig(gpu_graphs=True) (the default) a call's launches are one CUDA graph replay (slot_graphs.py): the
same kernels on the same data, ~150 instead of ~400 µs of the decode thread's time per layer call on the H200's host.
"""
from __future__ import annotations

import functools

import torch

from moecompress.runtime.store.deferred import Bookkeeper, CallRecord, to_host


class SlotPath:
    """One store's slot-table path: `layers` (gpu_layer.SlotLayers, or a stand-in with its interface) over
    `layers.table` (slots.SlotTable); `store` (store.ExpertStore) holds the cache, the policy and the predictors."""

    def __init__(self, store, layers):
        self.store, self.layers, self.table = store, layers, layers.table
        self.book = Bookkeeper(self.account)
        self._full: dict[int, int] = {}  # layer -> its evictions when a call last saw every held expert resident
        self._predictions: dict = {}  # (layer, top_k) -> graph_predict.GraphPrediction or None
        self.ran = False  # a call has run on this path (a later failure is raised, not fallen back from)
        self.error: str | None = None  # why the path failed at its first call (the store then took the other path)
        self.graph_error: str | None = None  # why capturing a layer call's graph failed (then eager launches)
        self.graph_timing = True  # the graphs' host-plan events give times (False once reading one failed)

    def takes(self, layer: int, module, hidden: torch.Tensor, top_k_index: torch.Tensor) -> bool:
        config = self.store.config
        return (self.error is None and config.copy_threshold is None and config.overlap
                and self.layers.eligible(layer, module, hidden, top_k_index))

    def forward(self, layer: int, module, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        """One batched launch per projection over the resident slots, one over the pinned host copy for the others;
        the bookkeeping (counters, policy, reads, prediction) follows on the bookkeeping thread."""
        store, table, top_k = self.store, self.table, top_k_index.shape[1]
        x, flat = hidden.contiguous(), top_k_index.reshape(-1).contiguous()
        weights = top_k_weights.reshape(-1).contiguous()
        on_cuda = x.is_cuda
        residual = store.residuals.pop(layer, None)  # (the refine's stream, hooked in front of the block)
        call, refined = None, False
        if store.config.gpu_graphs and self.graph_error is None and hasattr(self.layers, "graph_call"):
            call = self.layers.graph_call(layer, module, x, flat, weights, top_k, self._prediction(layer, top_k, x))
            if call.pending:  # the bookkeeping has not read its last record yet: let it (rare; counted)
                call.waits += 1
                self.book.drain()
            refined = call.load(x, flat, weights, residual)
        with table.lock:  # no eviction between the snapshot and the launches that use it
            unmaps = table.unmaps[layer]
            host_pass = self._full.get(layer) != unmaps
            if call is not None:
                try:
                    call.capture(host_pass)
                except Exception as exc:  # noqa: BLE001 (capturing failed on this machine: eager calls from now on)
                    self.graph_error, call = f"{type(exc).__name__}: {exc}", None
            if call is None:
                table.lookups(layer)
                timing = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) \
                    if on_cuda and host_pass else None
                out = self.layers.forward(layer, module, x, flat, weights, top_k, host_pass, timing)
                snapshot, routed, event, release = to_host(table.snap[layer]), to_host(flat), None, None
            else:  # the same launches as one replay; the record lands in the call's pinned buffer
                out = call.replay(host_pass)
                snapshot, routed, event = call.snapshot, call.routed, call.event
                timing = call.timing[host_pass] if self.graph_timing else None
                release = functools.partial(call.release, call.submitted)
        predict = None if call is None else call.predict  # layer l+1's prediction made by the replay
        scores = refine = None
        if store.predictor is not None and predict is None:  # on this thread (the eager and the paths predictors)
            scores = store.predictor.scores(layer, hidden, top_k_index, top_k_weights)
            if residual is not None:
                refine = store.predictor.residual_scores(layer, residual.reshape(-1, residual.shape[-1]) +
                                                         out.to(residual.dtype))
        record = CallRecord(layer, top_k, event, routed, snapshot, unmaps,
                            None if scores is None else to_host(scores.float()),
                            None if refine is None else to_host(refine.float()), timing, release)
        if predict is not None:
            record.predicted, record.predicted_values = call.predicted, call.values
            record.predicted_mean, record.refined = 1.0 / predict.experts, refined
        if on_cuda and (event is None or scores is not None or refine is not None):
            record.event = torch.cuda.Event()  # (after the copies above)
            record.event.record()
        self.book.submit(record)
        self.ran = True
        return out

    def _prediction(self, layer: int, top_k: int, x: torch.Tensor):
        """The graph_predict.GraphPrediction a layer's graph computes (StoreConfig.graph_prediction, the router
        predictor), or None (then any prediction runs on this thread as before)."""
        store, config = self.store, self.store.config
        if not (config.graph_prediction and store.predictor is not None):
            return None
        key = (layer, top_k)
        if key not in self._predictions:
            from moecompress.runtime.store.graph_predict import GraphPrediction

            if hasattr(store.predictor, "to"):
                store.predictor.to(x.device)
            self._predictions[key] = GraphPrediction.make(store.predictor, layer, top_k, config.prefetch_width,
                                                          config.prefetch_refine and bool(store.hooks))
        return self._predictions[key]

    def account(self, r: CallRecord) -> None:
        """The bookkeeping thread's part of a layer call (after the device ran it)."""
        store, cache = self.store, self.store.cache
        layer, held = r.layer, cache.layout.shapes[r.layer]
        routed = {e for e in r.routed.tolist() if e in held}
        snap = r.snapshot.tolist()
        predicted = None if r.predicted is None else (r.predicted.tolist(), r.predicted_values.tolist())
        stall = None
        if r.timing is not None:
            try:
                stall = r.timing[0].elapsed_time(r.timing[1]) / 1000
            except RuntimeError:  # events recorded inside a graph that this CUDA / torch cannot time: not measured
                if r.release is None:
                    raise
                self.graph_timing = False
        if r.release is not None:  # (a graph's record and events: its next replay may overwrite them now)
            r.release()
        hits = sorted(e for e in routed if snap[e])
        misses = sorted(e for e in routed if not snap[e])
        cache.begin_call(layer)
        if store.prefetcher is not None:
            store.prefetcher.begin_call()
            store.precision.routed(layer, routed)
            store.refine_precision.routed(layer, routed)
        cache.account(layer, hits, misses)
        if stall is not None:
            with cache.cond:  # the compute stream's time on the host-memory plan: what the misses cost
                cache.counters.stall_s += stall
        store._calls += 1
        if cache.policy.keep_after_layer:  # (on demand keeps nothing: its misses stay on the host copy)
            for e in misses:
                cache.fill((layer, e), wait=False)
        cache.end_layer(layer)
        if all(snap[e] for e in held):
            self._full[layer] = r.unmaps
        if store.prefetcher is not None and predicted is not None:  # made by the graph: copies enqueued from here
            (ids, *refined), (values, *_) = predicted
            store._request_ranked(layer, ids, values, r.predicted_mean, store.precision, inline=True)
            if refined and r.refined:
                store._request_ranked(layer, refined[0], None, None, store.refine_precision, inline=True)
        elif store.prefetcher is not None:
            store._request(layer, r.scores, r.top_k)
            store._request_refined(layer, r.refine, r.top_k)

    def drain(self) -> None:
        """Wait until every layer call enqueued so far has been accounted."""
        if self.book is not None:
            self.book.drain()

    def close(self) -> None:
        if self.book is not None:  # detach_store closes the one store once per MoE layer: close the thread once
            self.book.drain()
            self.book.close()
            self.book = None
