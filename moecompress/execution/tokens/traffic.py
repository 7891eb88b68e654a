"""What a dispatch plan sends, counted with the edge runtime's wire format (pure functions).

Messages and bytes come from `exchange.py` (the batches the runtime's dispatcher encodes), so `plan_traffic` counts
exactly what the runtime sends for the same plan; `token_stats` gives the per-layer counts of the runtime's
`Counters.add_token_stats` (pairs pruned / substituted / computed with the home's low-bit copies, rows fused, remote
tokens, round trips saved).
`alone_bytes` counts the same plan as if every token were its own call (one message per token and server: decode
at batch 1, no fusion). `exchange_args` feeds `Counters.add_expert_exchange` for lossless-format plans.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moecompress.execution.counters import HEADER_BYTES, ID_BYTES, WEIGHT_BYTES
from moecompress.execution.routing import route_pairs
from moecompress.execution.tokens.exchange import batch_messages, server_batches
from moecompress.execution.tokens.payload import row_bytes
from moecompress.execution.tokens.plan import DispatchPlan, LayerContext


@dataclass(frozen=True)
class PlanTraffic:
    """Counts of one plan (one MoE layer of one forward call)."""

    tokens: int
    pairs: int  # routed (token, expert) pairs
    pruned_pairs: int  # pairs computed nowhere
    substituted_pairs: int  # pairs computed by another expert than the router chose
    token_rows: int  # (token, remote server) pairs sent, before fusion
    dispatch_rows: int  # rows sent (after fusion; per pair for the naive exchange)
    fused_rows: int  # token_rows - dispatch_rows saved by fusion
    return_rows: int
    messages: int  # requests + replies
    dispatch_bytes: int  # payload + headers, all servers
    return_bytes: int
    alone_bytes: int  # bytes had every token been its own call (a decode step at batch 1: no fusion, a header each)
    remote_tokens: int  # tokens that need a remote server at this layer (a round trip each at batch 1)
    lossless_remote_tokens: int  # the same for the lossless plan
    round_trip: int  # 1 if this call's layer needs any remote server
    dispatch_precision: str
    return_precision: str

    @property
    def bytes(self) -> int:
        return self.dispatch_bytes + self.return_bytes

    def to_dict(self) -> dict:
        return asdict(self)


def _remote(plan: DispatchPlan, home: torch.Tensor) -> torch.Tensor:
    return (plan.servers >= 0) & (plan.servers != home[:, None])  # [T, k]


def lossless_remote(ctx: LayerContext) -> torch.Tensor:
    """[T] bool: the token needs a remote server at this layer without any policy."""
    servers = route_pairs(ctx.holds, ctx.primary, ctx.topk_ids, ctx.home)
    return (servers != ctx.home[:, None]).any(-1)


def token_stats(ctx: LayerContext, plan: DispatchPlan, batches=None) -> dict:
    """Per-layer counts of `Counters.add_token_stats` for one plan."""
    batches = server_batches(ctx, plan) if batches is None else batches
    remote = _remote(plan, ctx.home).any(-1)
    lossless = lossless_remote(ctx)
    token_rows = int((plan.groups >= 0).sum()) if not plan.per_pair else sum(b.num_members for b in batches)
    return dict(pruned_pairs=int((plan.servers < 0).sum()),
                substituted_pairs=int(((plan.experts != ctx.topk_ids) & (plan.servers >= 0)).sum()),
                token_rows=token_rows, fused_rows=sum(b.num_members - b.num_rows for b in batches),
                remote_tokens=int(remote.sum()), lossless_remote_tokens=int(lossless.sum()),
                saved_hops=2 if bool(lossless.any()) and not bool(remote.any()) else 0,
                copy_pairs=int(plan.copy_pairs(ctx.home).sum()))


def plan_traffic(ctx: LayerContext, plan: DispatchPlan, elem_bytes: int | None = None) -> PlanTraffic:
    """Traffic of `plan`; `elem_bytes` of the model dtype (native payloads; default: the hidden states' dtype)."""
    T, k = ctx.topk_ids.shape
    H = ctx.hidden_size
    elem = ctx.hidden.dtype.itemsize if elem_bytes is None else int(elem_bytes)
    batches = server_batches(ctx, plan)
    msgs = batch_messages(ctx, plan, batches, elem)
    stats = token_stats(ctx, plan, batches)
    d_row, r_row = row_bytes(plan.dispatch_precision, H, elem), row_bytes(plan.return_precision, H, elem)
    k_sent = 1 if plan.per_pair else k
    alone = stats["token_rows"] * (HEADER_BYTES + d_row + k_sent * (ID_BYTES + WEIGHT_BYTES) + r_row)
    return PlanTraffic(
        tokens=T, pairs=T * k, pruned_pairs=stats["pruned_pairs"], substituted_pairs=stats["substituted_pairs"],
        token_rows=stats["token_rows"], dispatch_rows=sum(b.num_rows for b in batches),
        fused_rows=stats["fused_rows"], return_rows=sum(m[3] for m in msgs), messages=2 * len(msgs),
        dispatch_bytes=sum(m[1] for m in msgs), return_bytes=sum(m[2] for m in msgs), alone_bytes=alone,
        remote_tokens=stats["remote_tokens"], lossless_remote_tokens=stats["lossless_remote_tokens"],
        round_trip=int(stats["remote_tokens"] > 0),
        dispatch_precision=plan.dispatch_precision, return_precision=plan.return_precision,
    )


def exchange_args(ctx: LayerContext, plan: DispatchPlan, home: int, elem_bytes: int | None = None) -> dict:
    """Keyword arguments of `Counters.add_expert_exchange` for this plan (rows and pairs per server). Exact for
    native send-once plans without fusion (the lossless format); `plan_traffic` counts every plan."""
    N = ctx.num_servers
    rows = [int((plan.groups[:, n] == torch.arange(ctx.num_tokens)).sum()) if n != home else 0 for n in range(N)]
    live = plan.servers >= 0
    pairs = [int((live & (plan.servers == n)).sum()) for n in range(N)]
    elem = ctx.hidden.dtype.itemsize if elem_bytes is None else int(elem_bytes)
    return dict(layer=ctx.layer, home=home, rows=rows, pairs=pairs, hidden_size=ctx.hidden_size,
                top_k=ctx.topk_ids.shape[1], elem_bytes=elem)
