"""`--mode auto`: place with every method of both execution models and keep the fastest by the time model, unless
it wins by less than the time model can tell apart.

Each candidate (expert model: contiguous, round_robin, greedy_balanced, affinity, each without and, when replicas
are asked for and fit, with hot-expert replicas; pipeline: all_servers, fewest_servers) is placed, its decode steps
of `batch` sequences are replayed on a routing trace (execution/replay.py: the runtime's own counters), and its
modeled decode time per step is compute on the critical path (from a measured ComputeProfile, the expert model's
dispatch included) + one-way hops x latency + bytes / rate (execution/timing.py) for the given link profile.

The choice is robust to the trace: the routing of the text a deployment will serve differs from the calibration
trace, so the expert model's times move by about a percent between traces (placements that balance the same
routing by different rules swap places). Candidates are walked in `PREFERENCE` order -- the baselines first, the
one whose time depends least on routing first (pipeline, then greedy_balanced, round_robin, contiguous), then ours
(fewest_servers, affinity), replicas last -- and a later candidate replaces the one kept only when it is faster by
more than `margin` (2 %: ours, or anything with replicas) or `tie` (1 %: another baseline). So the default is a
baseline unless ours wins clearly. The report says by how much the chosen beats every other candidate (negative: it was kept although
slower by less than the margin). Candidates that do not fit in memory are listed with the reason.
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

CANDIDATES = (("pipeline", "all_servers"), ("expert", "greedy_balanced"), ("expert", "round_robin"),
              ("expert", "contiguous"), ("pipeline", "fewest_servers"), ("expert", "affinity"))
PREFERENCE = tuple(f"{m}: {n}" for m, n in CANDIDATES)  # without replicas; with replicas follow, same order
MARGIN = 0.02  # ours (or replicas) must beat the candidate kept by more than this share of its modeled time
TIE = 0.01  # another baseline: by more than this (balanced expert placements swap places by ~1 % between traces)
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
                     replicate: bool = True, candidates=CANDIDATES, margin: float = MARGIN,
                     tie: float = TIE) -> tuple[Placement, dict]:
    """The candidate chosen by modeled decode time per step (see the module doc), and the report of all of them."""
    from moecompress.shard.compare import BASELINES

    trace, calls = decode_replay(np.asarray(experts), profile.batch, seq_len)
    rows, placed = [], {}
    variants = [(m, n, False) for m, n in candidates]
    if replicate:
        variants += [(m, n, True) for m, n in candidates if m == "expert"]
    for mode, method, replicas in variants:
        name = f"{mode}: {method}" + (" + replicas" if replicas else "")
        try:
            p = place(stats, sizes, ServerSpec(**{**spec.__dict__, "mode": mode}), method, replicas)
        except MoecompressError as exc:
            rows.append({"name": name, "mode": mode, "method": method, "error": str(exc)})
            continue
        plain = placed.get(f"{mode}: {method}")
        if replicas and plain is not None and p.assignment == plain.assignment:
            continue  # no replica fits: the same placement as without
        c = replay(p, trace, calls, hidden_size, elem_bytes, sizes.moe_decoder_layers)
        t = modeled_time(c, link, profile_compute(p, c, profile) * c.calls)
        per = 1e3 / c.calls
        rows.append({"name": name, "mode": mode, "method": p.method, "ms_per_step": t.seconds * per,
                     "compute_ms": t.compute * per, "latency_ms": t.latency * per, "transfer_ms": t.transfer * per,
                     "bytes_per_step": float(c.bytes.sum()) / c.calls, "round_trips_per_step": float(c.hops.sum())
                     / c.calls / 2, "baseline": method in BASELINES and not replicas})
        placed[name] = p
    timed = [r for r in rows if "error" not in r]
    if not timed:
        raise MoecompressError("no placement fits these servers: " + "; ".join(f"{r['name']}: {r['error']}"
                                                                                 for r in rows))
    best = pick(timed, margin, tie)
    for r in timed:
        r["chosen_faster_by"] = 1 - best["ms_per_step"] / r["ms_per_step"] if r["ms_per_step"] > 0 else 0.0
    fastest = min(timed, key=lambda r: r["ms_per_step"])
    report = {"chosen": best["name"], "fastest": fastest["name"], "margin": margin, "tie": tie,
              "link": link.describe(), "batch": profile.batch, "profile": profile.source, "trace_steps": len(calls),
              "candidates": rows}
    return placed[best["name"]], report


def pick(timed: list[dict], margin: float = MARGIN, tie: float = TIE) -> dict:
    """Walk the candidates in preference order (baselines first, replicas last); a later one replaces the one kept
    when faster by more than `tie` (a baseline) or `margin` (anything else)."""
    def rank(r):
        base = r["name"].removesuffix(" + replicas")
        return (r["name"] != base, PREFERENCE.index(base) if base in PREFERENCE else len(PREFERENCE), r["name"])

    order = sorted(timed, key=rank)
    kept = order[0]
    for r in order[1:]:
        need = tie if r.get("baseline") and kept.get("baseline") else margin
        if r["ms_per_step"] < kept["ms_per_step"] * (1 - need):
            kept = r
    return kept


def format_choice(report: dict) -> str:
    lines = [f"placement chosen by modeled decode time per step ({report['link']}; {report['batch']} sequence(s); "
             f"compute: {report['profile']}; {report['trace_steps']} replayed steps; a baseline is kept unless "
             f"another candidate is faster by more than {report.get('margin', MARGIN):.1%}):",
             f"  {'candidate':36s} {'ms/step':>9s} {'compute':>9s} {'latency':>9s} {'transfer':>9s} "
             f"{'bytes/step':>11s} {'RTs/step':>8s}  chosen is faster by"]
    for r in report["candidates"]:
        mark = "*" if r["name"] == report["chosen"] else " "
        if "error" in r:
            lines.append(f"{mark} {r['name']:36s} does not fit: {r['error']}")
            continue
        lines.append(f"{mark} {r['name']:36s} {r['ms_per_step']:9.3f} {r['compute_ms']:9.3f} {r['latency_ms']:9.3f} "
                     f"{r['transfer_ms']:9.3f} {r['bytes_per_step']:11.0f} {r['round_trips_per_step']:8.2f}  "
                     + ("(chosen)" if mark == "*" else f"{r['chosen_faster_by']:+.1%}"))
    return "\n".join(lines)
