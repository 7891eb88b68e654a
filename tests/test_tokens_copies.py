"""Low-bit home copies of remote experts (`localize:copies=true`): a token whose remote experts all have a home copy
goes local and computes them with the copies (no round trip; the same experts and weights the router chose); a
token that stays remote uses the full-precision experts as before; without copies the policy is unchanged; the
counters count the copy pairs; the copies' bytes are exactly the chosen experts' stored bytes; choices by routing
mass per byte respect the budget."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_tokens_policies import E, K, T, make_ctx, same_plan, toy_experts

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.execution.tokens import PolicyState, build_pipeline, execute_plan, lossless_plan
from moecompress.execution.tokens.traffic import token_stats
from moecompress.shard.home import choose_home_copies


def routed_ctx(renormalize=True, seed=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    probs = torch.softmax(logits, -1)
    ids = probs.topk(K, -1).indices
    w = probs.gather(1, ids)
    w = w / w.sum(-1, keepdim=True) if renormalize else w
    return replace(make_ctx(renormalize), topk_ids=ids, topk_weights=w, router_logits=logits)


@pytest.mark.parametrize("renormalize", [True, False])
def test_tokens_whose_remote_experts_are_copied_go_local_with_the_routers_own_choice(renormalize):
    ctx = routed_ctx(renormalize)
    remote = ~ctx.holds[:, 0]  # experts the home (server 0) does not hold
    copies = torch.zeros(1, E, dtype=torch.bool)
    copies[0, remote.nonzero().squeeze(1)[:3]] = True  # copies of three remote experts
    state = PolicyState(copies=copies)
    lossless = lossless_plan(ctx)
    # no copies (or copies=false): exactly localize without them
    for spec, st in (("localize:threshold=0.3", state), ("localize:threshold=0.3,copies=true",
                                                         PolicyState(copies=torch.zeros(1, E, dtype=torch.bool)))):
        assert same_plan(build_pipeline(spec).plan(ctx, st), build_pipeline("localize:threshold=0.3").plan(ctx))
    plan = build_pipeline("localize:threshold=1e-6,copies=true").plan(ctx, state)
    is_remote = lossless.servers != 0
    all_copied = (~is_remote | copies[0][ctx.topk_ids]).all(-1) & is_remote.any(-1)
    assert all_copied.sum() >= 3
    # those tokens: every pair on the home, the router's own experts and weights; remote ones on their copies
    assert (plan.servers[all_copied] == 0).all()
    assert torch.equal(plan.experts[all_copied], ctx.topk_ids[all_copied])
    torch.testing.assert_close(plan.weights[all_copied], ctx.topk_weights[all_copied])
    assert torch.equal(plan.on_copy[all_copied], is_remote[all_copied])
    # every other token is untouched (its remote pairs at full precision where they are)
    assert torch.equal(plan.servers[~all_copied], lossless.servers[~all_copied])
    assert not plan.copy_pairs(ctx.home)[~all_copied].any()
    stats = token_stats(ctx, plan)
    assert stats["copy_pairs"] == int(is_remote[all_copied].sum())
    assert stats["remote_tokens"] == int(is_remote.any(-1).sum() - all_copied.sum())
    # copy_threshold bounds the weight computed with copies: 0 moves nobody who needs a copy
    none = build_pipeline("localize:threshold=1e-6,copies=true,copy_threshold=0").plan(ctx, state)
    assert same_plan(none, lossless)
    with pytest.raises(MoecompressError, match="low-bit copies"):
        build_pipeline("localize:threshold=0.1,copies=true").plan(ctx)


def test_executor_computes_copy_pairs_with_the_copies():
    ctx = routed_ctx()
    copies = torch.zeros(1, E, dtype=torch.bool)
    copies[0, ~ctx.holds[:, 0]] = True  # every remote expert copied: every token goes local
    plan = build_pipeline("localize:threshold=1e-6,copies=true").plan(ctx, PolicyState(copies=copies))
    assert (plan.servers == 0).all() and plan.copy_pairs(ctx.home).sum() > T
    full, w = toy_experts(1)
    low, w_low = toy_experts(2)  # the "low-bit" copies: other weights, so that their use is visible
    out = execute_plan(ctx, plan, [full] * 4, copies=low)
    expect = torch.zeros_like(out)
    for t in range(T):
        for j in range(K):
            weights = w_low if plan.on_copy[t, j] else w
            expect[t] += plan.weights[t, j] * torch.tanh(weights[plan.experts[t, j]] @ ctx.hidden[t])
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(MoecompressError, match="no copies"):
        execute_plan(ctx, plan, [full] * 4)


def test_copies_are_chosen_by_mass_per_byte_within_the_budget():
    L, E_, N = 2, 6, 3
    grid = tuple(tuple((e % N,) for e in range(E_)) for _ in range(L))  # home 0 holds experts 0 and 3
    p = Placement(memory_bytes=(10**6,) * N, assignment=grid, expert_bytes=((100,) * E_,) * L, dense_bytes=10,
                  dense_servers=(0,))
    mass = np.array([[9, 5, 1, 9, 3, 0], [0, 2, 8, 0, 7, 6]], dtype=float)
    size = np.array([[10, 10, 10, 10, 20, 10], [10, 10, 10, 10, 10, 40]])
    assert choose_home_copies(p, mass, size, 0) == [[], []]
    # remote candidates by mass per byte: (1,2) .8, (1,4) .7, (0,1) .5, (1,1) .2, (0,4) .15, (1,5) .15, (0,2) .1
    assert choose_home_copies(p, mass, size, 30) == [[1], [2, 4]]
    assert choose_home_copies(p, mass, size, 45) == [[1], [1, 2, 4]]  # (0,4) needs 20 > 5 left: skipped
    every = choose_home_copies(p, mass, size, 10**6)
    assert every == [[1, 2, 4], [1, 2, 4, 5]]  # never the home's own experts, never a mass-0 expert
    with pytest.raises(MoecompressError, match="budget"):
        choose_home_copies(p, mass, size, -1)


def test_per_layer_copy_thresholds_apply_each_layers_own():
    ctx = routed_ctx()
    copies = torch.zeros(2, E, dtype=torch.bool)
    copies[:, ~ctx.holds[:, 0]] = True
    state = PolicyState(copies=copies)
    for layer, expect_local in ((0, False), (1, True)):
        c = replace(ctx, layer=layer)
        plan = build_pipeline("localize:threshold=1e-6,copies=true,copy_thresholds=0/2").plan(c, state)
        uniform = build_pipeline(f"localize:threshold=1e-6,copies=true,copy_threshold={2 if expect_local else 0}")
        assert same_plan(plan, uniform.plan(c, state))
        assert bool((plan.servers == 0).all()) == expect_local
    with pytest.raises(MoecompressError, match="copy_thresholds"):
        build_pipeline("localize:copies=true,copy_thresholds=0.1/x")
    with pytest.raises(MoecompressError, match="copy_thresholds lists 2"):
        build_pipeline("localize:threshold=1e-6,copies=true,copy_thresholds=0/2").plan(replace(ctx, layer=2),
                                                                                          PolicyState(copies=copies.repeat(2, 1)))
