"""Home replicas: a copy of each MoE layer's hottest experts on the home server, inside the same memory.

In the expert model every MoE layer that needs a remote expert costs a token one round trip, and a token policy
can only make a layer local (execution/tokens `localize`, `prune_layer`) if the home holds experts of that layer
worth routing to. `place_home_replicas` reserves, on the home, the bytes of each layer's `count` most used experts
(calibration routing mass, `RoutingStats.tokens`), places the primaries in the memory left (the placement
method's own objective and balance), then adds a home copy of every reserved expert the home does not hold yet.
The servers' memory is the one given: the reserve comes out of the home's own memory, so the result is at equal
memory with placements without home replicas (unused reserve is free for `replicate_hot`). The runtime computes
a pair on its home whenever the home holds a copy (execution/routing.route_pairs), so these copies are used first.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from moecompress.artifacts.bit_plan import BitPlan, check_bits
from moecompress.artifacts.placement import Placement, as_grid
from moecompress.errors import MoecompressError
from moecompress.shard.routing import RoutingStats
from moecompress.shard.spec import ServerSpec


def hottest_experts(stats: RoutingStats, count: int) -> list[list[int]]:
    """[L][count] each MoE layer's `count` most used experts (calibration tokens routed), hottest first."""
    if not isinstance(count, int) or count < 0:
        raise MoecompressError(f"home replicas must be a whole number of experts per layer >= 0, got {count!r}")
    if count > stats.num_experts:
        raise MoecompressError(f"home replicas {count} > the {stats.num_experts} experts of a layer; allowed: "
                               f"0..{stats.num_experts}")
    return [np.argsort(-np.asarray(stats.tokens[layer], dtype=np.float64), kind="stable")[:count].tolist()
            for layer in range(stats.num_layers)]


def home_experts(stats: RoutingStats, count: int, hot=None) -> list[list[int]]:
    """[L][...] the experts the home copies: `hot` as given (e.g. the experts a low-bit plan was made for), else
    each layer's `count` hottest."""
    if hot is None:
        return hottest_experts(stats, count)
    hot = [sorted({int(e) for e in layer}) for layer in hot]
    if len(hot) != stats.num_layers or any(e < 0 or e >= stats.num_experts for layer in hot for e in layer):
        raise MoecompressError(f"home experts must be {stats.num_layers} lists of expert ids in "
                               f"0..{stats.num_experts - 1}")
    return hot


def home_reserve(stats: RoutingStats, expert_bytes, count: int, hot=None) -> int:
    """Bytes the home keeps for the copies of each layer's `count` hottest experts (or of `hot`)."""
    b = np.asarray(expert_bytes)
    return int(sum(b[layer, e] for layer, ids in enumerate(home_experts(stats, count, hot)) for e in ids))


def reserved_spec(spec: ServerSpec, reserve: int) -> ServerSpec:
    """`spec` with the home's memory lowered by `reserve` bytes (what the primaries may use)."""
    memory = list(spec.memory_bytes)
    if memory[spec.home] - reserve <= 0:
        raise MoecompressError(f"home replicas need {reserve} bytes on the home, which has {memory[spec.home]}; "
                               "lower --home-replicas or give the home more memory")
    memory[spec.home] -= reserve
    return replace(spec, memory_bytes=tuple(memory))


def add_home_copies(placement: Placement, stats: RoutingStats, count: int, memory_bytes, hot=None) -> Placement:
    """`placement` (primaries placed in the reduced memory) with a home copy of each layer's `count` hottest
    experts it does not hold on the home yet, and the servers' full memory `memory_bytes` restored."""
    if placement.mode != "expert":
        raise MoecompressError("home replicas are for the expert model (the pipeline model has no home copies)")
    home = placement.home if getattr(placement, "home", None) is not None else placement.dense_servers[0]
    servers = [[list(s) for s in layer] for layer in placement.assignment]
    devices = [[list(d) for d in layer] for layer in placement.devices] if placement.devices else None
    full = replace(placement, memory_bytes=tuple(int(m) for m in memory_bytes))
    if devices is not None:  # each device of the home: its share of the home's memory left after dense weights
        D = placement.devices_per_server
        device_free = np.full(D, (full.memory_bytes[home] - full.dense_bytes_on(home)) // D)
        for (s, d), used in placement.device_bytes().items():
            if s == home:
                device_free[d] -= used
    for layer, ids in enumerate(home_experts(stats, count, hot)):
        for e in ids:
            if home in servers[layer][e]:
                continue
            servers[layer][e].append(home)
            if devices is not None:
                d = int(np.argmax(device_free))
                devices[layer][e].append(d)
                device_free[d] -= placement.expert_bytes[layer][e]
    out = replace(full, assignment=as_grid(servers), devices=as_grid(devices) if devices is not None else (),
                  method=f"{placement.method}+home{count}")
    out.check_memory()
    return out


def place_home_replicas(stats: RoutingStats, sizes, spec: ServerSpec, method: str | None, count: int,
                        replicate: bool = True, hot=None) -> Placement:
    """The expert-model placement of `method` with home copies of each layer's `count` hottest experts (or of the
    experts `hot` [L][...] lists), at the memory of `spec` (then hot-expert replicas in what is left, if
    `replicate`). count 0 and no `hot`: `place(...)` itself."""
    from moecompress.shard.compare import place
    from moecompress.shard.replicate import replicate_hot

    if spec.mode != "expert":
        raise MoecompressError("home replicas are for the expert model (--mode expert)")
    if count == 0 and hot is None:
        return place(stats, sizes, spec, method, replicate)
    reserve = home_reserve(stats, sizes.expert_bytes, count, hot)
    try:
        placement = place(stats, sizes, reserved_spec(spec, reserve), method, replicate=False)
    except MoecompressError as exc:
        raise MoecompressError(f"with {count} home replicas per layer ({reserve} bytes reserved on the home) the "
                               f"experts do not fit: {exc}") from exc
    placement = add_home_copies(placement, stats, count, spec.memory_bytes, hot)
    return replicate_hot(placement, stats, spec) if replicate else placement


def min_home_memory(stats: RoutingStats, sizes, spec: ServerSpec, count: int, method: str | None = None,
                    tolerance: int | None = None) -> int:
    """Smallest memory of the home (the other servers as in `spec`) at which `count` home replicas per layer fit;
    `spec`'s own home memory when they fit already. Binary search to `tolerance` bytes (default 1/16 of the
    smallest expert)."""
    def fits(memory: int) -> bool:
        grown = list(spec.memory_bytes)
        grown[spec.home] = memory
        try:
            place_home_replicas(stats, sizes, replace(spec, memory_bytes=tuple(grown)), method, count,
                                replicate=False)
            return True
        except MoecompressError:
            return False

    lo = spec.memory_bytes[spec.home]
    if fits(lo):
        return lo
    hi = lo + home_reserve(stats, sizes.expert_bytes, count) + int(np.asarray(sizes.expert_bytes).sum())
    if not fits(hi):
        raise MoecompressError(f"{count} home replicas per layer do not fit even with {hi} bytes on the home")
    step = tolerance or max(int(np.asarray(sizes.expert_bytes).min()) // 16, 1)
    while hi - lo > step:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def home_bit_plan(plan: BitPlan, experts_paths, hot, bits: int) -> BitPlan:
    """`plan` with the experts of `hot` ([L][...], L in the order of `experts_paths`) at `bits` (every projection).

    Low-bit home copies at equal memory: the runtime computes a pair on the home whenever the home holds a copy, so
    storing the home-copied experts at fewer bits (their primary elsewhere too: that copy then serves only other
    homes) lets the home hold more of them in the same bytes; the quality cost is those experts' quantization."""
    check_bits(bits, "home copies")
    if len(hot) != len(experts_paths):
        raise MoecompressError(f"home experts list {len(hot)} MoE layers, the bit plan {len(experts_paths)}")
    experts = dict(plan.experts)
    for path, ids in zip(experts_paths, hot):
        if path not in experts:
            raise MoecompressError(f"the bit plan has no experts path {path!r}")
        ids = {int(e) for e in ids}
        experts[path] = {proj: tuple(bits if e in ids else b for e, b in enumerate(v))
                         for proj, v in experts[path].items()}
    return replace(plan, experts=experts)


def experts_at_bits(spec, experts_paths, bits: int, count: int = 0) -> list[list[int]]:
    """[L][...] the experts a checkpoint stores at `bits` in every projection (its FormatSpec `spec`), per MoE layer
    in the order of `experts_paths`: the low-bit home copies of `moecompress shard --home-bits` (a checkpoint
    quantized with `home_bit_plan`). `count` > 0: every layer must have exactly that many (--home-replicas)."""
    check_bits(bits, "--home-bits")
    hot = []
    for layer, path in enumerate(experts_paths):
        groups = spec.experts[path].groups
        ids = set.intersection(*(set(by_bits.get(bits, ())) for by_bits in groups.values()))
        if not ids:
            stored = sorted({b for by_bits in groups.values() for b in by_bits})
            raise MoecompressError(f"--home-bits {bits}: MoE layer {layer} ({path}) stores no expert at {bits} bits "
                                   f"(its bits: {', '.join(map(str, stored))}); quantize the home-copied experts at "
                                   f"{bits} bits first (shard.home.home_bit_plan), or pick one of those bits")
        if count and len(ids) != count:
            raise MoecompressError(f"--home-bits {bits}: MoE layer {layer} stores {len(ids)} experts at {bits} bits, "
                                   f"--home-replicas asks for {count}; leave --home-replicas out to copy them all")
        hot.append(sorted(ids))
    return hot


def coactivation_similarity(stats: RoutingStats):
    """[L, E, E] float32 expert similarity from calibration co-activation (execution/tokens/similarity.py: count of
    tokens choosing both / sqrt of each one's count; diagonal 1 for used experts), what `moecompress shard` writes
    into the expert-model bundles for the `substitute` token policy."""
    import torch

    from moecompress.execution.tokens.similarity import similarity_from_coactivation

    counts = np.array(stats.coact, dtype=np.float64)  # the diagonal is zeroed in RoutingStats: put the tokens there
    idx = np.arange(stats.num_experts)
    counts[:, idx, idx] = stats.tokens
    return torch.stack([similarity_from_coactivation(torch.from_numpy(c)) for c in counts]).float()


def choose_home_copies(placement: Placement, mass, copy_bytes, budget: int, home: int | None = None) -> list[list[int]]:
    """[L][expert ids] low-bit home copies of remote experts to hold within `budget` bytes: the experts the home
    (`home`, default the placement's) does not hold, taken greedily by calibration routing mass per copy byte
    (`mass` [L, E], e.g. CalibrationStats.mass; `copy_bytes` [L, E]: each expert's bytes in the low-bit checkpoint),
    skipping those that no longer fit. The runtime computes them only for tokens a token policy makes local
    (`localize:copies=true`; shard/home_copies.py writes them, runtime/edge/tokens_copies.py loads them); the home's
    bytes grow by what they hold."""
    if placement.mode != "expert":
        raise MoecompressError("home copies are for the expert model (the pipeline model has no home)")
    m, b = np.asarray(mass, dtype=np.float64), np.asarray(copy_bytes, dtype=np.int64)
    L, E = len(placement.assignment), len(placement.assignment[0])
    if m.shape != (L, E) or b.shape != (L, E):
        raise MoecompressError(f"mass and copy bytes must be [{L}, {E}] like the placement, got {m.shape}, {b.shape}")
    if budget < 0:
        raise MoecompressError(f"the home copies' budget must be >= 0 bytes, got {budget}")
    if home is None:
        home = placement.home if getattr(placement, "home", None) is not None else placement.dense_servers[0]
    candidates = [(-m[layer, e] / max(b[layer, e], 1), layer, e) for layer in range(L) for e in range(E)
                  if home not in placement.assignment[layer][e] and m[layer, e] > 0]
    chosen, left = [[] for _ in range(L)], int(budget)
    for _, layer, e in sorted(candidates):
        if b[layer, e] <= left:
            chosen[layer].append(e)
            left -= int(b[layer, e])
    return [sorted(c) for c in chosen]


def copies_bytes(copy_bytes, copies) -> int:
    """The bytes of home copies `copies` [L][expert ids] whose sizes are `copy_bytes` [L, E]."""
    return int(sum(int(copy_bytes[layer, e]) for layer, ids in enumerate(copies) for e in ids))


def choose_mixed_home_copies(placement: Placement, mass, high_bytes, low_bytes, budget: int, share: float,
                             home: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(high, low) [L][expert ids]: mixed-bit home copies within `budget` bytes: first choose_home_copies at the high
    bits (`high_bytes` [L, E]) within `share` x budget, then at the low bits (`low_bytes`) in what is left, the experts
    chosen at high bits no candidates again. An expert without a copy at a width (0 bytes there) is no candidate."""
    m = np.asarray(mass, dtype=np.float64)
    high_bytes, low_bytes = np.asarray(high_bytes), np.asarray(low_bytes)
    high = choose_home_copies(placement, np.where(high_bytes > 0, m, 0.0), high_bytes, int(share * budget), home)
    rest = m.copy()
    for layer, ids in enumerate(high):
        rest[layer, ids] = 0.0  # chosen already: choose_home_copies skips experts without mass
    low = choose_home_copies(placement, np.where(low_bytes > 0, rest, 0.0), low_bytes,
                             budget - copies_bytes(high_bytes, high), home)
    return high, low
