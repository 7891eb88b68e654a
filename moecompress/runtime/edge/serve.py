"""A non-home rank: check and load its own bundle, join the process group, answer requests until told to stop.

Run by the local launcher (`python -m moecompress.runtime.edge.serve ...`) or by `moecompress run` under torchrun.
It receives a fixed-size header, then the payload the header announces, from its upstream rank (the home in the
expert model, the previous stage in the pipeline model), computes, and sends the result on (to the home, or to the
next stage). Pings keep it waiting; a stop message (forwarded down a pipeline) ends it. Exit codes: 2 refused
bundle or bad input (one `error:` line on stderr), 3 lost the home or a neighbour (timeout or closed connection).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.runtime.edge import wire
from moecompress.runtime.edge.handlers import PlanServer, build_handler  # noqa: F401 -- PlanServer: serve.PlanServer


def serve(handler, rank: int, upstream: int, downstream: int | None, home: int, world_size: int,
          device: torch.device, any_source: bool = False, admit=None) -> None:
    """any_source (several homes): take requests from every rank and answer each (a payload alone) to the rank that
    asked; `home` is the front (stop, stats). admit(request dict) -> result dict: this rank is a home too
    (OP_ADMIT, homes.run_admission)."""
    import torch.distributed as dist

    from moecompress.runtime.edge.transport import LinkDelay, message_bytes, recv_request, send_request

    delay = LinkDelay.from_env()  # emulated link (MOECOMPRESS_LINK_DELAY), counted as exchange time
    exchange = 0.0
    while True:
        src, h, payload = recv_request(None if any_source else upstream, device)  # idle wait: not exchange time
        src = upstream if src is None or src < 0 else int(src)
        op = h[0]
        start = time.perf_counter()
        if op in (wire.OP_STOP, wire.OP_PING, wire.OP_RESET):
            handler.control(op)
            if downstream is not None:
                send_request(downstream, torch.tensor(h, dtype=torch.int64), None, device)
            if op == wire.OP_STOP:
                return
            continue
        if op == wire.OP_STATS:
            stats = payload.view(torch.float64) if payload.numel() else torch.zeros(world_size * 3,
                                                                                    dtype=torch.float64)
            compute, own_exchange, peak = handler.stats()
            stats[rank * 3:rank * 3 + 3] = torch.tensor([compute, exchange + own_exchange, peak], dtype=torch.float64)
            if downstream is not None:
                send_request(downstream, wire.header(wire.OP_STATS, rows=world_size, a=1), wire.as_bytes(stats),
                             device)
            else:
                dist.send(stats.to(device), home)
            continue
        exchange += time.perf_counter() - start
        if op == wire.OP_ADMIT and admit is not None:
            outgoing = [(src, *wire.encode_object(wire.OP_RESULT, admit(wire.decode_object(payload))))]
        else:
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
                dist.send(out_payload.to(device), dst)
            exchange += time.perf_counter() - start


def neighbours(info) -> tuple[int, int | None]:
    """(upstream, downstream) of a non-home rank: the home in the expert model, the adjacent stages in the pipeline."""
    from moecompress.execution.routing import Mode

    if info.mode == Mode.EXPERT:
        return info.home, None
    stages = list(info.stages)
    if info.server not in stages:
        return info.home, None  # holds no layer: only control messages come
    i = stages.index(info.server)
    return stages[i - 1], (stages[i + 1] if i + 1 < len(stages) else None)


def run_rank(out: str, rank: int, world_size: int, init_method: str, timeout: float, dtype: torch.dtype,
             ready: str | None = None, homes: tuple[int, ...] = (), expert_budget: int | None = None) -> None:
    """Everything a non-home rank does; raises MoecompressError for refusals (before any exchange). homes (several
    homes, the first is the front): a home other than the front runs its home model beside the serve loop."""
    import torch.distributed as dist

    from moecompress.runtime.edge.bundle import read_bundle

    info = read_bundle(out, rank, world_size=world_size)
    several = len(homes) > 1
    front = homes[0] if several else info.home
    if rank == front:
        raise MoecompressError(f"rank {rank} is the home server; it runs the model (deploy / moecompress generate)")
    if several and rank in homes:
        return _run_home(info, rank, world_size, init_method, timeout, dtype, ready, front, expert_budget)
    handler = build_handler(info, dtype, expert_budget)
    upstream, downstream = neighbours(info)
    if ready:
        Path(ready).write_text("ready")
    from moecompress.runtime.edge.transport import init_group

    device = init_group(init_method, rank, world_size, timeout)  # gloo on CPU, NCCL on CUDA (transport.py)
    try:
        serve(handler, rank, front if several else upstream, downstream, front, world_size, device,
              any_source=several)
    finally:
        dist.destroy_process_group()


def _run_home(info, rank: int, world_size: int, init_method: str, timeout: float, dtype: torch.dtype,
              ready: str | None, front: int, expert_budget: int | None = None) -> None:
    """A home besides the front: its home model (requests the front admits here) and its experts for the others
    (under a store of `expert_budget` bytes when given)."""
    import torch.distributed as dist

    from moecompress.execution.counters import Counters
    from moecompress.runtime.edge.running import Deployment, home_model
    from moecompress.runtime.edge.homes import home_server, run_admission
    from moecompress.runtime.edge.transport import TorchDistributed, init_group

    from moecompress.runtime.edge.dispatcher import DispatchedExperts

    from dataclasses import replace

    info = replace(info, home=rank)  # this rank's sequences are routed from here
    counters = Counters(world_size, len(info.experts_paths))
    model, _ = home_model(info, dtype, None, counters, None, None, expert_budget)  # loaded before joining
    num_experts = len(info.assignment[0]) if info.assignment else 0
    if ready:
        Path(ready).write_text("ready")
    device = init_group(init_method, rank, world_size, timeout)
    transport = TorchDistributed(rank, world_size, timeout, device, downstream=[])  # no pings, no stop: the front's
    for module in model.modules():
        if isinstance(module, DispatchedExperts):
            module.transport = transport
    try:
        deployment = Deployment(model, info, transport, counters)
        deployment._abort = lambda: None  # a failed admission is reported to the front, which stops everyone
        serve(home_server(rank, model, num_experts), rank, front, None, front, world_size, device, any_source=True,
              admit=lambda request: run_admission(deployment, request))
    finally:
        transport.abandon()
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundles", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--init-method", required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ready")
    p.add_argument("--homes", default="", help="several homes: comma-separated servers, the first is the front")
    p.add_argument("--expert-budget", type=int, help="bytes of this server's experts kept in memory (runtime/store/)")
    a = p.parse_args(argv)
    homes = tuple(int(h) for h in a.homes.split(",") if h.strip())
    try:
        run_rank(a.bundles, a.rank, a.world_size, a.init_method, a.timeout, getattr(torch, a.dtype), a.ready, homes,
                 a.expert_budget)
    except MoecompressError as exc:
        print(f"error: server {a.rank}: {exc}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as exc:  # gloo timeout or closed connection: the home or a neighbour is gone
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: server {a.rank}: lost contact with another server within {a.timeout:g} s ({line})",
              file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
