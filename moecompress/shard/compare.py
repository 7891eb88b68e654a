"""Placement methods by execution model, and all of them side by side on one replayed trace.

Expert model (`--mode expert`): contiguous, round_robin, greedy_balanced (baselines), affinity (ours), ilp (exact,
small instances); each optionally with hot-expert replicas. Pipeline model (`--mode pipeline`): all_servers (the
classic layout, a baseline) and fewest_servers. Every figure comes from execution/replay.py: the counters the
runtime produces on the same text.
"""
from __future__ import annotations

import time

import numpy as np

from moecompress.artifacts.placement import MODES, Placement
from moecompress.errors import MoecompressError
from moecompress.execution.counters import Counters
from moecompress.execution.replay import Call, replay
from moecompress.shard.affinity import place_affinity
from moecompress.shard.baselines import place_contiguous, place_greedy_balanced, place_round_robin
from moecompress.shard.ilp import place_ilp
from moecompress.shard.layers import LayerSizes, place_all_servers, place_fewest_servers
from moecompress.shard.replicate import replicate_hot
from moecompress.shard.routing import RoutingStats
from moecompress.shard.spec import ServerSpec

EXPERT_METHODS = {
    "contiguous": place_contiguous,
    "round_robin": place_round_robin,
    "greedy_balanced": place_greedy_balanced,
    "affinity": place_affinity,
    "ilp": place_ilp,
}
PIPELINE_METHODS = {"all_servers": place_all_servers, "fewest_servers": place_fewest_servers}
METHODS = {"expert": EXPERT_METHODS, "pipeline": PIPELINE_METHODS}
BASELINES = ("contiguous", "round_robin", "greedy_balanced", "all_servers")  # what ours is compared against
DEFAULT_METHOD = {"expert": "affinity", "pipeline": "fewest_servers"}
DEFAULT_MODE = "pipeline"  # the mode of `place(...)` without one; `moecompress shard` defaults to AUTO
AUTO = "auto"  # choose the execution model and method by the time model (shard/choose.py)


def mode_of(method: str) -> str:
    """The execution model a placement method belongs to; MoecompressError naming every method otherwise."""
    for mode, methods in METHODS.items():
        if method in methods:
            return mode
    raise MoecompressError(f"placement method {method!r} does not exist; allowed: "
                           f"{', '.join(m for ms in METHODS.values() for m in ms)}")


def place(stats: RoutingStats, sizes: LayerSizes, spec: ServerSpec, method: str | None = None,
          replicate: bool = True) -> Placement:
    """The placement of `method` (default: the mode's own) for spec.mode; replicas only in the expert model."""
    method = check_method(spec.mode, method)
    allowed = METHODS[spec.mode]
    if spec.mode == "pipeline":
        return allowed[method](sizes, spec)
    placement = allowed[method](stats, sizes.expert_bytes, sizes.dense_bytes, spec)
    return replicate_hot(placement, stats, spec) if replicate else placement


def check_method(mode: str, method: str | None) -> str:
    """The method to run (the mode's default when None); MoecompressError naming the allowed ones otherwise."""
    if mode not in MODES:
        raise MoecompressError(f"mode {mode!r}; allowed: {', '.join(MODES)}")
    method = method or DEFAULT_METHOD[mode]
    if method not in METHODS[mode]:
        raise MoecompressError(f"placement method {method!r} does not exist for mode {mode}; allowed: "
                               f"{', '.join(METHODS[mode])}")
    return method


def traffic_row(placement: Placement, counters: Counters, moe_decoder_layers=None) -> dict:
    """What the report prints for one placement: bytes and hops next to load balance, from replayed counters."""
    pairs = counters.pairs  # [layers, N]
    if placement.mode == "pipeline":
        rows = list(moe_decoder_layers) if moe_decoder_layers is not None else list(range(placement.num_layers))
        pairs = pairs[rows]
    tokens, calls = max(counters.tokens, 1), max(counters.calls, 1)
    return {
        "method": placement.method,
        "mode": placement.mode,
        "bytes_per_token": float(counters.bytes.sum()) / tokens,
        "messages_per_token": float(counters.messages.sum()) / tokens,
        "hops_per_call": float(counters.hops.sum()) / calls,
        "balance": max_over_mean(pairs.sum(0)),
        "layer_balance": max((max_over_mean(row) for row in pairs), default=1.0),
        "copies": sum(len(s) for layer in placement.assignment for s in layer),
        "max_server_bytes": max(placement.server_bytes),
        "stages": len(placement.stages) if placement.mode == "pipeline" else None,
    }


def compare_placements(stats: RoutingStats, sizes: LayerSizes, spec: ServerSpec, experts, calls: list[Call],
                       hidden_size: int, elem_bytes: int = 2,
                       methods: tuple[str, ...] = ("contiguous", "round_robin", "greedy_balanced", "affinity",
                                                   "all_servers", "fewest_servers"),
                       replicate: bool = False) -> tuple[list[dict], dict[str, Placement]]:
    """One row per method (placed from `stats`, measured by replaying `experts` [T, L, k] grouped in `calls`; take
    them from other text). `replicate` adds "<method>+replicas" for the expert methods. `reduction`: share of bytes
    saved against the best baseline row (negative: more bytes)."""
    rows, placed = [], {}
    for name in methods:
        mode = "pipeline" if name in PIPELINE_METHODS else "expert"
        mspec = ServerSpec(**{**spec.__dict__, "mode": mode})
        start = time.perf_counter()
        variants = [place(stats, sizes, mspec, name, replicate=False)]
        seconds = time.perf_counter() - start
        if replicate and mode == "expert":
            variants.append(replicate_hot(variants[0], stats, mspec))
        for p in variants:
            counters = replay(p, experts, calls, hidden_size, elem_bytes, sizes.moe_decoder_layers)
            rows.append({**traffic_row(p, counters, sizes.moe_decoder_layers), "place_seconds": seconds})
            placed[p.method] = p
    best = min((r["bytes_per_token"] for r in rows if r["method"] in BASELINES), default=None)
    for r in rows:
        r["reduction"] = 1 - r["bytes_per_token"] / best if best else None
    return rows, placed


def max_over_mean(load) -> float:
    load = np.asarray(load, dtype=np.float64)
    mean = float(load.mean()) if load.size else 0.0
    return float(load.max()) / mean if mean > 0 else 1.0
