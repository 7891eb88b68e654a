"""Replay a routing trace through a deployment's execution model: the Counters a real run would produce.

The replay calls the routing policy (routing.route_pairs / sent_rows) and the same Counters methods as the runtime's
dispatcher, with the same arguments, so on the same text it counts exactly the messages, bytes, hops and routed
pairs the runtime counts. Only times and memory are left at zero (the runtime measures those).

Input: the top-k expert ids a trace recorded, [T, L, k] (MoE layers), and how its tokens were grouped into forward
calls (`Call`: B sequences x new tokens each, with the keys each attends to); the trace's tokens are in call order.
A decode step of B sequences is Call(B, 1, kv); a prefill of B prompts of S tokens is Call(B, S, S).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.execution.counters import Counters
from moecompress.execution.routing import ExpertTables, route_pairs, sent_rows


@dataclass(frozen=True)
class Call:
    """One forward call: `sequences` rows of `new_tokens` tokens each, attending to `kv_length` keys each; `home`:
    the server that admitted its sequences (expert model with several homes; None: the placement's home)."""

    sequences: int
    new_tokens: int
    kv_length: int
    home: int | None = None

    def __post_init__(self):
        if self.sequences < 1 or self.new_tokens < 1 or self.kv_length < self.new_tokens:
            raise MoecompressError(f"a forward call needs sequences, new_tokens >= 1 and kv_length >= new_tokens, "
                                   f"got {self}")

    @property
    def tokens(self) -> int:
        return self.sequences * self.new_tokens

    @property
    def mask_elems(self) -> int:  # the 2-D attention mask [B, kv] a pipeline hop carries
        return self.sequences * self.kv_length


def prefill_calls(num_sequences: int, length: int) -> list[Call]:
    return [Call(1, length, length)] * num_sequences


def decode_calls(num_steps: int, batch: int, start: int = 0) -> list[Call]:
    """Decode steps of `batch` sequences; step j attends to start + j + 1 keys."""
    return [Call(batch, 1, start + j + 1) for j in range(num_steps)]


def replay(placement: Placement, experts, calls: list[Call], hidden_size: int, elem_bytes: int,
           moe_decoder_layers=None) -> Counters:
    """Counters of running `calls` on `placement`; experts [T, L, k] in call order.

    moe_decoder_layers [L]: the decoder layer of each MoE layer (pipeline only; default: every layer is MoE).
    """
    experts = torch.as_tensor(np.asarray(experts), dtype=torch.long)
    if experts.ndim != 3 or experts.shape[1] != placement.num_layers:
        raise MoecompressError(f"trace must be [tokens, {placement.num_layers} MoE layers, k], got "
                               f"{tuple(experts.shape)}")
    if sum(c.tokens for c in calls) != experts.shape[0]:
        raise MoecompressError(f"the calls hold {sum(c.tokens for c in calls)} tokens, the trace {experts.shape[0]}")
    if placement.mode == "pipeline":
        moe = list(range(placement.num_layers)) if moe_decoder_layers is None else [int(d) for d in moe_decoder_layers]
        return replay_pipeline(placement.layer_servers, moe, placement.num_servers, experts, calls, hidden_size,
                               elem_bytes)
    return replay_expert(ExpertTables.from_placement(placement), placement.home, experts, calls, hidden_size,
                         elem_bytes)


def replay_expert(tables: ExpertTables, home: int, experts: torch.Tensor, calls: list[Call], hidden_size: int,
                  elem_bytes: int) -> Counters:
    """Expert model: per call and MoE layer, the rows the home sends each server and the pairs each computes."""
    T, L, k = experts.shape
    N = tables.num_servers
    counters = Counters(N, L)
    bounds = np.cumsum([0] + [c.tokens for c in calls])
    call_of = torch.as_tensor(np.repeat(np.arange(len(calls)), np.diff(bounds)))  # [T]
    call_home = [home if c.home is None else int(c.home) for c in calls]
    homes = torch.as_tensor(call_home, dtype=torch.long)[call_of]  # [T] each token's home
    rows, pairs = [], []
    for layer in range(L):
        servers = route_pairs(tables.holds[layer], tables.primary[layer], experts[:, layer], homes)  # [T, k]
        sent = sent_rows(servers, homes, N)  # [T, N]
        per_call_rows = torch.zeros(len(calls), N, dtype=torch.long).index_add_(0, call_of, sent.long())
        per_pair = torch.zeros(T, N, dtype=torch.long).scatter_add_(1, servers, torch.ones_like(servers))
        per_call_pairs = torch.zeros(len(calls), N, dtype=torch.long).index_add_(0, call_of, per_pair)
        rows.append(per_call_rows.tolist())
        pairs.append(per_call_pairs.tolist())
    for i, call in enumerate(calls):  # in the runtime's order: a call, then its layers
        counters.add_call(call.tokens)
        for layer in range(L):
            counters.add_expert_exchange(layer, call_home[i], rows[layer][i], pairs[layer][i], hidden_size, k,
                                         elem_bytes)
    return counters


def replay_pipeline(layer_servers, moe_decoder_layers, num_servers: int, experts: torch.Tensor, calls: list[Call],
                    hidden_size: int, elem_bytes: int) -> Counters:
    """Pipeline model: one hop per stage boundary (header, hidden state, mask, positions) and one back to the home
    (the hidden state only) per call; every MoE layer's pairs on its layer's server."""
    D = len(layer_servers)
    k = experts.shape[2]
    counters = Counters(num_servers, D)
    starts = [d for d in range(1, D) if layer_servers[d] != layer_servers[d - 1]]  # first layer of each later stage
    home = layer_servers[0]
    for call in calls:
        counters.add_call(call.tokens)
        for d in starts:
            counters.add_stage_hop(d, layer_servers[d - 1], layer_servers[d], call.tokens, hidden_size, elem_bytes,
                                   call.mask_elems)
        if starts:
            counters.add_stage_return(D - 1, layer_servers[-1], home, call.tokens, hidden_size, elem_bytes)
        for d in moe_decoder_layers:
            counters.add_stage_pairs(d, layer_servers[d], call.tokens * k)
    return counters
