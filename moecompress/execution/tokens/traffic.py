"""What a dispatch plan sends, counted with the wire format of `execution.counters` (pure functions).

Request to server n (when it gets any row): `counters.HEADER_BYTES` + per row its payload (`payload.row_bytes` at the
dispatch precision) + `top_k` x (ID_BYTES + WEIGHT_BYTES) per token the row carries (a fused row carries the ids and
weights of each member). Reply: per row at the return precision; a fused group returns min(members, experts it
computes there) rows. The naive exchange (`per_pair`) sends one row per remote pair with one id and one weight.
`alone_bytes` counts the same plan as if every token were its own call (one message per token and server: decode
at batch 1). With bf16 payloads and no fusion these are exactly `counters.expert_message_bytes`, so this module
and the Counters fed with `exchange_args` agree; the counts Counters has no field for (pairs pruned / substituted,
rows fused, round trips saved, bytes by precision) are in `PlanTraffic`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moecompress.execution.counters import HEADER_BYTES, ID_BYTES, WEIGHT_BYTES
from moecompress.execution.tokens.payload import row_bytes
from moecompress.execution.tokens.plan import DispatchPlan, LayerContext, lossless_plan


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


def plan_traffic(ctx: LayerContext, plan: DispatchPlan) -> PlanTraffic:
    T, k = ctx.topk_ids.shape
    H, N = ctx.hidden_size, ctx.num_servers
    remote = _remote(plan, ctx.home)
    d_row, r_row = row_bytes(plan.dispatch_precision, H), row_bytes(plan.return_precision, H)
    sent = plan.groups >= 0  # [T, N]
    token_rows = int(sent.sum())
    d_bytes = r_bytes = d_rows = r_rows = messages = 0
    for n in range(N):
        members = torch.nonzero(sent[:, n]).squeeze(1)
        if len(members) == 0:
            continue
        messages += 2
        if plan.per_pair:
            rows = int(((plan.servers == n) & remote).sum())
            d_rows, r_rows = d_rows + rows, r_rows + rows
            d_bytes += HEADER_BYTES + rows * (d_row + ID_BYTES + WEIGHT_BYTES)
            r_bytes += rows * r_row
            continue
        reps, inverse = torch.unique(plan.groups[members, n], return_inverse=True)
        size = torch.bincount(inverse, minlength=len(reps))  # members per group
        on_n = plan.servers[members] == n  # [M, k]
        expert_hit = torch.zeros(len(reps), ctx.num_experts + 1, dtype=torch.bool)
        ids = torch.where(on_n, plan.experts[members], torch.full_like(on_n, ctx.num_experts, dtype=torch.long))
        expert_hit[inverse[:, None].expand_as(ids), ids] = True
        union = expert_hit[:, :-1].sum(-1)  # experts each group computes on n
        returned = torch.minimum(size, union)
        d_rows += len(reps)
        r_rows += int(returned.sum())
        d_bytes += HEADER_BYTES + len(reps) * d_row + len(members) * k * (ID_BYTES + WEIGHT_BYTES)
        r_bytes += int(returned.sum()) * r_row
    lossless = _remote(lossless_plan(ctx), ctx.home).any(-1)
    if plan.per_pair:
        n_alone = int(remote.sum())
        alone = n_alone * (HEADER_BYTES + d_row + ID_BYTES + WEIGHT_BYTES + r_row)
    else:
        alone = token_rows * (HEADER_BYTES + d_row + k * (ID_BYTES + WEIGHT_BYTES) + r_row)
    return PlanTraffic(
        tokens=T, pairs=T * k, pruned_pairs=int((plan.servers < 0).sum()),
        substituted_pairs=int(((plan.experts != ctx.topk_ids) & (plan.servers >= 0)).sum()),
        token_rows=token_rows, dispatch_rows=d_rows,
        fused_rows=0 if plan.per_pair else token_rows - d_rows, return_rows=r_rows, messages=messages,
        dispatch_bytes=d_bytes, return_bytes=r_bytes, alone_bytes=alone,
        remote_tokens=int(remote.any(-1).sum()), lossless_remote_tokens=int(lossless.sum()),
        round_trip=int(bool(remote.any())),
        dispatch_precision=plan.dispatch_precision, return_precision=plan.return_precision,
    )


def exchange_args(ctx: LayerContext, plan: DispatchPlan, home: int) -> dict:
    """Keyword arguments of `Counters.add_expert_exchange` for this plan (rows and pairs per server). Exact for
    send-once plans without fusion; int8/fp8 scales and fused replies are beyond its format (see PlanTraffic)."""
    N = ctx.num_servers
    rows = [int((plan.groups[:, n] == torch.arange(ctx.num_tokens)).sum()) if n != home else 0 for n in range(N)]
    live = plan.servers >= 0
    pairs = [int((live & (plan.servers == n)).sum()) for n in range(N)]
    elem = 2 if plan.dispatch_precision == "bf16" else 1
    return dict(layer=ctx.layer, home=home, rows=rows, pairs=pairs, hidden_size=ctx.hidden_size,
                top_k=ctx.topk_ids.shape[1], elem_bytes=elem)
