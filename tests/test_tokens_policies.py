"""Token policies: the lossless default, pruning, protection, substitution, fusion, payload precision, specs."""
from __future__ import annotations

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.execution.counters import HEADER_BYTES, Counters
from moecompress.execution.routing import route_pairs, sent_rows
from moecompress.execution.tokens import (
    POLICIES, PRUNED, LayerContext, PolicyState, build_pipeline, dequantize_payload, execute_plan, lossless_plan,
    make_policy, parse_spec, plan_traffic, quantize_payload, register_policy, row_bytes,
)
from moecompress.execution.tokens.traffic import exchange_args

T, K, E, N, H = 48, 4, 8, 4, 32


def make_ctx(renormalize=True, seed=0, hidden=None, weights=None, ids=None) -> LayerContext:
    g = torch.Generator().manual_seed(seed)
    holds = torch.zeros(E, N, dtype=torch.bool)
    holds[torch.arange(E), torch.arange(E) % N] = True
    holds[0, 1] = holds[5, 0] = True  # two replicas
    primary = torch.arange(E) % N
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if weights is None:
        p = torch.rand(T, K, generator=g).sort(-1, descending=True).values + 0.01
        weights = p / p.sum(-1, keepdim=True) if renormalize else p * 0.2
    if hidden is None:
        hidden = torch.randn(T, H, generator=g)
    return LayerContext(hidden=hidden, topk_ids=ids, topk_weights=weights, holds=holds, primary=primary,
                        home=torch.zeros(T, dtype=torch.long), layer=0, sequence=torch.arange(T) // 16,
                        position=torch.arange(T) % 16, renormalize=renormalize)


def toy_experts(seed=1):
    w = torch.randn(E, H, H, generator=torch.Generator().manual_seed(seed)) / H ** 0.5

    def experts(x, ids, weights):  # [R, H], [R, 1], [R, 1]
        return weights * torch.tanh(torch.einsum("rh,roh->ro", x, w[ids[:, 0]]))
    return experts, w


def reference_output(ctx, plan, w):
    """Every live pair computed directly on the token's own hidden state."""
    out = torch.zeros(T, H)
    for t in range(T):
        for j in range(K):
            if plan.servers[t, j] >= 0:
                out[t] += plan.weights[t, j] * torch.tanh(w[plan.experts[t, j]] @ ctx.hidden[t])
    return out


def same_plan(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("servers", "experts", "weights", "groups"))


def test_default_is_send_once_lossless():
    ctx = make_ctx()
    plan = build_pipeline(None).plan(ctx)
    servers = route_pairs(ctx.holds, ctx.primary, ctx.topk_ids, ctx.home)
    assert torch.equal(plan.servers, servers)
    assert torch.equal(plan.groups >= 0, sent_rows(servers, ctx.home, N))
    assert same_plan(plan, lossless_plan(ctx)) and plan.dispatch_precision == "native"
    experts, w = toy_experts()
    out = execute_plan(ctx, plan, [experts] * N)
    torch.testing.assert_close(out, reference_output(ctx, plan, w), rtol=0, atol=1e-5)  # native payloads: exact
    for spec in ("", "none", [], {}):
        assert torch.equal(execute_plan(ctx, build_pipeline(spec).plan(ctx), [experts] * N), out)


@pytest.mark.parametrize("spec", ["prune_server:threshold=0", "prune_server:threshold=0,relative=true",
                                  "prune_layer:threshold=0", "substitute:threshold=0,scope=layer",
                                  "skip_weakest:threshold=0", "substitute:threshold=0", "fuse:threshold=1.01",
                                  "protect:first=4,norm_share=0.5+prune_server:threshold=0+fuse:threshold=1.5"])
def test_zero_thresholds_change_nothing(spec):
    ctx = make_ctx()
    state = PolicyState(similarity=torch.eye(E)[None])
    experts, _ = toy_experts()
    a, b = lossless_plan(ctx), build_pipeline(spec).plan(ctx, state)
    assert same_plan(a, b)
    assert torch.equal(execute_plan(ctx, a, [experts] * N), execute_plan(ctx, b, [experts] * N))


@pytest.mark.parametrize("renormalize", [True, False])
def test_pruned_weights_follow_the_router(renormalize):
    ctx = make_ctx(renormalize)
    plan = build_pipeline("prune_server:threshold=0.9,relative=true+skip_weakest:threshold=0.6").plan(ctx)
    dropped = plan.servers == PRUNED
    assert dropped.any() and (plan.servers >= 0).any(-1).all()  # every token keeps at least one expert
    assert (plan.weights[dropped] == 0).all()
    if renormalize:  # Qwen3-style router: the kept weights sum to 1 again
        torch.testing.assert_close(plan.weights.sum(-1), torch.ones(T))
    else:  # OLMoE-style router: kept weights unchanged, the dropped share is missing
        assert torch.equal(plan.weights[~dropped], ctx.topk_weights[~dropped])
    top = ctx.topk_weights.argmax(-1)
    assert (plan.servers.gather(1, top[:, None]) >= 0).all()  # the strongest pair is never pruned
    assert not (plan.groups[dropped.all(-1)] >= 0).any()


def test_prune_server_drops_whole_weak_remote_servers():
    ctx = make_ctx()
    plan = make_policy("prune_server", {"threshold": "0.3"})(ctx, lossless_plan(ctx), PolicyState())
    base = lossless_plan(ctx).servers
    mass = torch.zeros(T, N).scatter_add_(1, base, ctx.topk_weights)
    for t in range(T):
        top_server = base[t, ctx.topk_weights[t].argmax()]
        for n in range(1, N):
            expect_drop = mass[t, n] < 0.3 and n != top_server and (base[t] == n).any()
            assert bool(((base[t] == n) & (plan.servers[t] == PRUNED)).any()) == bool(expect_drop)


def test_prune_layer_makes_layers_local():
    ctx = make_ctx()
    base = lossless_plan(ctx)
    plan = make_policy("prune_layer", {"threshold": "0.5"})(ctx, base, PolicyState())
    remote = (base.servers != 0)
    rmass = torch.where(remote, ctx.topk_weights, torch.zeros(())).sum(-1)
    expect_local = (rmass < 0.5) & (~remote).any(-1)
    now_remote = ((plan.servers > 0)).any(-1)
    assert expect_local.any() and torch.equal(now_remote, remote.any(-1) & ~expect_local)
    assert (plan.servers >= 0).any(-1).all()
    assert plan_traffic(ctx, plan).remote_tokens == int(now_remote.sum())
    sim = torch.eye(E)[None] + 0.01
    sub = make_policy("substitute", {"threshold": "1.5", "scope": "layer"})(ctx, base, PolicyState(similarity=sim))
    assert not (sub.servers > 0).any() and (sub.servers == 0).all()  # everything computed on the home
    none_alike = make_policy("substitute", {"threshold": "1.5", "scope": "layer", "min_similarity": "2"})
    kept = none_alike(ctx, base, PolicyState(similarity=sim))
    assert (kept.servers >= 0).any(-1).all() and not (kept.experts != ctx.topk_ids).any()
    no_home = ~(~remote).any(-1)
    assert no_home.any() and torch.equal(kept.servers[no_home], base.servers[no_home])
    with pytest.raises(MoecompressError, match="scope must be server or layer"):
        make_policy("substitute", {"scope": "world"})


def test_protected_tokens_are_never_pruned_nor_fused():
    ctx = make_ctx()
    spec = "protect:first=3,norm_share=0.25,entropy_share=0.1+prune_server:threshold=5,relative=true" \
           "+prune_layer:threshold=5+skip_weakest:threshold=5+fuse:threshold=-1"
    plan = build_pipeline(spec).plan(ctx)
    base = lossless_plan(ctx)
    prot = plan.protected
    assert prot[ctx.position < 3].all() and int(prot.sum()) >= 12
    assert torch.equal(plan.servers[prot], base.servers[prot])
    assert torch.equal(plan.weights[prot], base.weights[prot])
    own = torch.arange(T)[:, None].expand(T, N)
    assert torch.equal(plan.groups[prot], torch.where(base.groups[prot] >= 0, own[prot], -1))
    assert (plan.servers[~prot] == PRUNED).any()


def test_substitute_uses_the_most_similar_local_expert():
    ctx = make_ctx()
    sim = torch.full((E, E), -1.0)
    sim.fill_diagonal_(1.0)
    sim[:, 4] = 0.9  # expert 4 (on server 0, the home) resembles every expert
    sim[4, 4] = 1.0
    state = PolicyState(similarity=sim[None])
    plan = make_policy("substitute", {"threshold": 2.0, "relative": True})(ctx, lossless_plan(ctx), state)
    base = lossless_plan(ctx)
    changed = plan.experts != ctx.topk_ids
    assert changed.any() and (plan.experts[changed] == 4).all() and (plan.servers[changed] == 0).all()
    assert torch.equal(plan.weights, base.weights)  # substitution keeps the weight
    strict = make_policy("substitute", {"threshold": 2.0, "relative": True, "min_similarity": 0.95})
    plan2 = strict(ctx, lossless_plan(ctx), state)
    assert (plan2.servers == PRUNED).any() and not (plan2.experts != ctx.topk_ids).any()
    with pytest.raises(MoecompressError, match="similarity"):
        make_policy("substitute", {"threshold": 0.5})(ctx, lossless_plan(ctx), PolicyState())


def test_fused_rows_scatter_back_to_every_member():
    base = make_ctx()
    hidden, ids, weights = base.hidden.clone(), base.topk_ids.clone(), base.topk_weights.clone()
    hidden[1::2] = hidden[0::2]  # pairs of identical tokens ...
    ids[1::2] = ids[0::2]
    weights[1::2] = weights[0::2].flip(-1)  # ... with their own routing weights
    weights = weights / weights.sum(-1, keepdim=True)
    ctx = make_ctx(hidden=hidden, ids=ids, weights=weights)
    fused = build_pipeline("fuse:threshold=0.999").plan(ctx)
    tr = plan_traffic(ctx, fused)
    assert tr.fused_rows > 0 and tr.dispatch_rows < tr.token_rows
    own = torch.arange(T)[:, None]
    merged = (fused.groups >= 0) & (fused.groups != own)
    assert torch.equal(hidden[fused.groups[merged]], hidden[merged.nonzero()[:, 0]])  # merged with its twin
    experts, _ = toy_experts()
    out = execute_plan(ctx, fused, [experts] * N)
    assert torch.equal(out, execute_plan(ctx, lossless_plan(ctx), [experts] * N))
    within = build_pipeline("fuse:threshold=0.999,across=false").plan(ctx)
    g = within.groups
    assert (ctx.sequence[g.clamp_min(0)] == ctx.sequence[:, None])[g >= 0].all()


def test_fused_row_is_the_members_mean_and_each_member_keeps_its_weights():
    ctx = make_ctx()
    fused = build_pipeline("fuse:threshold=-1").plan(ctx)  # merge as much as matching allows
    experts, w = toy_experts()
    out = execute_plan(ctx, fused, [experts] * N)
    expect = torch.zeros(T, H)
    for t in range(T):
        for j in range(K):
            n = int(fused.servers[t, j])
            x = ctx.hidden[t]
            if n != 0:
                members = fused.groups[:, n] == fused.groups[t, n]
                x = ctx.hidden[members].mean(0).bfloat16().float()
            expect[t] += fused.weights[t, j] * torch.tanh(w[fused.experts[t, j]] @ x)
    torch.testing.assert_close(out, expect, rtol=0, atol=2e-2)


def test_payload_precisions():
    x = torch.randn(16, H) * torch.logspace(-2, 2, 16)[:, None]
    assert row_bytes("bf16", H) == 2 * H and row_bytes("int8", H) == H + 2
    xb = x.bfloat16()
    assert torch.equal(dequantize_payload(*quantize_payload(xb, "bf16"), xb.dtype), xb)
    q, scale = quantize_payload(x, "int8")
    assert q.dtype == torch.int8 and scale.shape == (16, 1)
    err = (dequantize_payload(q, scale, torch.float32) - x).abs()
    assert (err <= scale * 0.5 + 1e-6).all()
    if hasattr(torch, "float8_e4m3fn"):
        q, scale = quantize_payload(x, "fp8")
        rel = (dequantize_payload(q, scale, torch.float32) - x).abs() / x.abs().amax(-1, keepdim=True)
        assert rel.max() < 0.04
    assert row_bytes("native", H, 4) == 4 * H and torch.equal(quantize_payload(x, "native")[0], x)
    with pytest.raises(MoecompressError, match="allowed: native, bf16, int8"):
        quantize_payload(x, "int4")


def test_traffic_agrees_with_counters_and_the_naive_exchange_costs_more():
    ctx = make_ctx()
    plan = lossless_plan(ctx)
    tr = plan_traffic(ctx, plan)
    c = Counters(N, 1)
    c.add_expert_exchange(**exchange_args(ctx, plan, home=0))
    assert tr.bytes == int(c.bytes.sum()) and tr.messages == int(c.messages.sum()) and c.hops[0] == 2 * tr.round_trip
    assert tr.alone_bytes == tr.bytes + HEADER_BYTES * (tr.token_rows - tr.messages // 2)
    naive = plan_traffic(ctx, build_pipeline("per_pair").plan(ctx))
    remote_pairs = int(((plan.servers >= 0) & (plan.servers != 0)).sum())
    assert naive.dispatch_rows == remote_pairs > tr.dispatch_rows and naive.bytes > tr.bytes
    small = plan_traffic(ctx, build_pipeline("precision:dispatch=int8,return=int8").plan(ctx))
    assert small.dispatch_rows == tr.dispatch_rows
    assert small.bytes == tr.bytes - (tr.dispatch_rows + tr.return_rows) * (4 * H - (H + 2))  # float32 native
    assert tr.remote_tokens == tr.lossless_remote_tokens == int(((plan.servers != 0).any(-1)).sum())


def test_specs_parse_alike_and_bad_ones_are_clear_errors():
    a = build_pipeline("prune_server:threshold=0.05,relative=true+precision:dispatch=int8")
    b = build_pipeline([{"name": "precision", "dispatch": "int8"}, {"name": "prune_server", "threshold": 0.05,
                                                                   "relative": True}])
    c = build_pipeline({"prune_server": {"threshold": 0.05, "relative": "yes"}, "precision": {"dispatch": "int8"}})
    assert a.spec == b.spec == c.spec and [p.name for p in a.policies] == ["prune_server", "precision"]
    assert parse_spec("fuse") == [("fuse", {})]
    with pytest.raises(MoecompressError, match="allowed: .*fuse.*prune_server"):
        build_pipeline("prune_servers:threshold=0.1")
    with pytest.raises(MoecompressError, match="unknown knob.*allowed: relative, threshold"):
        build_pipeline("prune_server:treshold=0.1")
    with pytest.raises(MoecompressError, match="threshold must be a float"):
        build_pipeline("prune_server:threshold=high")
    with pytest.raises(MoecompressError, match="relative must be true or false"):
        build_pipeline("prune_server:relative=maybe")
    with pytest.raises(MoecompressError, match="knob=value"):
        build_pipeline("fuse:0.9")
    with pytest.raises(MoecompressError, match="allowed: native, bf16"):
        build_pipeline("precision:dispatch=int3")
    assert build_pipeline("int8").spec == "precision:dispatch=int8,return=int8"
    with pytest.raises(MoecompressError, match="payload shorthands native, bf16, int8"):
        build_pipeline("int4")
    with pytest.raises(MoecompressError, match="cannot be combined"):
        build_pipeline("per_pair+fuse:threshold=0.9")


def test_user_policy_found_by_name():
    from dataclasses import dataclass, replace
    from typing import ClassVar

    registry = dict(POLICIES)

    @dataclass(frozen=True)
    class DropRemote:
        name: ClassVar[str] = "drop_remote"
        stage: ClassVar[str] = "prune"
        keep_top: bool = True

        def __call__(self, ctx, plan, state):
            from moecompress.execution.tokens.plan import with_pairs
            remote = (plan.servers != ctx.home[:, None]) & (plan.servers >= 0)
            return with_pairs(ctx, plan, plan.servers, plan.experts, remote & ~plan.protected[:, None], self.name)

    register_policy(DropRemote, registry)
    assert "drop_remote" not in POLICIES
    ctx = make_ctx()
    plan = build_pipeline("protect:first=2+drop_remote:keep_top=false", registry).plan(ctx)
    tr = plan_traffic(ctx, plan)
    assert tr.remote_tokens == int(((ctx.position < 2) & (lossless_plan(ctx).servers != 0).any(-1)).sum())
    assert replace(plan).notes == ("protect", "drop_remote")
    with pytest.raises(MoecompressError, match="stage"):
        register_policy(type("Bad", (), {"name": "bad", "stage": "later"}), registry)


@pytest.mark.parametrize("renormalize", [True, False])
def test_localize_takes_the_routers_next_local_choices(renormalize):
    from dataclasses import replace

    g = torch.Generator().manual_seed(4)
    base = make_ctx(renormalize)
    logits = torch.randn(T, E, generator=g)
    probs = torch.softmax(logits, -1)
    ids = probs.topk(K, -1).indices
    w = probs.gather(1, ids)
    w = w / w.sum(-1, keepdim=True) if renormalize else w
    ctx = replace(base, topk_ids=ids, topk_weights=w, router_logits=logits)
    assert same_plan(build_pipeline("localize:threshold=0").plan(ctx), lossless_plan(ctx))
    plan = build_pipeline("protect:first=2+localize:threshold=1.01").plan(ctx)
    free = ctx.position >= 2
    lossless = lossless_plan(ctx)
    moved = free & (lossless.servers != 0).any(-1)
    assert moved.sum() > 10 and (plan.servers[free] <= 0).all()  # home holds 3 < K experts: the 4th pair is dropped
    assert torch.equal(plan.servers[~moved], lossless.servers[~moved])
    local = ctx.holds[:, 0]
    masked = logits.masked_fill(~local, float("-inf"))
    expect = masked.topk(int(local.sum()), -1).indices  # [T, 3] the router's best experts among the home's
    n = expect.shape[1]
    assert torch.equal(plan.experts[moved][:, :n], expect[moved]) and (plan.servers[moved][:, n:] == PRUNED).all()
    p = probs.gather(1, expect)
    p = p / p.sum(-1, keepdim=True) if renormalize else p
    torch.testing.assert_close(plan.weights[moved][:, :n], p[moved].to(plan.weights.dtype))
    with pytest.raises(MoecompressError, match="router's logits"):
        build_pipeline("localize:threshold=0.5").plan(base)


def test_localize_gap_measure_moves_exactly_the_tokens_whose_local_choices_lose_little():
    from dataclasses import replace

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(T, E, generator=g) * 2
    probs = torch.softmax(logits, -1)
    ids = probs.topk(K, -1).indices
    ctx = replace(make_ctx(True), topk_ids=ids, topk_weights=probs.gather(1, ids) / probs.gather(1, ids).sum(-1,
                  keepdim=True), router_logits=logits)
    local = ctx.holds[:, 0]
    n = int(local.sum())
    gap = probs.gather(1, ids).sum(-1) - probs.masked_fill(~local, 0).topk(n, -1).values.sum(-1)  # by hand
    remote = (lossless_plan(ctx).servers != 0).any(-1)
    threshold = float(gap[remote].median())
    plan = build_pipeline(f"localize:threshold={threshold},measure=gap").plan(ctx)
    moved = (plan.servers != lossless_plan(ctx).servers).any(-1)
    assert torch.equal(moved, remote & (gap < threshold)) and 0 < int(moved.sum()) < int(remote.sum())
    assert (plan.servers[moved] <= 0).all()
    by_remote = build_pipeline(f"localize:threshold={threshold}").plan(ctx)  # remote weight >= gap: fewer moved
    assert int(((by_remote.servers != lossless_plan(ctx).servers).any(-1)).sum()) <= int(moved.sum())
    with pytest.raises(MoecompressError, match="measure must be one of remote, gap"):
        build_pipeline("localize:threshold=0.1,measure=mass")


def test_localize_per_layer_thresholds_apply_each_layers_own():
    from dataclasses import replace

    g = torch.Generator().manual_seed(9)
    logits = torch.randn(T, E, generator=g)
    probs = torch.softmax(logits, -1)
    ids = probs.topk(K, -1).indices
    w = probs.gather(1, ids)
    ctx = replace(make_ctx(True), topk_ids=ids, topk_weights=w / w.sum(-1, keepdim=True), router_logits=logits)
    per_layer = build_pipeline("localize:thresholds=0/0.6/1.01")
    for layer, t in enumerate((0.0, 0.6, 1.01)):
        at = replace(ctx, layer=layer)
        assert same_plan(per_layer.plan(at), build_pipeline(f"localize:threshold={t}").plan(at))
    assert same_plan(per_layer.plan(ctx), lossless_plan(ctx))  # layer 0: threshold 0 changes nothing
    moved = (per_layer.plan(replace(ctx, layer=2)).servers != lossless_plan(ctx).servers).any(-1)
    assert int(moved.sum()) > 10
    with pytest.raises(MoecompressError, match="lists 3 MoE layers"):
        per_layer.plan(replace(ctx, layer=3))
    for bad in ("0.1/x", "0.1/-0.2"):
        with pytest.raises(MoecompressError, match="thresholds must be"):
            build_pipeline(f"localize:thresholds={bad}")
