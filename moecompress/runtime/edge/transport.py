"""How the home's messages reach the other servers: in one process (simulation) or over torch.distributed.

A message is a header (int64 [8], wire.py) and, for most ops, one uint8 payload whose size the header determines;
on gloo both go as one torch.distributed message when they fit wire.FRAME_BYTES (`send_request`, `recv_request`).
The home `request`s work from a server and later takes the `reply` (payload only, size known to the home). A
server's `Handler` turns a request into outgoing messages: a reply to the home, or (pipeline) the next stage's
request. `InProcess` runs the servers' handlers in the calling process on the very same bytes; `TorchDistributed`
sends them to one process per server (gloo on CPU, NCCL on GPU: `init_group`).

Device: `MOECOMPRESS_EDGE_DEVICE=cuda` (inherited by the servers a launcher starts) puts each rank's exchange on
its own GPU (`cuda:LOCAL_RANK`, else `cuda:RANK`; one GPU per rank) and the process group on NCCL: headers and
payloads are sent and received as CUDA tensors. The default, `cpu`, is gloo over TCP. The ranks' compute stays on
the CPU either way (the packed experts' kernels are CPU kernels).

Tags (gloo): requests travel on REQUEST_TAG, replies (a payload alone, to the home that asked) on REPLY_TAG,
several homes' admission results on RESULT_TAG, so a rank that is a home and an expert server at once (homes.py)
receives its replies in one thread while another answers requests. The home posts the receive of a reply when it
sends the request (`expect`): a server's reply never waits for the home to get round to it (gloo sends only into a
posted receive), which is what keeps homes that serve each other free of deadlock. NCCL has no tags (and no
receive from any rank): one home only, as before.

Link emulation (tests of the time model without netem): `MOECOMPRESS_LINK_DELAY=LATENCY[,RATE]` (e.g. `5ms` or
`5ms,100Mbit/s`) makes every rank wait before each message it sends: the one-way latency, plus the message's
bytes / RATE when a rate is given (serialisation); it sleeps until SPIN_SECONDS before the deadline, then spins.
Counted as exchange time. See `LinkDelay`.
"""
from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch

from moecompress.errors import MoecompressError
from moecompress.runtime.edge import wire

Outgoing = list[tuple[int, "torch.Tensor | None", torch.Tensor]]  # (destination, header or None, payload)


class Handler(Protocol):
    def handle(self, head: list[int], payload: torch.Tensor) -> Outgoing: ...

    def control(self, op: int) -> None: ...

    def stats(self) -> list[float]: ...


REQUEST_TAG, REPLY_TAG, RESULT_TAG = 0, 1, 2
LONG_WAIT = timedelta(days=1)  # a wait that only a closed connection ends (a home busy with its own rows)
DEVICE_ENV = "MOECOMPRESS_EDGE_DEVICE"
DELAY_ENV = "MOECOMPRESS_LINK_DELAY"
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def exchange_device(rank: int) -> torch.device:
    """The device a rank exchanges tensors on, from MOECOMPRESS_EDGE_DEVICE (cpu | cuda); CUDA: one GPU per rank."""
    kind = os.environ.get(DEVICE_ENV, "cpu").strip().lower() or "cpu"
    if kind not in BACKENDS:
        raise MoecompressError(f"{DEVICE_ENV}={kind!r}; allowed: {', '.join(BACKENDS)}")
    if kind == "cpu":
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", rank))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise MoecompressError(f"{DEVICE_ENV}=cuda: rank {rank} needs GPU {index}, this machine has {count} "
                               "(one GPU per rank)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_group(init_method: str, rank: int, world_size: int, timeout: float) -> torch.device:
    """Join the deployment's process group on the backend of this rank's exchange device (gloo: CPU, NCCL: CUDA);
    returns that device."""
    import torch.distributed as dist

    device = exchange_device(rank)
    dist.init_process_group(BACKENDS[device.type], init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))
    return device


_RATE = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
SPIN_SECONDS = 100e-6  # the link emulation sleeps until this long before a deadline, then spins (sleep overshoot)


@dataclass(frozen=True)
class LinkDelay:
    """Emulated link: wait latency (+ bytes / rate) before each message a rank sends. From MOECOMPRESS_LINK_DELAY
    ('5ms' or '5ms,100Mbit/s'); `None` when unset. One message = a header and its payload (counters.py). A server
    pays the latency on every message; the home once per send phase (its requests to several servers of one layer
    go out in parallel, as the time model's hops count them); the rate is paid per byte by whoever sends."""

    latency: float  # seconds, one way
    rate: float | None = None  # bytes per second, None: no serialisation delay

    @classmethod
    def from_env(cls) -> "LinkDelay | None":
        text = os.environ.get(DELAY_ENV, "").strip()
        if not text:
            return None
        m = re.fullmatch(r"([\d.]+)\s*(s|ms|us)\s*(?:,\s*([\d.]+)\s*([A-Za-z]+)(?:/s)?)?", text)
        if not m or (m.group(4) and m.group(4).lower() not in _RATE):
            raise MoecompressError(f"{DELAY_ENV}={text!r}: write LATENCY[,RATE], e.g. 5ms or 5ms,100Mbit/s")
        rate = float(m.group(3)) * _RATE[m.group(4).lower()] if m.group(3) else None
        return cls(float(m.group(1)) * _TIME[m.group(2)], rate)

    def before_send(self, nbytes: int, first: bool) -> float:
        """Hold the sender for a message part of `nbytes` (`first`: the part that opens a message, pays the
        latency); returns the seconds held. Sleeps until SPIN_SECONDS before the deadline, then spins: a spin alone
        burns a core per sending rank for the whole latency (more ranks than cores slow each other), a sleep alone
        overshoots by the OS wake-up (60-100 us measured here). The cost of sleeping: session 21 (quiet) measured
        the home's thread CPU per decode step at 16.8 ms without the emulation and 24-26 ms with plain sleeps of
        0.5 / 5 ms (caches cooled while asleep); session 22 therefore spun the whole wait; whether this mix brings
        that back is for the quiet netns run to show (bench_edge_netns.py's home CPU column)."""
        seconds = (self.latency if first else 0.0) + (nbytes / self.rate if self.rate else 0.0)
        if seconds > 0:
            end = time.perf_counter() + seconds
            if seconds > SPIN_SECONDS:
                time.sleep(seconds - SPIN_SECONDS)
            while time.perf_counter() < end:
                pass
        return seconds


def message_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def one_message(device: torch.device) -> bool:
    """Whether a request's header and payload travel as one message (gloo; wire.frame)."""
    return device.type == "cpu"


def send_request(dst: int, head: torch.Tensor, payload: torch.Tensor | None, device: torch.device,
                 tag: int = REQUEST_TAG, wait: timedelta | None = None) -> None:
    """Send a request (header, payload or None) as wire.frame cuts it; blocking (`wait`: for at most that long,
    else the group's timeout)."""
    import torch.distributed as dist

    parts = [p.to(device) for p in wire.frame(head, payload, one_message(device))]
    if wait is None:
        for part in parts:
            dist.send(part, dst, tag=tag)
        return
    for work in [dist.isend(part, dst, tag=tag) for part in parts]:
        work.wait(wait)


def recv_request(src: int | None, device: torch.device, buffer: torch.Tensor | None = None, tag: int = REQUEST_TAG,
                 wait: timedelta | None = None) -> tuple[int | None, list[int], torch.Tensor]:
    """Wait for a request from `src` (None: any rank) -> (the sender as dist.recv says it, header, payload on the
    CPU). The wait for the first message is idle time; a second message (a large payload) follows at once.
    buffer: the first message's receive buffer (`wire.first_buffer`), reused from call to call: the payload
    returned may be a view into it, valid until the next call with that buffer. wait: how long the first
    message may take (None: the group's timeout)."""
    import torch.distributed as dist

    one = one_message(device)
    first = buffer if buffer is not None else wire.first_buffer(one, device)
    if wait is None:
        sender = dist.recv(first, src, tag=tag)
    else:
        work = dist.irecv(first, src, tag=tag)
        work.wait(wait)
        sender = src if src is not None else work._source_rank()
    head, payload = wire.unframe(first, one)
    if payload is None:
        payload = torch.empty(wire.payload_bytes(head), dtype=torch.uint8, device=device)
        dist.recv(payload, src if sender is None or sender < 0 else int(sender), tag=tag)
        payload = payload.cpu()
    return sender, head, payload


def send_reply(dst: int, payload: torch.Tensor, device: torch.device) -> None:
    """A server's reply (a payload alone) to the home that asked; that home posted its receive (`expect`)."""
    import torch.distributed as dist

    dist.send(payload.to(device), dst, tag=REPLY_TAG)


class InProcess:
    """N virtual servers in this process: every request runs the destination's handler on the encoded bytes."""

    def __init__(self, home: int, handlers: dict[int, Handler], world_size: int):
        self.rank, self.home, self.world_size = home, home, world_size
        self.handlers = handlers
        self._replies: dict[int, deque] = {n: deque() for n in range(world_size)}

    def request(self, dst: int, head: torch.Tensor, payload: torch.Tensor | None) -> None:
        queue = [(dst, head, payload)]
        while queue:
            d, h, p = queue.pop(0)
            if d == self.home:
                continue
            out = self.handlers[d].handle(h.tolist(), p)
            for nxt, nh, np_ in out:
                if nxt == self.home or nh is None:  # a payload alone answers the home that asked (several homes)
                    self._replies[d].append(np_)
                else:
                    queue.append((nxt, nh, np_))

    def expect(self, src: int, nbytes: int) -> None:
        """(TorchDistributed posts the reply's receive here; in one process the reply is queued by `request`.)"""

    def reply(self, src: int, nbytes: int) -> torch.Tensor:
        payload = self._replies[src].popleft()
        if payload.numel() != nbytes:
            raise MoecompressError(f"server {src} replied {payload.numel()} bytes, {nbytes} expected")
        return payload

    def control(self, op: int) -> None:
        for handler in self.handlers.values():
            handler.control(op)

    def gather_stats(self) -> dict[int, list[float]]:
        return {n: h.stats() for n, h in self.handlers.items()}

    def close(self) -> None:
        self.control(wire.OP_STOP)


class TorchDistributed:
    """The home's end of a torch.distributed process group; the other ranks run `serve`.

    `watch(rank) -> str | None` (from the launcher) says why a rank is gone, to name it in errors. While the home
    is idle a thread sends keep-alive pings, so that servers waiting for work time out only when the home is gone.
    """

    def __init__(self, home: int, world_size: int, timeout: float, device: torch.device, watch=None,
                 downstream: list[int] | None = None, chain_end: dict[int, int] | None = None):
        self.rank, self.home, self.world_size = home, home, world_size
        self.timeout, self.device, self.watch = timeout, device, watch
        self.downstream = downstream if downstream is not None else [n for n in range(world_size) if n != home]
        self.chain_end = chain_end or {}  # pipeline: first stage after the home -> the last stage (answers)
        self.delay = LinkDelay.from_env()
        self._phase_open = True  # the next request opens a send phase (pays the latency once: sent in parallel)
        self.lock = threading.RLock()
        self._pending: list = []
        self._expected: dict[int, tuple] = {}  # src -> (work, buffer) of a posted reply receive
        self.exchange_seconds = 0.0
        self.delay_seconds = 0.0  # of it, held by the link emulation (a sleep, then a spin, on this thread)
        self.delay_cpu_seconds = 0.0  # this thread's CPU time in the emulation (its spins)
        self._closed = threading.Event()
        self._last = time.monotonic()
        self._pinger = threading.Thread(target=self._ping_loop, daemon=True)
        self._pinger.start()

    def _ping_loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a new thread starts on GPU 0
        interval = max(self.timeout / 4, 0.05)
        while not self._closed.wait(interval):
            if time.monotonic() - self._last >= interval and self.lock.acquire(blocking=False):
                try:
                    if not self._closed.is_set():
                        for n in self.downstream:
                            self._send(n, wire.header(wire.OP_PING), None, delay=False)  # not counted either
                        self._last = time.monotonic()
                except Exception:  # the next real exchange reports the failure, naming the rank
                    pass
                finally:
                    self.lock.release()

    def _send(self, dst: int, head: torch.Tensor, payload: torch.Tensor | None, delay: bool = True) -> None:
        import torch.distributed as dist

        if self.delay is not None and delay:
            cpu = time.thread_time()
            self.delay_seconds += self.delay.before_send(message_bytes(head) + message_bytes(payload),
                                                         first=self._phase_open)
            self.delay_cpu_seconds += time.thread_time() - cpu
            self._phase_open = False
        for part in wire.frame(head, payload, one_message(self.device)):  # gloo: one message when it fits
            self._pending.append(dist.isend(part.to(self.device), dst, tag=REQUEST_TAG))

    def request(self, dst: int, head: torch.Tensor, payload: torch.Tensor | None) -> None:
        start = time.perf_counter()
        with self.lock:
            try:
                self._send(dst, head, payload)
            except RuntimeError as exc:
                raise self._failure(dst, exc) from exc
        self.exchange_seconds += time.perf_counter() - start

    def expect(self, src: int, nbytes: int) -> None:
        """Post the receive of `src`'s next reply (`nbytes`) now, before its request goes out: the server can
        send it the moment it is computed, whatever this rank does meanwhile (gloo sends into posted receives).
        NCCL: nothing (a receive posted before the request would hold up the request on the same stream)."""
        import torch.distributed as dist

        if not one_message(self.device):
            return
        if src in self._expected:
            raise MoecompressError(f"a reply from server {src} is expected already; take it (reply) first")
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        with self.lock:
            try:
                self._expected[src] = (dist.irecv(buf, src, tag=REPLY_TAG), buf)
            except RuntimeError as exc:
                raise self._failure(src, exc) from exc

    def reply(self, src: int, nbytes: int) -> torch.Tensor:
        import torch.distributed as dist

        start = time.perf_counter()
        work, buf = self._expected.pop(src, (None, None))
        if buf is not None and buf.numel() != nbytes:
            raise MoecompressError(f"server {src}: a reply of {nbytes} bytes was asked, {buf.numel()} expected")
        try:
            if work is not None:
                work.wait()  # outside the lock: pings go on meanwhile
            with self.lock:
                if work is None:
                    buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                    dist.recv(buf, src, tag=REPLY_TAG)
                self._phase_open = True
                for w in self._pending:
                    w.wait()
                self._pending.clear()
        except RuntimeError as exc:
            raise self._failure(src, exc) from exc
        self._last = time.monotonic()
        self.exchange_seconds += time.perf_counter() - start
        return buf.cpu()

    def control(self, op: int) -> None:
        with self.lock:
            for n in self.downstream:
                try:
                    self._send(n, wire.header(op), None, delay=False)  # control: not counted
                except RuntimeError as exc:
                    raise self._failure(n, exc) from exc
            self._last = time.monotonic()

    def gather_stats(self) -> dict[int, list[float]]:
        """[compute s, exchange s, peak bytes] of every other server (a stats request goes down every chain)."""
        import torch.distributed as dist

        out = {}
        with self.lock:
            n = self.home
            try:
                for n in self.downstream:
                    self._send(n, wire.header(wire.OP_STATS, rows=self.world_size), None, delay=False)
                for n in self.downstream:
                    buf = torch.empty(self.world_size * 3, dtype=torch.float64, device=self.device)
                    dist.recv(buf, src=self._last_of_chain(n), tag=REPLY_TAG)
                    rows = buf.cpu().reshape(self.world_size, 3)
                    for r in range(self.world_size):
                        if rows[r].abs().sum() > 0:
                            out[r] = rows[r].tolist()
                for work in self._pending:
                    work.wait()
                self._pending.clear()
            except RuntimeError as exc:
                raise self._failure(n, exc) from exc
        return out

    def _last_of_chain(self, first: int) -> int:
        return self.chain_end.get(first, first)

    def _failure(self, rank: int, exc: BaseException) -> MoecompressError:
        """Name the rank at fault: one that exited (any: a pipeline stage can fail mid-chain), else `rank`."""
        if self.watch:
            for other in [rank] + [n for n in range(self.world_size) if n not in (rank, self.home)]:
                why = self.watch(other)
                if why is not None:
                    return MoecompressError(f"server {other} {why}; stopping the deployment")
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return MoecompressError(f"server {rank} did not answer within {self.timeout:g} s or closed its connection "
                                f"({line}); stopping the deployment")

    def abandon(self) -> None:
        """After a failure: stop pinging; the servers stop on their own (lost home) or are killed by the launcher."""
        self._closed.set()
        self._pending.clear()
        self._expected.clear()

    def close(self) -> None:
        self._closed.set()
        self._pinger.join(timeout=5)
        try:
            self.control(wire.OP_STOP)
            with self.lock:
                for work in self._pending:
                    work.wait(timedelta(seconds=self.timeout))
                self._pending.clear()
        except (RuntimeError, MoecompressError):
            pass
