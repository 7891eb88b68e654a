"""A slot-table layer call as one CUDA graph replay (StoreConfig(gpu_graphs=True)): what gpu_layer.SlotLayers runs
as ~12 launches and copies per call (the snapshot and both lookups, the device plan, the host plan and the add, the
sum, the record copies for the bookkeeping) captured once per (layer, tokens, top_k, dtypes) and host pass, then
replayed: the decode thread enqueues 3 input copies, one replay and an output copy instead, so a layer call costs
the CPU about what the fully resident layer's 4-5 launches cost.

The graph replays the same launches of the same plans over the same lookups, pools and host copy, so its output is
the eager call's bit for bit. A replay is one operation on the compute stream: an eviction (slots.SlotTable.evict,
on the same stream) lands wholly before or after it, never between the snapshot and the launches that use it.

The record the bookkeeping thread reads (the snapshot's resident flags, then the routed expert ids: int64 [W + T*K])
(and, with a graph_predict.GraphPrediction, layer l+1's ranked predicted ids and their scores) is written by the
graph into pinned host memory that the graph reuses: a call waits, before its replay, until the
bookkeeping has read the previous record of the same buffers (`pending`; the thread is about a layer call behind, so
this is rare and counted in `waits`). The host plan's time is measured with events recorded inside the graph
(external events) where this torch has them.
"""
from __future__ import annotations

import torch

from moecompress.runtime.store.tiers import device_view


def _timing_events():
    """Two timing events a capture records as graph nodes (torch >= 2.6: external events), or None."""
    try:
        return torch.cuda.Event(enable_timing=True, external=True), torch.cuda.Event(enable_timing=True, external=True)
    except TypeError:
        return None


class GraphCall:
    """One layer's calls at a number of tokens and top_k: static inputs, output and record, and a graph per host
    pass (captured at its first call)."""

    def __init__(self, layers, layer: int, module, x: torch.Tensor, flat: torch.Tensor, weights: torch.Tensor,
                 top_k: int, predict=None):
        """predict: graph_predict.GraphPrediction (layer l+1's prediction, captured after the launches) or None."""
        self.layers, self.layer, self.module, self.top_k, self.predict = layers, layer, module, top_k, predict
        device, table = x.device, layers.table
        self.on_device, self.on_host = layers._plans(layer, module, x.shape[0], top_k, x.dtype, device)
        self.x = torch.zeros_like(x)  # [T, H] (static inputs: the graph reads them)
        self.flat = torch.zeros_like(flat)  # [T * K] expert ids
        self.weights = torch.zeros_like(weights)  # [T * K]
        self.out = torch.empty(x.shape[0], self.on_device.hidden, dtype=x.dtype, device=device)  # [T, H]
        self.width = table.snap[layer].numel()
        rows, width = (predict.rows, predict.width) if predict is not None else (0, 0)
        self.residual = torch.zeros_like(x) if predict is not None and predict.refine else None  # [T, H]
        # [W + T*K + rows*width]: the snapshot, the routed ids, then layer l+1's predicted ids (ranked, per row)
        self.record = torch.zeros(self.width + flat.numel() + rows * width, dtype=torch.int64, pin_memory=True)
        self.snapshot = self.record[:self.width]
        self.routed = self.record[self.width:self.width + flat.numel()]
        self.predicted = self.record[self.width + flat.numel():].view(rows, width)
        self.values = torch.zeros(rows, width, dtype=torch.float32, pin_memory=True)  # their scores
        self._record_view = device_view(self.record, device)
        self._values_view = device_view(self.values, device)
        self.event = torch.cuda.Event()  # after the replay: the record is written
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.timing: dict[bool, tuple | None] = {}
        self.submitted = self.read = 0  # records handed to / read by the bookkeeping thread
        self.waits = 0

    @property
    def pending(self) -> bool:
        """The bookkeeping has not read this call's last record yet (the next replay would overwrite it)."""
        return self.read != self.submitted

    def release(self, seq: int) -> None:
        """The bookkeeping thread read record `seq` (the only writer of `read`)."""
        self.read = seq

    def load(self, x: torch.Tensor, flat: torch.Tensor, weights: torch.Tensor,
             residual: torch.Tensor | None = None) -> bool:
        """The call's inputs into the static ones; -> whether the refined prediction of this replay is valid (its
        residual stream was given)."""
        self.x.copy_(x)
        self.flat.copy_(flat)
        self.weights.copy_(weights)
        if self.residual is None or residual is None:
            return False
        self.residual.copy_(residual.reshape(self.residual.shape))
        return True

    def capture(self, host_pass: bool) -> None:
        """Capture the graph of this host pass unless done (with the table's lock held)."""
        if host_pass not in self.graphs:
            self.graphs[host_pass] = self._capture(host_pass)

    def replay(self, host_pass: bool) -> torch.Tensor:
        """Enqueue the call (its lookups from the resident flags as they are when it runs; call with the table's lock
        held, as the eager call is); returns a copy of the output. The record follows `self.event`."""
        self.graphs[host_pass].replay()
        self.event.record()
        self.submitted += 1
        return self.out.clone()

    def _body(self, host_pass: bool, timing) -> None:
        table, layer = self.layers.table, self.layer
        table.lookups(layer)
        self.layers.compute(self.on_device, self.on_host, self.x, self.flat, self.weights, self.out, host_pass,
                            timing)
        routed_end = self.width + self.flat.numel()
        self._record_view[:self.width].copy_(table.snap[layer], non_blocking=True)
        self._record_view[self.width:routed_end].copy_(self.flat, non_blocking=True)
        if self.predict is not None:  # layer l+1's prediction (graph_predict.py): nothing above depends on it
            values, ids = self.predict(self.x, self.residual, self.out)
            self._record_view[routed_end:].copy_(ids.reshape(-1), non_blocking=True)
            self._values_view.copy_(values, non_blocking=True)

    def _capture(self, host_pass: bool) -> torch.cuda.CUDAGraph:
        device = self.x.device
        self._body(host_pass, None)  # eagerly once: Triton compiles any launch not run yet (never inside a capture)
        timing = _timing_events() if host_pass else None
        stream, current = torch.cuda.Stream(device), torch.cuda.current_stream(device)
        stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the bookkeeping and prefetch threads keep enqueuing copies and evictions meanwhile
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self._body(host_pass, timing)
            finally:
                graph.capture_end()
        current.wait_stream(stream)
        self.timing[host_pass] = timing
        return graph
