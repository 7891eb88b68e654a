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

The deployment's link is often not known when planning: with several link profiles (`moecompress shard` without
`--link`: LAN and WAN) each candidate is scored by its worst ratio, over the links, of its modeled time to the best
baseline's on that link. The walk above runs on that score, over the candidates within `tie` of the best baseline
on every link when there are any (never slower than a baseline, whichever link it meets), else over all of them
(minimax regret: the smallest worst-case slowdown; the report says so). With one link the score orders candidates
as their time does.
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
                     hidden_size: int, elem_bytes: int, profile: ComputeProfile, link,
                     replicate: bool = True, candidates=CANDIDATES, margin: float = MARGIN,
                     tie: float = TIE) -> tuple[Placement, dict]:
    """The candidate chosen by modeled decode time per step (see the module doc), and the report of all of them.

    `link`: one LinkProfile, or several (the deployment's link is not known: each candidate is scored by its worst
    ratio to the best baseline over them, see `pick`). One replay per candidate serves every link."""
    links = (link,) if isinstance(link, LinkProfile) else tuple(link)
    rows, placed, steps = time_candidates(stats, sizes, spec, experts, seq_len, hidden_size, elem_bytes, profile,
                                          links, replicate, candidates)
    report = decide(rows, links, margin, tie)
    report.update(batch=profile.batch, profile=profile.source, trace_steps=steps)
    return placed[report["chosen"]], report


def decide(rows: list[dict], links, margin: float = MARGIN, tie: float = TIE) -> dict:
    """The report of a choice among timed `rows` (time_candidates) for `links` (LinkProfiles): each row gets its
    ratios, score and by how much the chosen beats it on each link; "chosen" names the one `pick` keeps."""
    timed = [r for r in rows if "error" not in r]
    if not timed:
        raise MoecompressError("no placement fits these servers: " + "; ".join(f"{r['name']}: {r['error']}"
                                                                                 for r in rows))
    best_baseline = score(timed, [lk.name for lk in links])
    best = pick(timed, margin, tie)
    for r in timed:
        for lname, v in r["links"].items():
            mine = best["links"][lname]["ms_per_step"]
            v["chosen_faster_by"] = 1 - mine / v["ms_per_step"] if v["ms_per_step"] > 0 else 0.0
        if len(links) == 1:
            r["chosen_faster_by"] = r["links"][links[0].name]["chosen_faster_by"]
    fastest = min(timed, key=lambda r: r["score"])
    worst = max(best["ratios"], key=best["ratios"].get)
    return {"chosen": best["name"], "fastest": fastest["name"], "margin": margin, "tie": tie,
            "link": " + ".join(lk.describe() for lk in links), "links": [lk.name for lk in links],
            "best_baseline": best_baseline, "robust": best["score"] <= 1 + tie, "worst_ratio": best["score"],
            "worst_link": worst, "candidates": rows}


def time_candidates(stats: RoutingStats, sizes: LayerSizes, spec: ServerSpec, experts: np.ndarray, seq_len: int,
                    hidden_size: int, elem_bytes: int, profile: ComputeProfile, links, replicate: bool = True,
                    candidates=CANDIDATES) -> tuple[list[dict], dict[str, Placement], int]:
    """Every candidate placed and its decode steps replayed once; its modeled ms per step on each link
    (row["links"][name]); rows that do not fit carry "error". Returns (rows, {name: placement}, replayed steps)."""
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
        compute = profile_compute(p, c, profile) * c.calls
        per = 1e3 / c.calls
        by_link = {}
        for lk in links:
            t = modeled_time(c, lk, compute)
            by_link[lk.name] = {"ms_per_step": t.seconds * per, "compute_ms": t.compute * per,
                                "latency_ms": t.latency * per, "transfer_ms": t.transfer * per}
        rows.append({"name": name, "mode": mode, "method": p.method, **(by_link[links[0].name] if len(links) == 1
                                                                        else {}), "links": by_link,
                     "bytes_per_step": float(c.bytes.sum()) / c.calls, "round_trips_per_step": float(c.hops.sum())
                     / c.calls / 2, "baseline": method in BASELINES and not replicas})
        placed[name] = p
    return rows, placed, len(calls)


def for_link(rows: list[dict], link: str) -> list[dict]:
    """Copies of timed rows as if timed for `link` alone (its ms/step at the top level, no scores)."""
    return [{k: v for k, v in r.items() if k not in ("ratios", "score")} | r["links"][link]
            | {"links": {link: dict(r["links"][link])}} for r in rows if "error" not in r]


def score(timed: list[dict], links: list[str]) -> dict:
    """Set each row's `ratios` (its modeled time over the best baseline's, per link) and `score` (the worst of
    them); return the best baseline of each link {link: {name, ms_per_step}} (the fastest row if no baseline
    fits)."""
    best = {}
    for lname in links:
        pool = [r for r in timed if r.get("baseline")] or timed
        b = min(pool, key=lambda r: r["links"][lname]["ms_per_step"])
        best[lname] = {"name": b["name"], "ms_per_step": b["links"][lname]["ms_per_step"]}
    for r in timed:
        r["ratios"] = {lname: r["links"][lname]["ms_per_step"] / max(best[lname]["ms_per_step"], 1e-12)
                       for lname in links}
        r["score"] = max(r["ratios"].values())
    return best


def pick(timed: list[dict], margin: float = MARGIN, tie: float = TIE) -> dict:
    """Walk the candidates in preference order (baselines first, replicas last); a later one replaces the one kept
    when its score is lower by more than `tie` (a baseline) or `margin` (anything else).

    The score is a row's `score` (its worst ratio, over the links planned for, to the best baseline of each link:
    `score`) when set, else its `ms_per_step` (one link: the same order). With scores, only the rows within `tie`
    of the best baseline on every link are walked -- never slower than a baseline, whatever the link; when there
    is none (e.g. the expert model wins on a LAN, the pipeline on a WAN), all of them: minimax regret, the smallest
    worst-case slowdown against the best baseline of each link."""
    def rank(r):
        base = r["name"].removesuffix(" + replicas")
        return (r["name"] != base, PREFERENCE.index(base) if base in PREFERENCE else len(PREFERENCE), r["name"])

    def key(r):
        return r.get("score", r.get("ms_per_step"))

    pool = timed
    if all("score" in r for r in timed):
        pool = [r for r in timed if r["score"] <= 1 + tie] or timed
    order = sorted(pool, key=rank)
    kept = order[0]
    for r in order[1:]:
        need = tie if r.get("baseline") and kept.get("baseline") else margin
        if key(r) < key(kept) * (1 - need):
            kept = r
    return kept


def format_choice(report: dict) -> str:
    if len(report.get("links", ())) > 1:
        return format_robust_choice(report)
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


def format_robust_choice(report: dict) -> str:
    """The report of a choice over several links: per link each candidate's ms/step and its ratio to that link's
    best baseline, and the verdict."""
    links = report["links"]
    lines = [f"placement chosen for any of several links ({report['link']}; pass --link to plan for one); "
             f"{report['batch']} sequence(s); compute: {report['profile']}; {report['trace_steps']} replayed steps. "
             f"Score: the worst ratio of a candidate's modeled decode time to the best baseline's on each link:",
             f"  {'candidate':36s} " + " ".join(f"{n + ' ms/step':>14s} {'x best':>6s}" for n in links)
             + f" {'bytes/step':>11s} {'RTs/step':>8s} {'worst':>6s}"]
    for r in report["candidates"]:
        mark = "*" if r["name"] == report["chosen"] else " "
        if "error" in r:
            lines.append(f"{mark} {r['name']:36s} does not fit: {r['error']}")
            continue
        lines.append(f"{mark} {r['name']:36s} " + " ".join(f"{r['links'][n]['ms_per_step']:14.3f} "
                                                           f"{r['ratios'][n]:6.3f}" for n in links)
                     + f" {r['bytes_per_step']:11.0f} {r['round_trips_per_step']:8.2f} {r['score']:6.3f}")
    best = "; ".join(f"{n}: {b['name']} {b['ms_per_step']:.3f} ms" for n, b in report["best_baseline"].items())
    lines.append(f"  best baseline per link: {best}")
    if report["robust"]:
        lines.append(f"  chosen: {report['chosen']}, within {report['tie']:.1%} of the best baseline on every link "
                     f"(worst ratio {report['worst_ratio']:.3f}, on {report['worst_link']})")
    else:
        lines.append(f"  NO candidate is within {report['tie']:.1%} of the best baseline on every link: chosen by "
                     f"minimax regret, {report['chosen']}, at most {report['worst_ratio'] - 1:.1%} slower than the "
                     f"best baseline (on {report['worst_link']}); pass --link to plan for one link")
    return "\n".join(lines)
