"""What a token policy sees (`LayerContext`) and what it decides (`DispatchPlan`) at one MoE layer.

The lossless plan is the expert model's routing (`execution.routing.route_pairs`) with every token's hidden state sent
once to every remote server that computes one of its pairs (`execution.routing.sent_rows`). Policies return changed
copies of it (`dataclasses.replace`); a plan is never mutated.

Wire format that the plan describes (counted by `tokens.traffic.plan_traffic`):
- dispatch: for every server n, one row per *group* of tokens sent to n. Without fusion a group is one token; a fused
  group sends the mean of its members' hidden states once. With `per_pair` (the naive exchange) a token sends one row
  per (token, expert) pair it has on n instead.
- return: each server returns, per group, whichever is smaller: one routing-weighted sum per member, or one output per
  expert the group computes there; the home then scatters them to each member with that member's own weights.

Weights after dropping pairs: if the model's router renormalises its top-k weights (`LayerContext.renormalize`,
e.g. Qwen3-MoE with norm_topk_prob), the kept weights are rescaled to the sum the router gave (1); otherwise
(OLMoE: norm_topk_prob false) the kept weights stay as they are and the dropped share is simply missing. Either way
the result is what that router itself would give had it chosen only the kept experts.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from moecompress.errors import MoecompressError
from moecompress.execution.routing import route_pairs, sent_rows

PRUNED = -1  # server of a pair that is not computed anywhere


@dataclass(frozen=True, eq=False)
class LayerContext:
    """Everything a policy may read at one MoE layer of one forward call (T tokens, top-k experts each)."""

    hidden: torch.Tensor  # [T, H] the experts' input
    topk_ids: torch.Tensor  # [T, k] long, the router's choice
    topk_weights: torch.Tensor  # [T, k] the router's weights
    holds: torch.Tensor  # [E, N] bool: server n holds a copy of expert e (this layer)
    primary: torch.Tensor  # [E] long: the first copy's server
    home: torch.Tensor  # [T] long: each token's home server
    layer: int  # MoE layer index
    sequence: torch.Tensor  # [T] long: the sequence each token belongs to
    position: torch.Tensor  # [T] long: the token's position in its sequence
    renormalize: bool  # the router renormalises its top-k weights (Qwen3: yes, OLMoE: no)
    router_logits: torch.Tensor | None = None  # [T, E] the router's logits, where the caller has them

    def __post_init__(self):
        T, k = self.topk_ids.shape
        if self.router_logits is not None and self.router_logits.shape != (T, self.holds.shape[0]):
            raise MoecompressError(f"router_logits must be [T={T}, E={self.holds.shape[0]}], got "
                                   f"{tuple(self.router_logits.shape)}")
        if self.hidden.ndim != 2 or self.hidden.shape[0] != T:
            raise MoecompressError(f"hidden must be [T={T}, H], got {tuple(self.hidden.shape)}")
        if self.topk_weights.shape != (T, k):
            raise MoecompressError(f"topk_weights must be [{T}, {k}], got {tuple(self.topk_weights.shape)}")
        if self.holds.ndim != 2 or self.primary.shape != self.holds.shape[:1]:
            raise MoecompressError(f"holds must be [E, N] and primary [E], got {tuple(self.holds.shape)} and "
                                   f"{tuple(self.primary.shape)}")
        for name in ("home", "sequence", "position"):
            if getattr(self, name).shape != (T,):
                raise MoecompressError(f"{name} must be [T={T}], got {tuple(getattr(self, name).shape)}")

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def num_experts(self) -> int:
        return self.holds.shape[0]

    @property
    def num_servers(self) -> int:
        return self.holds.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[1]


@dataclass(frozen=True, eq=False)
class DispatchPlan:
    """Where each (token, expert) pair of one MoE layer is computed, with which weight, and what is sent."""

    servers: torch.Tensor  # [T, k] long: server computing the pair, PRUNED (-1) when dropped
    experts: torch.Tensor  # [T, k] long: expert computed (differs from topk_ids where substituted)
    weights: torch.Tensor  # [T, k] float: weight of each pair's output (0 where pruned)
    groups: torch.Tensor  # [T, N] long: token whose row carries t to server n (t unless fused), -1: not sent
    protected: torch.Tensor  # [T] bool: never pruned nor fused
    dispatch_precision: str = "native"  # the model's dtype as is (lossless); see payload.py
    return_precision: str = "native"
    per_pair: bool = False  # naive exchange: one row per remote (token, expert) pair instead of per (token, server)
    notes: tuple = field(default=())  # (policy name, ...) applied, in order
    on_copy: torch.Tensor | None = None  # [T, k] bool: a pair on the token's home computed with the home's low-bit
    # copy of its expert (`PolicyState.copies`; the expert's full copy is remote); None: no pair is

    def copy_pairs(self, home: torch.Tensor) -> torch.Tensor:
        """[T, k] bool: live pairs computed on the token's home with its low-bit copy."""
        if self.on_copy is None:
            return torch.zeros_like(self.servers, dtype=torch.bool)
        return self.on_copy & (self.servers >= 0) & (self.servers == home[:, None])

    def __post_init__(self):
        T, k = self.servers.shape
        for name in ("experts", "weights"):
            if getattr(self, name).shape != (T, k):
                raise MoecompressError(f"plan.{name} must be [{T}, {k}], got {tuple(getattr(self, name).shape)}")
        if self.on_copy is not None and self.on_copy.shape != (T, k):
            raise MoecompressError(f"plan.on_copy must be [{T}, {k}], got {tuple(self.on_copy.shape)}")
        if self.groups.ndim != 2 or self.groups.shape[0] != T or self.protected.shape != (T,):
            raise MoecompressError(f"plan.groups must be [T={T}, N] and protected [T], got "
                                   f"{tuple(self.groups.shape)} and {tuple(self.protected.shape)}")

    @property
    def num_servers(self) -> int:
        return self.groups.shape[1]

    def sent(self) -> torch.Tensor:
        """[T, N] bool: token t's hidden state reaches server n (alone or in a fused row)."""
        return self.groups >= 0


def send_once_groups(servers: torch.Tensor, home: torch.Tensor, num_servers: int) -> torch.Tensor:
    """[T, N] long: every token carried by its own row to each remote server computing one of its pairs, else -1."""
    T = servers.shape[0]
    live = torch.where(servers >= 0, servers, home[:, None].expand_as(servers))  # pruned pairs: never sent
    sent = sent_rows(live, home, num_servers)  # [T, N]
    own = torch.arange(T, device=servers.device)[:, None].expand(T, num_servers)
    return torch.where(sent, own, torch.full_like(own, -1))


def lossless_plan(ctx: LayerContext) -> DispatchPlan:
    """The expert model's routing, every pair computed, each token sent once per remote server."""
    servers = route_pairs(ctx.holds, ctx.primary, ctx.topk_ids, ctx.home)  # [T, k]
    return DispatchPlan(
        servers=servers, experts=ctx.topk_ids.long(), weights=ctx.topk_weights,
        groups=send_once_groups(servers, ctx.home, ctx.num_servers),
        protected=torch.zeros(ctx.num_tokens, dtype=torch.bool, device=servers.device),
    )


def with_pairs(ctx: LayerContext, plan: DispatchPlan, servers: torch.Tensor, experts: torch.Tensor,
               dropped: torch.Tensor, note: str) -> DispatchPlan:
    """`plan` with new pair servers / experts, the `dropped` [T, k] pairs pruned and the weights renormalised as the
    router defines (see the module doc); rows are re-derived as send-once (pruning runs before fusion)."""
    if bool((dropped & plan.protected[:, None]).any()):
        raise MoecompressError(f"policy {note!r} tried to prune a protected token")
    servers = torch.where(dropped, torch.full_like(servers, PRUNED), servers)
    weights = torch.where(dropped, torch.zeros_like(plan.weights), plan.weights)
    if ctx.renormalize:
        before = plan.weights.float().sum(-1, keepdim=True)
        after = weights.float().sum(-1, keepdim=True)
        scale = torch.where(after > 0, before / after.clamp_min(1e-30), torch.ones_like(after))
        weights = (weights.float() * scale).to(plan.weights.dtype)
    return replace(plan, servers=servers, experts=experts, weights=weights,
                   groups=send_once_groups(servers, ctx.home, ctx.num_servers), notes=plan.notes + (note,))
