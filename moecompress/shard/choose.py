"""`--mode auto`: place with every method of both execution models and keep the fastest by the time model.

Each candidate (expert model: contiguous, round_robin, greedy_balanced, affinity; pipeline: all_servers,
fewest_servers) is placed, its decode steps of `batch` sequences are replayed on a routing trace
(execution/replay.py: the runtime's own counters), and its modeled decode time per step is
compute on the critical path (from a measured ComputeProfile) + one-way hops x latency + bytes / rate
(execution/timing.py) for the given link profile. The fastest wins; the report says by how much it beats each other
candidate. Candidates that do not fit in memory are listed with the reason.
"""
from __future__ import annotations

import numpy as np

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.execution.replay import Call, replay
from moecompress.execution.timing import ComputeProfile, LinkProfile, modeled_time, profile_compute
from moecompress.shard.compare import place
from moecompress.shard.layers import LayerSizes
from moecompress.shard.routing import RoutingStats
from moecompress.shard.spec import ServerSpec

CANDIDATES = (("expert", "contiguous"), ("expert", "round_robin"), ("expert", "greedy_balanced"),
              ("expert", "affinity"), ("pipeline", "all_servers"), ("pipeline", "fewest_servers"))
MAX_TRACE_TOKENS = 8192


def decode_replay(experts: np.ndarray, batch: int, seq_len: int) -> tuple[np.ndarray, list[Call]]:
    """A trace [T, L, k] as decode steps of `batch` sequences (step j of a sequence attends to j + 1 keys)."""
    steps = min(len(experts), MAX_TRACE_TOKENS) // batch
    if steps < 1:
        raise MoecompressError(f"the routing trace has {len(experts)} tokens, fewer than the batch ({batch})")
    calls = [Call(batch, 1, j % max(seq_len, 1) + 1) for j in range(steps)]
    return experts[:steps * batch], calls


def synthetic_trace(stats: RoutingStats, tokens: int = 2048, seed: int = 0) -> np.ndarray:
    """[tokens, L, k] experts drawn per layer from the calibration counts (independent layers): only when no
    recorded trace exists (calibrate --trace records one)."""
    rng = np.random.default_rng(seed)
    freq = stats.tokens.astype(np.float64) + 1e-9  # [L, E]
    out = np.zeros((tokens, freq.shape[0], stats.top_k), dtype=np.int64)
    for layer, f in enumerate(freq):
        for t in range(tokens):
            out[t, layer] = rng.choice(len(f), size=stats.top_k, replace=False, p=f / f.sum())
    return out


def choose_placement(stats: RoutingStats, sizes: LayerSizes, spec: ServerSpec, experts: np.ndarray, seq_len: int,
                     hidden_size: int, elem_bytes: int, profile: ComputeProfile, link: LinkProfile,
                     replicate: bool = True, candidates=CANDIDATES) -> tuple[Placement, dict]:
    """The candidate with the least modeled decode time per step, and the report of all of them."""
    trace, calls = decode_replay(np.asarray(experts), profile.batch, seq_len)
    rows, placed = [], {}
    for mode, method in candidates:
        name = f"{mode}: {method}"
        try:
            p = place(stats, sizes, ServerSpec(**{**spec.__dict__, "mode": mode}), method, replicate)
        except MoecompressError as exc:
            rows.append({"name": name, "mode": mode, "method": method, "error": str(exc)})
            continue
        c = replay(p, trace, calls, hidden_size, elem_bytes, sizes.moe_decoder_layers)
        t = modeled_time(c, link, profile_compute(p, c, profile) * c.calls)
        per = 1e3 / c.calls
        rows.append({"name": name, "mode": mode, "method": p.method, "ms_per_step": t.seconds * per,
                     "compute_ms": t.compute * per, "latency_ms": t.latency * per, "transfer_ms": t.transfer * per,
                     "bytes_per_step": float(c.bytes.sum()) / c.calls, "round_trips_per_step": float(c.hops.sum())
                     / c.calls / 2})
        placed[name] = p
    timed = [r for r in rows if "error" not in r]
    if not timed:
        raise MoecompressError("no placement fits these servers: " + "; ".join(f"{r['name']}: {r['error']}"
                                                                                 for r in rows))
    best = min(timed, key=lambda r: r["ms_per_step"])
    for r in timed:
        r["chosen_faster_by"] = 1 - best["ms_per_step"] / r["ms_per_step"] if r["ms_per_step"] > 0 else 0.0
    report = {"chosen": best["name"], "link": link.describe(), "batch": profile.batch,
              "profile": profile.source, "trace_steps": len(calls), "candidates": rows}
    return placed[best["name"]], report


def format_choice(report: dict) -> str:
    lines = [f"placement chosen by modeled decode time per step ({report['link']}; {report['batch']} sequence(s); "
             f"compute: {report['profile']}; {report['trace_steps']} replayed steps):",
             f"  {'candidate':28s} {'ms/step':>9s} {'compute':>9s} {'latency':>9s} {'transfer':>9s} "
             f"{'bytes/step':>11s} {'RTs/step':>8s}  chosen is faster by"]
    for r in report["candidates"]:
        mark = "*" if r["name"] == report["chosen"] else " "
        if "error" in r:
            lines.append(f"{mark} {r['name']:28s} does not fit: {r['error']}")
            continue
        lines.append(f"{mark} {r['name']:28s} {r['ms_per_step']:9.3f} {r['compute_ms']:9.3f} {r['latency_ms']:9.3f} "
                     f"{r['transfer_ms']:9.3f} {r['bytes_per_step']:11.0f} {r['round_trips_per_step']:8.2f}  "
                     + ("(chosen)" if mark == "*" else f"{r['chosen_faster_by']:+.1%}"))
    return "\n".join(lines)
