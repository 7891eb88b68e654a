"""`moecompress run` and `moecompress generate`: what a user does with a deployment (the CLI parses, these run).

One machine: `moecompress generate --bundles OUT --prompt TEXT ...` starts the other servers as local processes
(or runs them in this process with --simulate). Several machines: every machine holds OUT/placement.json and the
bundle of the server it runs, and starts one process with torchrun; the process's RANK is its server id. The static
rendezvous makes RANK the node rank:
    torchrun --nnodes N --nproc-per-node 1 --node-rank K --master-addr HOST --master-port PORT \
        -m moecompress.cli run --bundles OUT --prompt "..." --max-new-tokens 32
The c10d rendezvous (`--rdzv-backend c10d --rdzv-endpoint HOST:PORT`) hands out ranks in join order, so with it
give every machine every server-K/ (each rank loads only the one of the rank it got; a missing one is refused
before any exchange). The home rank generates; the other ranks serve until the home stops them. Several homes: the
same `--homes 0,1` on every rank; the first home generates and hands each other home its share of the prompts,
which that home computes at the same time (gloo only).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.runtime.edge.deployment import deploy


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_generate(bundles: str, prompts: list[str], max_new_tokens: int = 32, sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, simulate: bool = False,
                 servers: int | None = None, timeout: float = 60.0, counters_out: str | None = None,
                 dtype: str = "float32", tokenizer: str | None = None, tokens=None,
                 similarity=None, expert_budget: int | None = None, homes=None) -> list[str]:
    """Generate continuations of `prompts` (one left-padded batch); prints them and the counters table. homes:
    several servers admitting the prompts round robin (deploy(..., homes=...))."""
    if max_new_tokens < 1:
        raise MoecompressError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not 0 < top_p <= 1 or temperature <= 0:
        raise MoecompressError("--top-p must be in (0, 1] and --temperature positive")
    with deploy(bundles, simulate=simulate, servers=servers, timeout=timeout, dtype=getattr(torch, dtype),
                tokens=tokens, similarity=similarity, expert_budget=expert_budget, homes=homes) as d:
        if tokenizer:
            from transformers import AutoTokenizer

            d.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        texts = d.generate_text(prompts, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature,
                                top_p=top_p, seed=seed)
        for prompt, text in zip(prompts, texts):
            print(json.dumps({"prompt": prompt, "continuation": text}, ensure_ascii=False))
        report_counters(d.counters, counters_out)
    return texts


def report_counters(counters, counters_out: str | None) -> None:
    print(counters.table(), file=sys.stderr)
    if counters_out:
        counters.save(counters_out)
        print(f"wrote {counters_out}", file=sys.stderr)


def run_command(bundles: str, prompts: list[str], servers: int | None = None, timeout: float = 60.0,
                dtype: str = "float32", **generate) -> None:
    """One rank of a deployment: under torchrun, the home generates and the other ranks serve; otherwise the same as
    `generate` (this process is the home and starts the others)."""
    if not _under_torchrun():
        run_generate(bundles, prompts or _stdin_prompts(), servers=servers, timeout=timeout, dtype=dtype, **generate)
        return
    from moecompress.runtime.edge.bundle import placement_doc
    from moecompress.runtime.edge.serve import run_rank

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    homes = tuple(generate.get("homes") or ())
    if len(homes) > 1:  # several homes: the first (the front) generates, the others compute its share of the rows
        home = homes[0]
    else:
        doc, _ = placement_doc(bundles)
        home = doc.get("home")
        home = int(home if home is not None else (doc.get("layer_servers") or doc["dense_servers"])[0])
    if rank != home:
        run_rank(bundles, rank, world, "env://", timeout, getattr(torch, dtype), homes=homes if len(homes) > 1 else (),
                 expert_budget=generate.get("expert_budget"))
        return
    run_generate(bundles, prompts or _stdin_prompts(), servers=servers, timeout=timeout, dtype=dtype, **generate)


def _stdin_prompts() -> list[str]:
    prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise MoecompressError("no prompt: pass --prompt TEXT (repeatable) or give one prompt per line on stdin")
    return prompts


def counters_path_ok(path: str | None) -> None:
    if path and not Path(path).parent.exists():
        raise MoecompressError(f"--counters-out {path}: directory {Path(path).parent} does not exist")
