"""The routing policy of each execution model: which server computes each (token, expert) pair, and what is sent.

Imported by the placement stage (objective, replay) and by the runtime (dispatcher), so the two cannot disagree.

Execution models (`Mode`):
- expert: a request is admitted at its home server, which holds the dense weights and the sequence's KV cache. At
  each MoE layer the pair (token, expert) is computed by a copy on the token's home if there is one; else by a copy
  on a server the token visits anyway (a server that is the only holder of another of its chosen experts; lowest id
  first); else by the expert's primary. The home sends each token's hidden state once to every other server that
  computes at least one of its pairs (`sent_rows`); each such server returns the routing-weighted sum of its pairs.
- pipeline: each server holds a contiguous range of decoder layers (their dense weights, experts and KV cache); the
  hidden state goes stage to stage; every pair is computed by the server of its layer (no routing choice).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property

import torch

from moecompress.errors import MoecompressError


class Mode(str, Enum):
    EXPERT = "expert"
    PIPELINE = "pipeline"


@dataclass(frozen=True, eq=False)
class ExpertTables:
    """The placement as tensors, for routing many tokens at once."""

    holds: torch.Tensor  # [L, E, N] bool: server n holds a copy of expert e of MoE layer l
    primary: torch.Tensor  # [L, E] long: the first copy's server

    def __post_init__(self):
        if self.holds.ndim != 3 or self.primary.shape != self.holds.shape[:2]:
            raise MoecompressError(
                f"expert tables need holds [L, E, N] and primary [L, E], got {tuple(self.holds.shape)} and "
                f"{tuple(self.primary.shape)}"
            )

    @property
    def num_layers(self) -> int:
        return self.holds.shape[0]

    @property
    def num_experts(self) -> int:
        return self.holds.shape[1]

    @property
    def num_servers(self) -> int:
        return self.holds.shape[2]

    @classmethod
    def from_assignment(cls, assignment, num_servers: int) -> "ExpertTables":
        """From a [layer][expert] -> servers grid (primary first), as in Placement.assignment or bundle.json."""
        L = len(assignment)
        E = len(assignment[0]) if L else 0
        holds = torch.zeros(L, E, num_servers, dtype=torch.bool)
        primary = torch.zeros(L, E, dtype=torch.long)
        for layer, experts in enumerate(assignment):
            for expert, servers in enumerate(experts):
                holds[layer, expert, list(servers)] = True
                primary[layer, expert] = int(servers[0])
        return cls(holds=holds, primary=primary)

    @classmethod
    def from_placement(cls, placement) -> "ExpertTables":
        return cls.from_assignment(placement.assignment, placement.num_servers)

    @cached_property
    def holders(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """[L][E] the servers holding each expert, ascending (for `route_few`)."""
        return tuple(tuple(tuple(row.nonzero().squeeze(1).tolist()) for row in layer) for layer in self.holds)

    @cached_property
    def primaries(self) -> tuple[tuple[int, ...], ...]:
        """[L][E] each expert's primary server, as Python ints (for `route_few`)."""
        return tuple(tuple(row) for row in self.primary.tolist())


def route_pairs(
    holds_l: torch.Tensor, primary_l: torch.Tensor, topk_ids: torch.Tensor, home: torch.Tensor
) -> torch.Tensor:
    """[T, k] long: the server computing each (token, expert) pair of one MoE layer in the expert model.

    holds_l [E, N] bool, primary_l [E] long, topk_ids [T, k] long, home [T] long (each token's home server).
    """
    topk_ids = topk_ids.long()
    home = home.long().to(topk_ids.device)
    holds_l, primary_l = holds_l.to(topk_ids.device), primary_l.to(topk_ids.device)
    T, k = topk_ids.shape
    N = holds_l.shape[1]
    has = holds_l[topk_ids]  # [T, k, N]
    prim = primary_l[topk_ids]  # [T, k]
    single = has.sum(-1) == 1  # [T, k] pairs with one copy: their server is visited anyway
    forced = torch.zeros(T, N, dtype=torch.long, device=topk_ids.device).scatter_add_(1, prim, single.long()) > 0
    visited = has & forced[:, None, :]  # [T, k, N] copies on servers visited anyway
    anywhere = visited.any(-1)
    chosen = torch.where(anywhere, visited.to(torch.int8).argmax(-1), prim)  # argmax: first (lowest) id
    on_home = has.gather(2, home[:, None, None].expand(T, k, 1)).squeeze(-1)  # [T, k]
    return torch.where(on_home, home[:, None].expand(T, k), chosen)


def sent_rows(servers: torch.Tensor, home: torch.Tensor, num_servers: int) -> torch.Tensor:
    """[T, N] bool: token t's hidden state is sent to server n (n != home[t], n computes one of its pairs)."""
    T = servers.shape[0]
    hits = torch.zeros(T, num_servers, dtype=torch.long, device=servers.device)
    hits.scatter_add_(1, servers.long(), torch.ones_like(servers, dtype=torch.long))
    sent = hits > 0
    sent[torch.arange(T, device=servers.device), home.long().to(servers.device)] = False
    return sent


def route_few(holders_l, primaries_l, topk_ids: list[list[int]], home: int) -> list[list[int]]:
    """route_pairs of a few tokens of one home, on Python lists (a decode step: no tensor op per rule).

    holders_l [E] servers holding each expert (ascending), primaries_l [E], topk_ids [T][k]; -> [T][k] the server of
    each pair, exactly route_pairs' (tests/test_edge_dispatch.py compares the two)."""
    out = []
    for ids in topk_ids:
        forced = {primaries_l[e] for e in ids if len(holders_l[e]) == 1}  # servers visited anyway
        row = []
        for e in ids:
            held = holders_l[e]
            if home in held:
                row.append(home)
                continue
            visited = [n for n in held if n in forced]
            row.append(visited[0] if visited else primaries_l[e])
        out.append(row)
    return out
