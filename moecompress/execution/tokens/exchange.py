"""What one MoE layer's dispatch plan sends to each server and how the replies come back (pure functions).

The edge runtime's dispatcher encodes exactly these batches (`runtime/edge/wire.py`) and the traffic count
(`traffic.py`) charges exactly their sizes, so a plan's counted bytes are the bytes the runtime sends.

A server batch: the members M that server n computes for (token rows; for the naive exchange one member per remote
(token, expert) pair), carried by R rows (a fused row carries several members and is the mean of their hidden
states), each member with its k' expert ids on n (the other slots hold the sentinel `num_experts`) and weights.

Request (`request_bytes`): header + R rows at the dispatch precision (+ a float16 scale per row for int8 / fp8)
+ R int32 multiplicities when some row carries more than one member + M x k' (int32 id, float32 weight). A native
request without fused rows is the lossless runtime's OP_EXPERT message, byte for byte.
Reply (`reply_layout`, `reply_bytes`): one row per output at the return precision (+ scale). A row of m members
whose pairs on n use u distinct experts returns, when u < m, the u experts' unweighted outputs (the home weights
them for each member); otherwise one routing-weighted sum per member. Outputs: the members answered per member in
member order, then the (row, expert) outputs in row, expert order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moecompress.execution.counters import HEADER_BYTES, ID_BYTES, WEIGHT_BYTES
from moecompress.execution.tokens.payload import row_bytes
from moecompress.execution.tokens.plan import DispatchPlan, LayerContext

MULTIPLICITY_BYTES = 4  # int32 members per row, sent only when a row carries several


@dataclass(frozen=True, eq=False)
class ServerBatch:
    """What the home sends one server at one MoE layer."""

    server: int
    tokens: torch.Tensor  # [M] long: the token of each member
    rows: torch.Tensor  # [M] long: row (0..R-1) carrying each member; members sorted by row
    sizes: torch.Tensor  # [R] long: members per row
    ids: torch.Tensor  # [M, k'] long: expert ids computed on this server (sentinel num_experts elsewhere)
    weights: torch.Tensor  # [M, k'] weights of those pairs

    @property
    def num_rows(self) -> int:
        return self.sizes.shape[0]

    @property
    def num_members(self) -> int:
        return self.tokens.shape[0]

    @property
    def fused(self) -> bool:
        return self.num_rows < self.num_members


def server_batches(ctx: LayerContext, plan: DispatchPlan) -> list[ServerBatch]:
    """The batch of every server that gets rows, in server order (never a token's own home)."""
    E, out = ctx.num_experts, []
    remote = (plan.servers >= 0) & (plan.servers != ctx.home[:, None])  # [T, k]
    for n in range(ctx.num_servers):
        if plan.per_pair:
            t, j = torch.nonzero(remote & (plan.servers == n), as_tuple=True)  # one member per remote pair
            if len(t) == 0:
                continue
            out.append(ServerBatch(n, t, torch.arange(len(t)), torch.ones(len(t), dtype=torch.long),
                                   plan.experts[t, j][:, None], plan.weights[t, j][:, None]))
            continue
        members = torch.nonzero(plan.groups[:, n] >= 0).squeeze(1)  # [M] ascending
        if len(members) == 0:
            continue
        reps = plan.groups[members, n]
        order = torch.argsort(reps, stable=True)
        members, reps = members[order], reps[order]
        _, rows, sizes = torch.unique_consecutive(reps, return_inverse=True, return_counts=True)
        on_n = plan.servers[members] == n
        ids = torch.where(on_n, plan.experts[members], torch.full_like(on_n, E, dtype=torch.long))
        out.append(ServerBatch(n, members, rows, sizes, ids, plan.weights[members]))
    return out


def row_values(hidden: torch.Tensor, batch: ServerBatch) -> torch.Tensor:
    """[R, H] the rows sent: a member's hidden state, or the mean of a fused row's members (float32 sum)."""
    if not batch.fused:
        return hidden[batch.tokens]
    sums = torch.zeros(batch.num_rows, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, batch.rows.to(hidden.device), hidden[batch.tokens].float())
    return (sums / batch.sizes.to(hidden.device)[:, None]).to(hidden.dtype)


@dataclass(frozen=True, eq=False)
class ReplyLayout:
    per_member: torch.Tensor  # [M] bool: the member's output is its own routing-weighted sum
    expert_rows: torch.Tensor  # [Q2] long: row of each unweighted expert output
    expert_ids: torch.Tensor  # [Q2] long: its expert

    @property
    def num_outputs(self) -> int:
        return int(self.per_member.sum()) + self.expert_rows.shape[0]


def reply_layout(rows: torch.Tensor, sizes: torch.Tensor, ids: torch.Tensor, num_experts: int) -> ReplyLayout:
    """The outputs a server returns for a batch (see the module doc); the server and the home both call it."""
    R = sizes.shape[0]
    hit = torch.zeros(R, num_experts + 1, dtype=torch.bool)
    hit[rows[:, None].expand_as(ids).cpu(), ids.cpu()] = True
    hit = hit[:, :num_experts]
    by_expert = hit.sum(-1) < sizes.cpu()  # [R]
    g, e = torch.nonzero(hit & by_expert[:, None], as_tuple=True)
    return ReplyLayout(per_member=~by_expert[rows.cpu()], expert_rows=g, expert_ids=e)


def request_bytes(batch: ServerBatch, precision: str, hidden_size: int, elem_bytes: int) -> int:
    k = batch.ids.shape[1]
    multiplicities = MULTIPLICITY_BYTES * batch.num_rows if batch.fused else 0
    return (HEADER_BYTES + batch.num_rows * row_bytes(precision, hidden_size, elem_bytes) + multiplicities
            + batch.num_members * k * (ID_BYTES + WEIGHT_BYTES))


def reply_bytes(outputs: int, precision: str, hidden_size: int, elem_bytes: int) -> int:
    return outputs * row_bytes(precision, hidden_size, elem_bytes)


def batch_messages(ctx: LayerContext, plan: DispatchPlan, batches: list[ServerBatch],
                   elem_bytes: int) -> list[tuple[int, int, int, int]]:
    """[(server, request bytes, reply bytes, reply outputs)] of the batches."""
    H, out = ctx.hidden_size, []
    for b in batches:
        q = reply_layout(b.rows, b.sizes, b.ids, ctx.num_experts).num_outputs
        out.append((b.server, request_bytes(b, plan.dispatch_precision, H, elem_bytes),
                    reply_bytes(q, plan.return_precision, H, elem_bytes), q))
    return out


def pairs_per_server(plan: DispatchPlan, num_servers: int) -> list[int]:
    """Live (computed) pairs per server."""
    live = plan.servers[plan.servers >= 0]
    return torch.bincount(live.reshape(-1), minlength=num_servers).tolist()
