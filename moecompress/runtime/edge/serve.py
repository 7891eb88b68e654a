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


def serve(handler, rank: int, upstream: int, downstream: int | None, home: int, world_size: int,
          device: torch.device, any_source: bool = False, admit=None) -> None:
    """any_source (several homes): take requests from every rank and answer each (a payload alone) to the rank that
    asked; `home` is the front (stop, stats). admit(request dict) -> result dict: this rank is a home too
    (OP_ADMIT, homes.run_admission)."""
    import torch.distributed as dist

    from moecompress.runtime.edge.transport import LinkDelay, message_bytes

    delay = LinkDelay.from_env()  # emulated link (MOECOMPRESS_LINK_DELAY), counted as exchange time
    exchange = 0.0
    while True:
        head = wire.empty_header().to(device)
        src = dist.recv(head, None if any_source else upstream)  # idle wait: not exchange time
        src = upstream if src is None or src < 0 else int(src)
        h = head.cpu().tolist()
        op = h[0]
        start = time.perf_counter()
        if op in (wire.OP_STOP, wire.OP_PING, wire.OP_RESET):
            handler.control(op)
            if downstream is not None:
                dist.send(head, downstream)
            if op == wire.OP_STOP:
                return
            continue
        payload = torch.empty(wire.payload_bytes(h), dtype=torch.uint8, device=device)
        if payload.numel():
            dist.recv(payload, src)
        if op == wire.OP_STATS:
            stats = payload.cpu().view(torch.float64) if payload.numel() else torch.zeros(world_size * 3,
                                                                                          dtype=torch.float64)
            compute, own_exchange, peak = handler.stats()
            stats[rank * 3:rank * 3 + 3] = torch.tensor([compute, exchange + own_exchange, peak], dtype=torch.float64)
            if downstream is not None:
                dist.send(wire.header(wire.OP_STATS, rows=world_size, a=1).to(device), downstream)
                dist.send(wire.as_bytes(stats).to(device), downstream)
            else:
                dist.send(stats.to(device), home)
            continue
        exchange += time.perf_counter() - start
        if op == wire.OP_ADMIT and admit is not None:
            outgoing = [(src, *wire.encode_object(wire.OP_RESULT, admit(wire.decode_object(payload.cpu()))))]
        else:
            outgoing = handler.handle(h, payload.cpu())
        for dst, out_head, out_payload in outgoing:
            if any_source and out_head is None:
                dst = src  # a reply answers the home that asked
            start = time.perf_counter()
            if delay is not None:
                delay.before_send(message_bytes(out_head) + message_bytes(out_payload), first=True)
            if out_head is not None:
                dist.send(out_head.to(device), dst)
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


class PlanServer:
    """An expert server that also answers token-policy requests (OP_PLAN: rows at a payload precision, fused rows
    with their multiplicities; execution/tokens/exchange.py); everything else goes to the wrapped ExpertServer."""

    def __init__(self, inner, num_experts: int):
        self.inner, self.num_experts = inner, num_experts

    def handle(self, head: list[int], payload: torch.Tensor):
        if head[0] != wire.OP_PLAN:
            return self.inner.handle(head, payload)
        from moecompress.execution.tokens.exchange import reply_layout

        layer, dtype = head[1], wire.dtype_of(head[4])
        rows, sizes, ids, weights, ret = wire.decode_plan_request(payload, head)
        member_rows = torch.repeat_interleave(torch.arange(len(sizes)), sizes)  # [M] row of each member
        layout = reply_layout(member_rows, sizes, ids, self.num_experts)
        k = ids.shape[1]
        one_hot_ids = torch.full((len(layout.expert_ids), k), self.num_experts, dtype=torch.long)
        one_hot_ids[:, 0] = layout.expert_ids
        one_hot_w = torch.zeros(len(layout.expert_ids), k, dtype=weights.dtype)
        one_hot_w[:, 0] = 1.0
        x = torch.cat([rows[member_rows[layout.per_member]], rows[layout.expert_rows]])
        out = self.inner.compute(layer, x, torch.cat([ids[layout.per_member], one_hot_ids]),
                                 torch.cat([weights[layout.per_member], one_hot_w]))
        return [(self.inner.home, None, wire.encode_values(out.to(dtype), ret))]

    def control(self, op: int) -> None:
        self.inner.control(op)

    def stats(self) -> list[float]:
        return self.inner.stats()


def build_handler(info, dtype: torch.dtype, expert_budget: int | None = None):
    from moecompress.execution.routing import Mode
    from moecompress.runtime.edge.rank_model import ExpertServer, load_experts

    if info.mode == Mode.EXPERT:
        num_experts = len(info.assignment[0]) if info.assignment else 0
        experts = load_experts(info, dtype)
        if expert_budget is not None:  # at most that many bytes of experts resident (runtime/store/)
            from moecompress.runtime.store.rank import attach_server_store

            attach_server_store(info.directory, experts, info.experts_paths, expert_budget)
        return PlanServer(ExpertServer(info.server, info.home, experts), num_experts)
    from moecompress.runtime.edge.pipeline import IdleServer, StageServer

    return StageServer.load(info, dtype) if info.server in info.stages else IdleServer()


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
    from moecompress.runtime.edge.deployment import Deployment, _home_model
    from moecompress.runtime.edge.homes import home_server, run_admission
    from moecompress.runtime.edge.transport import TorchDistributed, init_group

    from moecompress.runtime.edge.dispatcher import DispatchedExperts

    from dataclasses import replace

    info = replace(info, home=rank)  # this rank's sequences are routed from here
    counters = Counters(world_size, len(info.experts_paths))
    model, _ = _home_model(info, dtype, None, counters, None, None, expert_budget)  # loaded before joining
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
