"""`localize`: make a token's layer local by re-routing it to the experts its home holds (the router's next choices),
or to the home's low-bit copies of remote experts (`copies=true`). A pure function of (LayerContext, DispatchPlan,
PolicyState), like the pruning rules in prune.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from moecompress.errors import MoecompressError
from moecompress.execution.tokens.plan import DispatchPlan, LayerContext, send_once_groups
from moecompress.execution.tokens.prune import _limit

LOCALIZE_MEASURES = ("remote", "gap")
COPY_BITS = (0, 2, 3, 4, 8)  # localize's copy_bits knob: 0 = the copies' own bits


@dataclass(frozen=True)
class Localize:
    """Make a token's layer local: when the weight of its remote pairs is below `threshold` (absolute, or relative
    to its top routing weight), replace its top-k by the top-k *of the experts its home holds*, ranked by the
    router's own logits, with the weights that router gives them (softmax over all experts; renormalised to the
    router's sum where it renormalises). Unlike dropping, the token keeps k experts; unlike `substitute`, the
    replacements are the router's next choices, not the most similar experts. Tokens whose home holds fewer than
    `min_local` experts are left alone. Needs `LayerContext.router_logits` (the edge runtime passes them).

    `measure` is what is compared with the threshold: `remote` (the weight of the token's remote pairs) or `gap`
    (the router probability the local top-k loses against the router's top-k: softmax over all experts, summed
    over the chosen top-k minus summed over the local top-k; never above the remote weight, and small when the
    home holds the router's next choices at nearly the same probability).

    `thresholds`: one threshold per MoE layer, `/`-separated (e.g. `0.1/0.3/0.1/0.2`), used instead of `threshold`
    (a model with more MoE layers than listed is refused at its first unlisted layer).

    `copies=true`: the home's low-bit copies of remote experts (`PolicyState.copies` [L, E]) count as local experts:
    a localized token computes a copied expert on its home with the copy (plan.on_copy) instead of losing it, so
    `measure=remote` compares only the weight of its remote pairs *without* a copy with the threshold; and a token
    goes local only while the weight of its remote pairs computed with copies is below `copy_threshold` (absolute,
    or relative with `relative`; the default 2 never binds; `copy_thresholds`: one per MoE layer, `/`-separated,
    instead). A token that is not localized sends its remote pairs
    to their full-precision copies as without this policy (the round trip is paid anyway). `copy_bits`: the bits
    the copies must have (a deployment whose copies bundle holds other bits is refused; 0: whatever it holds)."""

    name: ClassVar[str] = "localize"
    stage: ClassVar[str] = "prune"
    threshold: float = 0.0
    relative: bool = False
    min_local: int = 1
    measure: str = "remote"
    thresholds: str = ""
    copies: bool = False
    copy_threshold: float = 2.0
    copy_thresholds: str = ""
    copy_bits: int = 0

    def __post_init__(self):
        if self.measure not in LOCALIZE_MEASURES:
            raise MoecompressError(f"localize: measure must be one of {', '.join(LOCALIZE_MEASURES)}, got "
                                   f"{self.measure!r}")
        if self.copy_bits not in COPY_BITS:
            raise MoecompressError(f"localize: copy_bits must be one of {', '.join(map(str, COPY_BITS))} (0: any), "
                                   f"got {self.copy_bits!r}")
        self.per_layer()  # a malformed list is refused when the policy is made
        self.per_layer("copy_thresholds")

    def per_layer(self, knob: str = "thresholds") -> tuple[float, ...]:
        """The `thresholds` (or `copy_thresholds`) knob as numbers (empty: none given)."""
        text = getattr(self, knob)
        if not text.strip():
            return ()
        try:
            values = tuple(float(v) for v in text.split("/"))
        except ValueError:
            raise MoecompressError(f"localize: {knob} must be numbers separated by '/', one per MoE layer "
                                   f"(e.g. 0.1/0.3/0.2), got {text!r}") from None
        if any(v < 0 for v in values):
            raise MoecompressError(f"localize: {knob} must be >= 0, got {text!r}")
        return values

    def threshold_at(self, layer: int, knob: str = "thresholds") -> float:
        values = self.per_layer(knob)
        if not values:
            return self.threshold if knob == "thresholds" else self.copy_threshold
        if layer >= len(values):
            raise MoecompressError(f"localize: {knob} lists {len(values)} MoE layers, the model has more "
                                   f"(layer {layer}); give one per MoE layer")
        return values[layer]

    def __call__(self, ctx: LayerContext, plan: DispatchPlan, state) -> DispatchPlan:
        if ctx.router_logits is None:
            raise MoecompressError("localize needs the router's logits (LayerContext.router_logits); the edge "
                                   "runtime's dispatcher passes them when the MoE block has a linear router")
        k = ctx.topk_ids.shape[1]
        live = plan.servers >= 0
        remote = live & (plan.servers != ctx.home[:, None])
        held = ctx.holds[:, ctx.home].T  # [T, E] the token's home holds expert e (full precision)
        copied = self._copies(ctx, state) & ~held  # [T, E] the home has only a low-bit copy of e
        by_copy = remote & copied.gather(1, plan.experts.long())  # [T, k] remote pairs the home could compute
        zero = torch.zeros_like(plan.weights, dtype=torch.float)
        mass = torch.where(remote & ~by_copy, plan.weights.float(), zero).sum(-1)
        copy_mass = torch.where(by_copy, plan.weights.float(), zero).sum(-1)
        local = held | copied
        n_local = local.sum(-1)
        logits = ctx.router_logits.float()
        probs = torch.softmax(logits, -1)  # [T, E]
        ranked = torch.where(local, logits, torch.full_like(logits, float("-inf")))
        kk = min(k, int(n_local.max()))
        if self.measure == "gap" and kk > 0:
            local_p = torch.where(local, probs, torch.zeros_like(probs)).topk(kk, -1).values.sum(-1)
            mass = probs.gather(1, ctx.topk_ids.long()).sum(-1) - local_p
        top = ctx.topk_weights.float().amax(-1)
        go = (mass < _limit(self.threshold_at(ctx.layer), self.relative, top)) & remote.any(-1)
        go = go & (copy_mass < _limit(self.threshold_at(ctx.layer, "copy_thresholds"), self.relative, top))
        go = go & ~plan.protected & (n_local >= max(self.min_local, 1))
        if not bool(go.any()):
            return replace(plan, notes=plan.notes + (self.name,))
        top_p, top_e = probs.gather(1, ranked.topk(kk, -1).indices), ranked.topk(kk, -1).indices  # [T, kk]
        valid = torch.arange(kk)[None, :] < n_local[:, None]  # homes holding fewer than k experts: fewer pairs
        if kk < k:
            pad = k - kk
            top_p = torch.cat([top_p, torch.zeros(len(top_p), pad)], -1)
            top_e = torch.cat([top_e, torch.zeros(len(top_e), pad, dtype=torch.long)], -1)
            valid = torch.cat([valid, torch.zeros(len(valid), pad, dtype=torch.bool)], -1)
        top_p = torch.where(valid, top_p, torch.zeros_like(top_p))
        if ctx.renormalize:
            before = plan.weights.float().sum(-1, keepdim=True)
            top_p = top_p / top_p.sum(-1, keepdim=True).clamp_min(1e-30) * before
        home = ctx.home[:, None].expand_as(plan.servers)
        new_servers = torch.where(valid, home, torch.full_like(home, -1))
        servers = torch.where(go[:, None], new_servers, plan.servers)
        experts = torch.where(go[:, None], torch.where(valid, top_e, plan.experts), plan.experts)
        weights = torch.where(go[:, None], top_p.to(plan.weights.dtype), plan.weights)
        on_copy = plan.on_copy
        if bool(copied.any()):
            new_copy = go[:, None] & valid & copied.gather(1, experts)
            on_copy = new_copy if on_copy is None else torch.where(go[:, None], new_copy, on_copy)
        return replace(plan, servers=servers, experts=experts, weights=weights, on_copy=on_copy,
                       groups=send_once_groups(servers, ctx.home, ctx.num_servers), notes=plan.notes + (self.name,))

    def _copies(self, ctx: LayerContext, state) -> torch.Tensor:
        """[T, E] bool: the token's home has a low-bit copy of expert e (all False without `copies`)."""
        none = torch.zeros(ctx.num_tokens, ctx.num_experts, dtype=torch.bool)
        if not self.copies:
            return none
        copies = getattr(state, "copies", None)
        if copies is None or copies.ndim != 2 or copies.shape[1] != ctx.num_experts or ctx.layer >= copies.shape[0]:
            raise MoecompressError(
                "localize:copies=true needs the home's low-bit copies (PolicyState(copies=[MoE layers, experts] "
                "bool)); shard with `moecompress shard --home-copies BITS` (deployments then load them), attach them "
                "with runtime.edge.tokens_copies.attach_home_copies, or pass them to token_policies")
        return copies[ctx.layer].bool()[None, :].expand(ctx.num_tokens, -1)
