"""Run server bundles together in one process: the reference semantics of expert-parallel execution.

Each MoE layer's output is the sum, over servers, of the experts that server computes for each token; a token's
pair (token, expert) is computed by exactly one server (the expert's primary copy here), so with complementary
bundles the result equals the full model. The distributed runtime does the same sum across processes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moecompress.format.files import verify_bundles
from moecompress.runtime.load import from_pretrained
from moecompress.runtime.packed_experts import PackedExperts


class SummedExperts(nn.Module):
    """Experts of one MoE layer spread over servers; `owner[e]` is the server computing expert e."""

    def __init__(self, parts: list[PackedExperts], owner: list[int]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.num_experts = parts[0].num_experts
        self.register_buffer("owner", torch.tensor(owner, dtype=torch.long), persistent=False)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = None
        for server, part in enumerate(self.parts):
            mine = self.owner[top_k_index] == server
            idx = torch.where(mine, top_k_index, torch.full_like(top_k_index, self.num_experts))  # sentinel = skip
            y = part(hidden_states, idx, top_k_weights)
            out = y if out is None else out + y
        return out


def load_bundles(out: str | Path, **kwargs) -> nn.Module:
    """All bundles of a `moecompress shard` output as one model (server 0's, or the dense holder's, other weights)."""
    out = Path(out)
    doc = verify_bundles(out)
    servers = sorted(int(s) for s in doc["files"])
    models = [from_pretrained(out / f"server-{s}", **kwargs) for s in servers]
    base = models[doc["dense_servers"][0]]
    for layer, path in enumerate(doc["experts_paths"]):
        owner = [copies[0] for copies in doc["assignment"][layer]]
        parts = [m.get_submodule(path) for m in models]
        parent, _, child = path.rpartition(".")
        setattr(base.get_submodule(parent), child, SummedExperts(parts, owner))
    return base
