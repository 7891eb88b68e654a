"""What a non-home rank answers: the request handler its bundle needs (expert model: an expert server that also
answers token-policy requests; pipeline model: a stage, or an idle rank). Used by the serve loop (serve.py) and by the
simulation (deployment.py), which runs every server's handler in the home's process.
"""
from __future__ import annotations

import torch

from moecompress.runtime.edge import wire


class PlanServer:
    """An expert server that also answers token-policy requests (OP_PLAN: rows at a payload precision, fused rows
    with their multiplicities; execution/tokens/exchange.py); everything else goes to the wrapped ExpertServer."""

    def __init__(self, inner, num_experts: int):
        self.inner, self.num_experts = inner, num_experts

    def handle(self, head: list[int], payload: torch.Tensor):
        if head[0] != wire.OP_PLAN:
            return self.inner.handle(head, payload)
        from moecompress.execution.tokens.exchange import reply_layout

        layer, dtype = head[1], wire.dtype_of(head[4])
        rows, sizes, ids, weights, ret = wire.decode_plan_request(payload, head)
        member_rows = torch.repeat_interleave(torch.arange(len(sizes)), sizes)  # [M] row of each member
        layout = reply_layout(member_rows, sizes, ids, self.num_experts)
        k = ids.shape[1]
        one_hot_ids = torch.full((len(layout.expert_ids), k), self.num_experts, dtype=torch.long)
        one_hot_ids[:, 0] = layout.expert_ids
        one_hot_w = torch.zeros(len(layout.expert_ids), k, dtype=weights.dtype)
        one_hot_w[:, 0] = 1.0
        x = torch.cat([rows[member_rows[layout.per_member]], rows[layout.expert_rows]])
        out = self.inner.compute(layer, x, torch.cat([ids[layout.per_member], one_hot_ids]),
                                 torch.cat([weights[layout.per_member], one_hot_w]))
        return [(self.inner.home, None, wire.encode_values(out.to(dtype), ret))]

    def control(self, op: int) -> None:
        self.inner.control(op)

    def stats(self) -> list[float]:
        return self.inner.stats()


def build_handler(info, dtype: torch.dtype, expert_budget: int | None = None):
    from moecompress.execution.routing import Mode
    from moecompress.runtime.edge.rank_model import ExpertServer, load_experts

    if info.mode == Mode.EXPERT:
        num_experts = len(info.assignment[0]) if info.assignment else 0
        experts = load_experts(info, dtype)
        if expert_budget is not None:  # at most that many bytes of experts resident (runtime/store/)
            from moecompress.runtime.store.rank import attach_server_store

            attach_server_store(info.directory, experts, info.experts_paths, expert_budget)
        return PlanServer(ExpertServer(info.server, info.home, experts), num_experts)
    from moecompress.runtime.edge.pipeline import IdleServer, StageServer

    return StageServer.load(info, dtype) if info.server in info.stages else IdleServer()
