"""Measure the expert model's per-request transport cost: the runtime's torch.distributed exchange on loopback.

The compute profile's `message_seconds` and `serve_seconds` time the dispatcher and the expert server in one process
(InProcess transport: encoding, decoding, sums). A real request also goes through torch.distributed (gloo): the
home's isend of the request (header and payload in one message: wire.frame), the server's receive loop waking up,
its send, the home's receive and
waits, on both ends' CPUs. `measure_transport` times exactly that path, the runtime's own code on both ends
(runtime/edge/transport.TorchDistributed on the home, runtime/edge/serve.serve on a second local process answering
every request with a reply of the size the real server sends), with decode-sized messages: the median wall seconds
of one request + reply, less nothing (loopback's own latency, tens of microseconds, stays in it). The time model
adds it once per request (execution/timing.add_dispatch), on top of the link's latency and bandwidth.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moecompress.errors import MoecompressError


class EchoHandler:
    """An expert server's replies without its experts: zeros of the size an OP_EXPERT reply has."""

    def handle(self, head: list[int], payload: torch.Tensor):
        from moecompress.runtime.edge import wire

        _, _, rows, _, code, hidden_size = head[:6]
        return [(0, None, torch.zeros(rows * hidden_size * wire.dtype_of(code).itemsize, dtype=torch.uint8))]

    def control(self, op: int) -> None:
        pass

    def stats(self) -> list[float]:
        return [0.0, 0.0, 0.0]


def _serve(init_method: str, timeout: float) -> None:
    from moecompress.runtime.edge.serve import serve
    from moecompress.runtime.edge.transport import init_group

    device = init_group(init_method, 1, 2, timeout)
    try:
        serve(EchoHandler(), 1, 0, None, 0, 2, device)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


def measure_transport(rows: int, hidden_size: int, top_k: int, dtype: torch.dtype, reps: int = 100,
                      timeout: float = 300.0, gap: float = 0.0) -> float:
    """Median wall seconds of one OP_EXPERT request of `rows` rows + its reply between two local processes over the
    runtime's torch.distributed transport (gloo on loopback), after 20 warm-up round trips. `gap`: seconds the home
    computes between two requests (as a decode step does between its MoE layers: the server idles meanwhile and
    has to wake up, which a back-to-back ping-pong would not show)."""
    import torch.distributed as dist

    from moecompress.runtime.edge import wire
    from moecompress.runtime.edge.transport import TorchDistributed, init_group

    if dist.is_initialized():
        raise MoecompressError("measure_transport needs a process without a torch.distributed group of its own")
    tmp = Path(tempfile.mkdtemp(prefix="moecompress-transport-"))
    init = f"file://{tmp / 'rendezvous'}"
    child = subprocess.Popen([sys.executable, "-c", f"from moecompress.shard.profile_transport import _serve; "
                              f"_serve({init!r}, {timeout!r})"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    transport = None
    try:
        device = init_group(init, 0, 2, timeout)
        transport = TorchDistributed(0, 2, timeout, device)
        head = wire.request_header(0, rows, top_k, dtype, hidden_size)
        payload = torch.zeros(wire.request_payload_bytes(rows, hidden_size, top_k, dtype), dtype=torch.uint8)
        reply = rows * hidden_size * dtype.itemsize
        times = []
        for i in range(reps + 20):
            busy = time.thread_time() + gap
            while time.thread_time() < busy:  # the home's own work between two MoE layers
                pass
            start = time.perf_counter()
            transport.expect(1, reply)  # as the dispatcher does: the reply's receive is posted with the request
            transport.request(1, head, payload)
            transport.reply(1, reply)
            if i >= 20:
                times.append(time.perf_counter() - start)
        return statistics.median(times)
    except RuntimeError as exc:
        server = child.stderr.read().decode(errors="replace")[-300:] if child.poll() is not None else "running"
        raise MoecompressError(f"could not time the transport on loopback ({str(exc).splitlines()[0]}); "
                               f"server: {server}") from exc
    finally:
        if transport is not None:
            transport.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
