"""Several homes computing at once (real processes): what runs in each home's process besides its model.

Every home admits its own rows and runs its dense part at the same time as the others; every server answers the
requests of every home. A home is an expert server too, so two threads share its process:
- the front (the process the user talks to): its own rows in the caller's thread, its experts for the other homes
  in an `ExpertService` thread (serve_loop.serve on requests from any rank);
- a home besides the front (`run_home`): its experts in the main thread's serve loop (requests from any rank, pings,
  stats, the front's OP_ADMIT), the admitted rows in an `Admissions` thread that sends the result (OP_RESULT) to the
  front when done.
Requests and replies travel on separate gloo tags and every home posts a reply's receive when it sends the request
(transport.py), so a thread answering requests never waits for a thread computing rows: no deadlock, whichever home
waits on whichever. The two threads of a home share its experts under one lock (`homes.home_server`): the kernels
keep per-module scratch buffers. gloo only: NCCL has no receive from any rank.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.runtime.edge import wire
from moecompress.runtime.edge.serve_loop import serve
from moecompress.runtime.edge.transport import LONG_WAIT, RESULT_TAG, send_request


def check_gloo(device: torch.device) -> None:
    if device.type != "cpu":
        raise MoecompressError("several homes need gloo (a receive from any rank, tags); NCCL has neither: unset "
                               "MOECOMPRESS_EDGE_DEVICE or deploy with one home")


class ExpertService:
    """The front's experts answering the other homes' requests in a thread, until each other home said stop."""

    def __init__(self, handler, rank: int, world_size: int, device: torch.device, other_homes: int):
        self.error: BaseException | None = None

        def run():
            try:
                serve(handler, rank, rank, None, rank, world_size, device, any_source=True, stops=other_homes,
                      wait=LONG_WAIT)  # the front may compute longer than the group's timeout between requests
            except BaseException as exc:  # noqa: BLE001 -- a lost home: the front's own exchange names it
                self.error = exc

        self.thread = threading.Thread(target=run, name=f"experts-of-home-{rank}", daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)


class Admissions:
    """A home besides the front: runs the rows the front admits here, one request at a time, in a thread; sends
    each result to the front (RESULT_TAG) when done."""

    def __init__(self, deployment, front: int, device: torch.device):
        from moecompress.runtime.edge.homes import run_admission

        self.deployment, self.front, self.device = deployment, front, device
        self._queue: queue.Queue = queue.Queue()

        def run():
            while (request := self._queue.get()) is not None:
                try:
                    result = run_admission(self.deployment, request)
                except Exception as exc:  # noqa: BLE001 -- reported to the front, which stops the deployment
                    result = {"error": f"{type(exc).__name__}: {exc}"}
                head, payload = wire.encode_object(wire.OP_RESULT, result)
                try:  # the front takes it once its own rows are done, however long they take
                    send_request(self.front, head, payload, self.device, tag=RESULT_TAG, wait=LONG_WAIT)
                except RuntimeError:
                    return  # the front is gone: the serve loop stops on its own

        self.thread = threading.Thread(target=run, name="admissions", daemon=True)
        self.thread.start()

    def submit(self, request: dict) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(None)
        self.thread.join(timeout=5)


def run_home(info, rank: int, world_size: int, init_method: str, timeout: float, dtype: torch.dtype,
             ready: str | None, front: int, expert_budget: int | None = None) -> None:
    """A home besides the front: its home model (the rows the front admits here) and its experts for every home
    (under a store of `expert_budget` bytes when given)."""
    from dataclasses import replace

    import torch.distributed as dist

    from moecompress.execution.counters import Counters
    from moecompress.runtime.edge.dispatcher import DispatchedExperts
    from moecompress.runtime.edge.homes import home_server
    from moecompress.runtime.edge.running import Deployment, home_model
    from moecompress.runtime.edge.transport import TorchDistributed, init_group

    info = replace(info, home=rank)  # this rank's sequences are routed from here
    counters = Counters(world_size, len(info.experts_paths))
    model, _ = home_model(info, dtype, None, counters, None, None, expert_budget,  # loaded before joining
                          router_prefetch=False)
    num_experts = len(info.assignment[0]) if info.assignment else 0
    if ready:
        Path(ready).write_text("ready")
    device = init_group(init_method, rank, world_size, timeout)
    transport = TorchDistributed(rank, world_size, timeout, device, downstream=[])  # no pings, no stop: the front's
    try:
        check_gloo(device)
        for module in model.modules():
            if isinstance(module, DispatchedExperts):
                module.transport = transport
        deployment = Deployment(model, info, transport, counters)
        deployment._abort = lambda: None  # a failed admission is reported to the front, which stops everyone
        admissions = Admissions(deployment, front, device)
        try:
            serve(home_server(rank, model, num_experts), rank, front, None, front, world_size, device,
                  any_source=True, admit=admissions.submit, stop_to=front)
        finally:
            admissions.close()
    finally:
        transport.abandon()
        dist.destroy_process_group()
