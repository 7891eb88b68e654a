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
from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.runtime.edge.handlers import PlanServer, build_handler  # noqa: F401 -- PlanServer: serve.PlanServer
from moecompress.runtime.edge.serve_loop import serve


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
        from moecompress.runtime.edge.home_rank import run_home

        return run_home(info, rank, world_size, init_method, timeout, dtype, ready, front, expert_budget)
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
