"""Pruning policies: protection, dropping a weak remote server or all of a layer's weak remote pairs, skipping the
weakest expert, substitution.

All are pure functions of (LayerContext, DispatchPlan, PolicyState). A pruning rule never touches a protected token
and never leaves a token without an expert: prune_server and skip_weakest keep its strongest pair, prune_layer keeps
its home pairs (and skips tokens that have none). Thresholds compare with `<`, so a threshold of 0 prunes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from moecompress.errors import MoecompressError
from moecompress.execution.tokens.plan import DispatchPlan, LayerContext, with_pairs



def top_share(score: torch.Tensor, share: float) -> torch.Tensor:
    """[T] bool: the round(share * T) tokens of highest score (ties: lowest index first)."""
    T = score.shape[0]
    n = min(T, int(share * T + 0.5))
    out = torch.zeros(T, dtype=torch.bool, device=score.device)
    if n > 0:
        out[torch.argsort(-score.float(), stable=True)[:n]] = True
    return out


def routing_entropy(weights: torch.Tensor) -> torch.Tensor:
    """[T] entropy of each token's top-k weights normalised to sum 1 (high = the router is unsure)."""
    p = weights.float().clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


@dataclass(frozen=True)
class Protect:
    """Tokens never pruned nor fused: the first `first` of every sequence, the `norm_share` of the call's tokens with
    the largest hidden-state norm, the `entropy_share` with the most uncertain routing (shares round to the nearest
    token count, so a share below 0.5 protects nothing in a one-token decode step)."""

    name: ClassVar[str] = "protect"
    stage: ClassVar[str] = "protect"
    first: int = 0
    norm_share: float = 0.0
    entropy_share: float = 0.0

    def __post_init__(self):
        if self.first < 0 or not (0 <= self.norm_share <= 1 and 0 <= self.entropy_share <= 1):
            raise MoecompressError(f"protect needs first >= 0 and shares in [0, 1], got {self}")

    def __call__(self, ctx: LayerContext, plan: DispatchPlan, state) -> DispatchPlan:
        keep = plan.protected | (ctx.position < self.first)
        keep = keep | top_share(ctx.hidden.float().norm(dim=-1), self.norm_share)
        keep = keep | top_share(routing_entropy(ctx.topk_weights), self.entropy_share)
        return replace(plan, protected=keep, notes=plan.notes + (self.name,))


def _top_server(plan: DispatchPlan) -> torch.Tensor:
    """[T] long: server of each token's strongest live pair."""
    w = torch.where(plan.servers >= 0, plan.weights.float(), torch.full_like(plan.weights, -1.0, dtype=torch.float))
    return plan.servers.gather(1, w.argmax(-1, keepdim=True)).squeeze(1)


def weak_remote_pairs(ctx: LayerContext, plan: DispatchPlan, threshold: float, relative: bool) -> torch.Tensor:
    """[T, k] bool: live pairs on a remote server whose total weight for the token (over all the pairs it computes
    there) is below `threshold` (times the token's top router weight if `relative`); protected tokens and the server
    of a token's strongest pair excluded."""
    T, N = ctx.num_tokens, ctx.num_servers
    live = plan.servers >= 0
    idx = torch.where(live, plan.servers, torch.zeros_like(plan.servers))
    mass = torch.zeros(T, N, dtype=torch.float, device=idx.device)
    mass.scatter_add_(1, idx, torch.where(live, plan.weights.float(), torch.zeros_like(mass[:, :1])))
    limit = threshold * (ctx.topk_weights.float().amax(-1) if relative else torch.ones(T, device=idx.device))
    weak_server = mass < limit[:, None]  # [T, N]
    pair_weak = weak_server.gather(1, idx) & live
    remote = plan.servers != ctx.home[:, None]
    keep = (plan.servers == _top_server(plan)[:, None]) | plan.protected[:, None]
    return pair_weak & remote & ~keep


def weak_layer_pairs(ctx: LayerContext, plan: DispatchPlan, threshold: float, relative: bool,
                     need_home: bool) -> torch.Tensor:
    """[T, k] bool: all live remote pairs of the tokens whose remote weight at this layer (summed over every remote
    server) is below `threshold` (times the token's top router weight if `relative`); protected tokens excluded, and
    with `need_home` also tokens without a live pair on their home (they would lose every expert)."""
    live = plan.servers >= 0
    remote = live & (plan.servers != ctx.home[:, None])
    mass = torch.where(remote, plan.weights.float(), torch.zeros_like(plan.weights, dtype=torch.float)).sum(-1)
    top = ctx.topk_weights.float().amax(-1)
    weak = (mass < _limit(threshold, relative, top)) & ~plan.protected
    if need_home:
        weak = weak & (live & ~remote).any(-1)
    return remote & weak[:, None]


def _limit(threshold: float, relative: bool, top: torch.Tensor) -> torch.Tensor:
    return threshold * (top if relative else torch.ones_like(top))


@dataclass(frozen=True)
class PruneLayer:
    """Keep a token's layer local: drop all its remote pairs when their total weight is below `threshold` (absolute,
    or relative to the token's top routing weight), so the layer costs it no round trip; renormalised as the router
    defines. Tokens with no expert on their home are left alone."""

    name: ClassVar[str] = "prune_layer"
    stage: ClassVar[str] = "prune"
    threshold: float = 0.0
    relative: bool = False

    def __call__(self, ctx: LayerContext, plan: DispatchPlan, state) -> DispatchPlan:
        drop = weak_layer_pairs(ctx, plan, self.threshold, self.relative, need_home=True)
        return with_pairs(ctx, plan, plan.servers, plan.experts, drop, self.name)


@dataclass(frozen=True)
class PruneServer:
    """Drop a token's remote server when the weight of everything it would compute there is below `threshold`
    (absolute, or relative to the token's top routing weight); the rest is renormalised as the router defines."""

    name: ClassVar[str] = "prune_server"
    stage: ClassVar[str] = "prune"
    threshold: float = 0.0
    relative: bool = False

    def __call__(self, ctx: LayerContext, plan: DispatchPlan, state) -> DispatchPlan:
        drop = weak_remote_pairs(ctx, plan, self.threshold, self.relative)
        return with_pairs(ctx, plan, plan.servers, plan.experts, drop, self.name)


@dataclass(frozen=True)
class SkipWeakest:
    """MC-MoE's online dynamic pruning: skip a token's weakest live expert when its weight is below `threshold`
    (relative to the token's top weight by default); `remote_only` restricts it to pairs computed off the home."""

    name: ClassVar[str] = "skip_weakest"
    stage: ClassVar[str] = "prune"
    threshold: float = 0.0
    relative: bool = True
    remote_only: bool = False

    def __call__(self, ctx: LayerContext, plan: DispatchPlan, state) -> DispatchPlan:
        live = plan.servers >= 0
        w = plan.weights.float()
        eligible = live & ~plan.protected[:, None]
        if self.remote_only:
            eligible = eligible & (plan.servers != ctx.home[:, None])
        masked = torch.where(eligible, w, torch.full_like(w, float("inf")))
        weakest = masked.argmin(-1, keepdim=True)  # [T, 1]
        w_min = w.gather(1, weakest).squeeze(1)
        top = ctx.topk_weights.float().amax(-1)
        limit = self.threshold * (top if self.relative else torch.ones_like(top))
        skip = eligible.gather(1, weakest).squeeze(1) & (w_min < limit) & (live.sum(-1) >= 2)
        drop = torch.zeros_like(live).scatter_(1, weakest, skip[:, None])
        return with_pairs(ctx, plan, plan.servers, plan.experts, drop, self.name)


@dataclass(frozen=True)
class Substitute:
    """For pairs that `prune_server` (scope server) or `prune_layer` (scope layer, then also a token's strongest pair
    and tokens without a home expert) with the same knobs would drop, compute the most similar expert the token's
    home holds instead (same weight), as capacity-aware expanded drop and SERE do; a pair whose best local expert has
    a similarity below `min_similarity` is dropped and renormalised. Needs `PolicyState.similarity` [L, E, E]."""

    name: ClassVar[str] = "substitute"
    stage: ClassVar[str] = "prune"
    threshold: float = 0.0
    relative: bool = False
    min_similarity: float = -1.0
    scope: str = "server"

    def __post_init__(self):
        if self.scope not in ("server", "layer"):
            raise MoecompressError(f"substitute: scope must be server or layer, got {self.scope!r}")

    def __call__(self, ctx: LayerContext, plan: DispatchPlan, state) -> DispatchPlan:
        sim = getattr(state, "similarity", None)
        if sim is None or sim.ndim != 3 or ctx.layer >= sim.shape[0] or sim.shape[1:] != (ctx.num_experts,) * 2:
            raise MoecompressError(
                "substitute needs PolicyState(similarity=[L, E, E]) covering this layer (see "
                "tokens.similarity.expert_similarity / similarity_from_coactivation)")
        if self.scope == "layer":
            weak = weak_layer_pairs(ctx, plan, self.threshold, self.relative, need_home=False)
        else:
            weak = weak_remote_pairs(ctx, plan, self.threshold, self.relative)
        local = ctx.holds[:, ctx.home].T.to(sim.device)  # [T, E]: the token's home holds expert e
        s = sim[ctx.layer][plan.experts].float()  # [T, k, E]
        s = torch.where(local[:, None, :], s, torch.full_like(s, float("-inf")))
        best_sim, best = s.max(-1)  # [T, k]
        ok = weak & (best_sim >= self.min_similarity) & torch.isfinite(best_sim)
        experts = torch.where(ok, best, plan.experts)
        servers = torch.where(ok, ctx.home[:, None].expand_as(plan.servers), plan.servers)
        drop = weak & ~ok
        drop = drop & ((servers >= 0) & ~drop).any(-1, keepdim=True)  # never leave a token without an expert
        return with_pairs(ctx, plan, servers, experts, drop, self.name)
