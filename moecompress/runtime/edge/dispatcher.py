"""The home's side of the expert model: a drop-in experts module that spreads each MoE layer over the servers.

Per call (hidden [T, H], top_k_index [T, k], top_k_weights [T, k]): routing.route_pairs picks the server of every
(token, expert) pair (replicas honoured), routing.sent_rows the rows each other server needs (once per server).
The requests go out first, the home computes its own pairs meanwhile, then adds each server's reply (the
routing-weighted sum of that server's pairs). Counters get exactly what was sent.

With token policies (`TokenSettings`, off by default) each call's layer is planned by the policy pipeline
(execution/tokens: dedup -> protect -> prune -> fuse -> precision) and sent as the plan's server batches
(execution/tokens/exchange.py): pruned pairs are computed nowhere, substituted pairs by the plan's expert, fused
rows once with their multiplicities, payloads at the plan's precision both ways. Native batches without fused rows
go as the lossless OP_EXPERT message, everything else as OP_PLAN.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.execution.counters import HEADER_BYTES, Counters
from moecompress.execution.routing import ExpertTables, route_few, route_pairs, sent_rows
from moecompress.execution.tokens.exchange import (
    batch_messages, pairs_per_server, reply_layout, row_values, server_batches,
)
from moecompress.execution.tokens.plan import LayerContext
from moecompress.execution.tokens.policy import PolicyState, TokenPipeline
from moecompress.execution.tokens.traffic import token_stats
from moecompress.runtime.edge import wire
from moecompress.runtime.experts.packed_experts import PackedExperts

FEW_TOKENS = 16  # at most this many token rows: `_forward_few` (Python lists) instead of the tensor rules


class TokenSettings:
    """The token policies of a deployment and the token layout of the current forward call (sequence and position
    of every token row; set by the deployment before each call)."""

    def __init__(self, pipeline: TokenPipeline, renormalize: bool, state: PolicyState | None = None):
        self.pipeline, self.renormalize, self.state = pipeline, bool(renormalize), state or PolicyState()
        self.sequence: torch.Tensor | None = None
        self.position: torch.Tensor | None = None

    def set_call(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None = None) -> None:
        """Layout of a [B, S] call: sequence = batch row; position = index among the row's real tokens (left
        padding gets negative positions), from the 2-D mask [B, S_kv] whose last S columns are this call's; without
        a mask (generate drops an all-ones one), from the model's position ids [B or 1, S] (a decode step is at its
        cache length, not at 0)."""
        B, S = input_ids.shape
        if attention_mask is None and position_ids is not None:
            pos = position_ids.long().cpu().expand(B, S)
        elif attention_mask is None:
            pos = torch.arange(S).expand(B, S)
        else:
            pos = (attention_mask.long().cpu().cumsum(-1) - 1)[:, -S:]
        self.sequence = torch.arange(B).repeat_interleave(S)
        self.position = pos.reshape(-1)

    def layout(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sequence is None or self.sequence.shape[0] != T:
            return torch.zeros(T, dtype=torch.long), torch.arange(T)
        return self.sequence, self.position


class DispatchedExperts(nn.Module):
    def __init__(self, layer: int, local: PackedExperts | None, tables: ExpertTables, home: int, transport,
                 counters: Counters, recorder: list | None = None, tokens: TokenSettings | None = None,
                 router_weight: torch.Tensor | None = None):
        """local: the home's own experts of this layer (None when it holds none); router_weight [E, H]: the MoE
        block's linear router, for policies that read the router's logits."""
        super().__init__()
        self.layer, self.local, self.home = layer, local, home
        self.num_experts = tables.num_experts
        self.tables, self.transport, self.counters = tables, transport, counters
        self.recorder = recorder  # when a list: (layer, top_k_index, top_k_weights) of every call is appended
        self.tokens, self.router_weight = tokens, router_weight
        self.lock = nullcontext()  # several homes: a Lock shared with the home's expert server (homes.home_server)
        self.copies: PackedExperts | None = None  # the home's low-bit copies of remote experts (edge/tokens.py)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.tokens is not None:
            return self._forward_plan(hidden_states, top_k_index, top_k_weights)
        if top_k_index.shape[0] <= FEW_TOKENS and hidden_states.device.type == "cpu":
            return self._forward_few(hidden_states, top_k_index, top_k_weights)
        T, k = top_k_index.shape
        H, dtype, N = hidden_states.shape[-1], hidden_states.dtype, self.tables.num_servers
        homes = torch.full((T,), self.home, dtype=torch.long)
        ids = top_k_index.long().cpu()
        servers = route_pairs(self.tables.holds[self.layer], self.tables.primary[self.layer], ids, homes)  # [T, k]
        sent = sent_rows(servers, homes, N)  # [T, N]
        sentinel = torch.full_like(top_k_index, self.num_experts)
        servers_dev = servers.to(top_k_index.device)
        remote = []
        for n in range(N):
            rows = sent[:, n].nonzero().squeeze(1).to(hidden_states.device)  # [R]
            if n == self.home or rows.numel() == 0:
                continue
            mine = torch.where(servers_dev[rows] == n, top_k_index[rows], sentinel[rows])
            payload = wire.encode_request(hidden_states[rows], mine, top_k_weights[rows])
            self.transport.expect(n, rows.numel() * H * dtype.itemsize)
            self.transport.request(n, wire.request_header(self.layer, rows.numel(), k, dtype, H), payload)
            remote.append((n, rows))
        if self.local is not None:
            with self.lock:
                out = self.local(hidden_states, torch.where(servers_dev == self.home, top_k_index, sentinel),
                                 top_k_weights)
        else:
            out = torch.zeros_like(hidden_states)
        for n, rows in remote:
            reply = self.transport.reply(n, rows.numel() * H * dtype.itemsize)
            out = out.index_add(0, rows, wire.decode_rows(reply, rows.numel(), H, dtype).to(out.device))
        self.counters.add_expert_exchange(self.layer, self.home, sent.sum(0).tolist(),
                                          torch.bincount(servers.reshape(-1), minlength=N).tolist(), H, k,
                                          dtype.itemsize)
        if self.recorder is not None:
            self.recorder.append((self.layer, ids.clone(), top_k_weights.detach().float().cpu().clone()))
        return out

    def _forward_few(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """`forward` of a few tokens on the CPU (a decode step): the same routing (routing.route_few), messages,
        sums and counts, built from Python lists instead of a dozen tensor ops per rule."""
        T, k = top_k_index.shape
        H, dtype, N, E, home = hidden_states.shape[-1], hidden_states.dtype, self.tables.num_servers, \
            self.num_experts, self.home
        ids = top_k_index.tolist()
        servers = route_few(self.tables.holders[self.layer], self.tables.primaries[self.layer], ids, home)
        weights32 = top_k_weights.to(torch.float32)
        remote, rows_sent, pairs = [], [0] * N, [0] * N
        for row in servers:
            for n in row:
                pairs[n] += 1
        for n in range(N):
            if n == home or not pairs[n]:
                continue
            rows = [t for t in range(T) if n in servers[t]]
            mine = torch.tensor([[e if s == n else E for e, s in zip(ids[t], servers[t])] for t in rows],
                                dtype=torch.int32)  # [R, k] this server's pairs, others = E
            whole = len(rows) == T  # every token goes there: no gather, no scatter
            index = None if whole else torch.tensor(rows)
            x = hidden_states if whole else hidden_states.index_select(0, index)
            w = weights32 if whole else weights32.index_select(0, index)
            payload = torch.cat([wire.as_bytes(x), wire.as_bytes(mine), wire.as_bytes(w)])
            self.transport.expect(n, len(rows) * H * dtype.itemsize)
            self.transport.request(n, wire.request_header(self.layer, len(rows), k, dtype, H), payload)
            remote.append((n, index, len(rows)))
            rows_sent[n] = len(rows)
        if self.local is not None:
            local_ids = torch.tensor([[e if s == home else E for e, s in zip(i, row)] for i, row in zip(ids, servers)],
                                     dtype=top_k_index.dtype)
            with self.lock:
                out = self.local(hidden_states, local_ids, top_k_weights)
        else:
            out = torch.zeros_like(hidden_states)
        for n, index, R in remote:
            y = wire.decode_rows(self.transport.reply(n, R * H * dtype.itemsize), R, H, dtype)
            out = out + y if index is None else out.index_add(0, index, y)
        self.counters.add_expert_exchange(self.layer, home, rows_sent, pairs, H, k, dtype.itemsize)
        if self.recorder is not None:
            self.recorder.append((self.layer, top_k_index.long().clone(), top_k_weights.detach().float().clone()))
        return out

    def _forward_plan(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """The layer under the token policies' plan (see the module doc)."""
        T, k = top_k_index.shape
        H, dtype, N, E = hidden_states.shape[-1], hidden_states.dtype, self.tables.num_servers, self.num_experts
        settings = self.tokens
        sequence, position = settings.layout(T)
        ctx = LayerContext(hidden=hidden_states.cpu(), topk_ids=top_k_index.long().cpu(),
                           topk_weights=top_k_weights.cpu(), holds=self.tables.holds[self.layer],
                           primary=self.tables.primary[self.layer], home=torch.full((T,), self.home, dtype=torch.long),
                           layer=self.layer, sequence=sequence, position=position, renormalize=settings.renormalize,
                           router_logits=None if self.router_weight is None else
                           torch.nn.functional.linear(hidden_states, self.router_weight).float().cpu())
        plan = settings.pipeline.plan(ctx, settings.state)
        batches = server_batches(ctx, plan)
        messages = batch_messages(ctx, plan, batches, dtype.itemsize)
        device = hidden_states.device
        sent = []
        native = plan.dispatch_precision == plan.return_precision == "native"
        for b, (n, request_bytes, reply_bytes, outputs) in zip(batches, messages):
            rows = row_values(hidden_states, b)
            if native and not b.fused:  # the lossless message, byte for byte
                head = wire.request_header(self.layer, b.num_members, b.ids.shape[1], dtype, H)
                payload = wire.encode_request(rows, b.ids, b.weights)
            else:
                head = wire.plan_header(self.layer, b.num_rows, b.num_members, b.ids.shape[1], dtype, H,
                                        plan.dispatch_precision, plan.return_precision)
                payload = wire.encode_plan_request(rows, b.sizes, b.fused, b.ids, b.weights, plan.dispatch_precision)
            if HEADER_BYTES + payload.numel() != request_bytes:
                raise MoecompressError(f"layer {self.layer}: a request to server {n} has {payload.numel()} payload "
                                       f"bytes, the counted format {request_bytes - HEADER_BYTES}")
            self.transport.expect(n, reply_bytes)
            self.transport.request(n, head, payload)
            sent.append((b, outputs))
        by_copy = plan.copy_pairs(ctx.home).to(device)  # pairs computed with the home's low-bit copies
        on_home = (plan.servers.to(device) == self.home) & ~by_copy
        if self.local is not None:
            ids = torch.where(on_home, plan.experts.to(device), torch.full_like(top_k_index, E))
            with self.lock:
                out = self.local(hidden_states, ids, plan.weights.to(device=device, dtype=top_k_weights.dtype))
        else:
            out = torch.zeros_like(hidden_states)
        for b, outputs in sent:
            out = self._add_reply(out, b, outputs, plan.dispatch_precision, plan.return_precision, H, dtype)
        if bool(by_copy.any()):
            if self.copies is None:
                raise MoecompressError(f"layer {self.layer}: the plan computes pairs with home copies; none attached")
            ids = torch.where(by_copy, plan.experts.to(device), torch.full_like(top_k_index, E))
            out = out + self.copies(hidden_states, ids, plan.weights.to(device=device, dtype=top_k_weights.dtype))
        self.counters.add_exchange(self.layer, self.home, [m[:3] for m in messages], pairs_per_server(plan, N),
                                   plan.dispatch_precision, plan.return_precision)
        self.counters.add_token_stats(self.layer, token_stats(ctx, plan, batches))
        if self.recorder is not None:
            self.recorder.append((self.layer, top_k_index.long().cpu().clone(),
                                  top_k_weights.detach().float().cpu().clone()))
        return out

    def _add_reply(self, out, b, outputs: int, dispatch: str, ret: str, H: int, dtype):
        from moecompress.execution.tokens.payload import row_bytes

        n = b.server
        reply = self.transport.reply(n, outputs * row_bytes(ret, H, dtype.itemsize))
        y = wire.decode_values(reply, outputs, H, ret, dtype).to(out.device)
        if dispatch == ret == "native" and not b.fused:
            return out.index_add(0, b.tokens.to(out.device), y)  # the lossless format: one weighted sum per member
        layout = reply_layout(b.rows, b.sizes, b.ids, self.num_experts)
        m = int(layout.per_member.sum())
        out = out.index_add(0, b.tokens[layout.per_member].to(out.device), y[:m])
        if m == outputs:
            return out
        slot = torch.full((b.num_rows, self.num_experts + 1), -1, dtype=torch.long)
        slot[layout.expert_rows, layout.expert_ids] = torch.arange(outputs - m)
        members = ~layout.per_member
        idx = slot[b.rows[members][:, None], b.ids[members]]  # [Mx, k'] output of each pair, -1: not on n
        y_e = torch.cat([y[m:].float(), torch.zeros(1, H, device=y.device)])  # last: a zero row for idx -1
        w = torch.where(idx >= 0, b.weights[members].float(), torch.zeros_like(b.weights[members], dtype=torch.float))
        contrib = (w.to(y.device)[:, :, None] * y_e[idx.to(y.device)]).sum(1)  # [Mx, H] float32
        return out.index_add(0, b.tokens[members].to(out.device), contrib.to(out.dtype))


def install_dispatchers(model: nn.Module, experts_paths, tables: ExpertTables, home: int, transport,
                        counters: Counters, recorder: list | None = None,
                        tokens: TokenSettings | None = None) -> None:
    """Replace every MoE layer's experts module of the home's model by its dispatcher."""
    for layer, path in enumerate(experts_paths):
        parent, _, child = path.rpartition(".")
        local = model.get_submodule(path)
        local = local if isinstance(local, PackedExperts) else None  # a layer of which the home holds no expert
        block = model.get_submodule(parent)
        setattr(block, child, DispatchedExperts(layer, local, tables, home, transport, counters, recorder, tokens,
                                                _router_weight(block, tables.num_experts)))


def _router_weight(block: nn.Module, num_experts: int) -> torch.Tensor | None:
    """[E, H] weight of the MoE block's linear router (`gate` or `router`), None when it has none."""
    for name in ("gate", "router"):
        w = getattr(getattr(block, name, None), "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[0] == num_experts and w.device.type != "meta":
            return w.detach()
    return None
