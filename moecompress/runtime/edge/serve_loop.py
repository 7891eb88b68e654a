"""The loop every serving rank runs: take a request, answer it (`serve`); see serve.py for the ranks that run it.

A pure expert server or pipeline stage runs it in its main thread; with several homes a home besides the front
runs it too (beside its admission thread, home_rank.py), and the front runs it in a thread of its own (its experts
for the other homes).
"""
from __future__ import annotations

import time

import torch

from moecompress.runtime.edge import wire


def serve(handler, rank: int, upstream: int, downstream: int | None, home: int, world_size: int,
          device: torch.device, any_source: bool = False, admit=None, stops: int = 1, wait=None,
          stop_to: int | None = None) -> None:
    """any_source (several homes): take requests from every rank and answer each (a payload alone) to the rank that
    asked; `home` is the front (stop, stats). admit(request dict): this rank is a home too and runs the request
    the front admitted here in another thread (homes.Admissions). stops: stop messages that end the loop (the
    front's expert service: one from each other home). wait: how long a request may be waited for (None: the
    group's timeout; pings keep it short). stop_to: a rank told on stop (a home besides the front tells the front's
    expert service)."""
    import torch.distributed as dist

    from moecompress.runtime.edge.transport import (
        LinkDelay, message_bytes, one_message, recv_request, send_reply, send_request,
    )

    delay = LinkDelay.from_env()  # emulated link (MOECOMPRESS_LINK_DELAY), counted as exchange time
    buffer = wire.first_buffer(one_message(device), device)  # reused: one receive buffer per loop
    exchange = 0.0
    while True:
        src, h, payload = recv_request(None if any_source else upstream, device, buffer, wait=wait)  # idle wait
        src = upstream if src is None or src < 0 else int(src)
        op = h[0]
        start = time.perf_counter()
        if op in (wire.OP_STOP, wire.OP_PING, wire.OP_RESET):
            handler.control(op)
            if downstream is not None:
                send_request(downstream, torch.tensor(h, dtype=torch.int64), None, device)
            if op == wire.OP_STOP:
                stops -= 1
                if stops <= 0:
                    if stop_to is not None:
                        send_request(stop_to, wire.header(wire.OP_STOP), None, device)
                    return
            continue
        if op == wire.OP_STATS:
            stats = payload.view(torch.float64).clone() if payload.numel() else \
                torch.zeros(world_size * 3, dtype=torch.float64)
            compute, own_exchange, peak = handler.stats()
            stats[rank * 3:rank * 3 + 3] = torch.tensor([compute, exchange + own_exchange, peak], dtype=torch.float64)
            if downstream is not None:
                send_request(downstream, wire.header(wire.OP_STATS, rows=world_size, a=1), wire.as_bytes(stats),
                             device)
            else:
                send_reply(home, stats, device)
            continue
        exchange += time.perf_counter() - start
        if op == wire.OP_ADMIT and admit is not None:
            admit(wire.decode_object(payload))
            continue
        outgoing = handler.handle(h, payload)
        for dst, out_head, out_payload in outgoing:
            if any_source and out_head is None:
                dst = src  # a reply answers the home that asked
            start = time.perf_counter()
            if delay is not None:
                delay.before_send(message_bytes(out_head) + message_bytes(out_payload), first=True)
            if out_head is not None:
                send_request(dst, out_head, out_payload, device)
            else:
                send_reply(dst, out_payload, device)
            exchange += time.perf_counter() - start
