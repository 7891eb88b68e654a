"""Deferred bookkeeping of the GPU tier's layer calls (store.ExpertStore on the slot table): the compute thread never
waits for the device. Per layer call it enqueues copies of the routing, the resident-flag snapshot the call computed
with, and the predictors' scores into pinned host memory, records an event, and hands the record to one thread here,
which waits for the event and then does what the CPU store does inline: counts hits (the snapshot's resident
experts) and misses, updates the eviction policy, reads the missed experts into slots, checks and makes predictions.
The fast tier's contents thus follow the device by about a layer call; outputs do not depend on it (gpu_layer.py).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch


@dataclass
class CallRecord:
    layer: int
    top_k: int
    event: object  # CUDA event recorded after the copies below (None on the CPU: they are done)
    routed: torch.Tensor  # [T * K] expert ids (host)
    snapshot: torch.Tensor  # [W] bool: resident when the call computed (host)
    unmaps: int  # the layer's evictions when the call was enqueued (slots.SlotTable.unmaps)
    scores: torch.Tensor | None = None  # prediction for layer + 1 (host), or None
    refine: torch.Tensor | None = None  # second prediction for layer + 1 (host), or None
    timing: tuple | None = None  # (start, end) CUDA events around the host-memory plan, or None
    release: object = None  # called once routed, snapshot and timing were read (a graph reuses them), or None
    # layer + 1's prediction made inside a graph (graph_predict.py): ranked ids [rows, width] and their scores (host,
    # the graph's buffers: read before release), the mean score (prefetch_floor's unit), whether row 1 (the refined
    # prediction) is valid
    predicted: torch.Tensor | None = None
    predicted_values: torch.Tensor | None = None
    predicted_mean: float | None = None
    refined: bool = False


def to_host(t: torch.Tensor) -> torch.Tensor:
    """An asynchronous copy of device tensor `t` into pinned host memory (valid once the call's event completed)."""
    if t.device.type == "cpu":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class Bookkeeper:
    """One thread running `handle(record)` for each record, in order."""

    def __init__(self, handle):
        self.handle = handle
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.cpu_s = 0.0  # CPU seconds of `handle` so far (its thread's clock, the waits for the device left out)
        self.thread = threading.Thread(target=self._run, name="moecompress-bookkeeping", daemon=True)
        self.thread.start()

    def submit(self, record: CallRecord) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(record)

    def drain(self) -> None:
        """Wait until every record submitted so far was handled."""
        self.queue.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            record = self.queue.get()
            try:
                if record is None:
                    return
                if record.event is not None:
                    record.event.synchronize()
                start = time.thread_time()
                self.handle(record)
                self.cpu_s += time.thread_time() - start
            except BaseException as exc:  # noqa: BLE001 (raised on the compute thread at its next submit / drain)
                self.error = exc
            finally:
                self.queue.task_done()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)
