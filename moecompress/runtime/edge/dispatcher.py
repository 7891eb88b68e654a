"""The home's side of the expert model: a drop-in experts module that spreads each MoE layer over the servers.

Per call (hidden [T, H], top_k_index [T, k], top_k_weights [T, k]): routing.route_pairs picks the server of every
(token, expert) pair (replicas honoured), routing.sent_rows the rows each other server needs (once per server).
The requests go out first, the home computes its own pairs meanwhile, then adds each server's reply (the
routing-weighted sum of that server's pairs). Counters get exactly what was sent.
"""
from __future__ import annotations

import torch
from torch import nn

from moecompress.execution.counters import Counters
from moecompress.execution.routing import ExpertTables, route_pairs, sent_rows
from moecompress.runtime.edge import wire
from moecompress.runtime.packed_experts import PackedExperts


class DispatchedExperts(nn.Module):
    def __init__(self, layer: int, local: PackedExperts | None, tables: ExpertTables, home: int, transport,
                 counters: Counters, recorder: list | None = None):
        """local: the home's own experts of this layer (None when it holds none)."""
        super().__init__()
        self.layer, self.local, self.home = layer, local, home
        self.num_experts = tables.num_experts
        self.tables, self.transport, self.counters = tables, transport, counters
        self.recorder = recorder  # when a list: (layer, top_k_index, top_k_weights) of every call is appended

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
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
            self.transport.request(n, wire.request_header(self.layer, rows.numel(), k, dtype, H), payload)
            remote.append((n, rows))
        if self.local is not None:
            out = self.local(hidden_states, torch.where(servers_dev == self.home, top_k_index, sentinel), top_k_weights)
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


def install_dispatchers(model: nn.Module, experts_paths, tables: ExpertTables, home: int, transport,
                        counters: Counters, recorder: list | None = None) -> None:
    """Replace every MoE layer's experts module of the home's model by its dispatcher."""
    for layer, path in enumerate(experts_paths):
        parent, _, child = path.rpartition(".")
        local = model.get_submodule(path)
        local = local if isinstance(local, PackedExperts) else None  # a layer of which the home holds no expert
        setattr(model.get_submodule(parent), child,
                DispatchedExperts(layer, local, tables, home, transport, counters, recorder))
