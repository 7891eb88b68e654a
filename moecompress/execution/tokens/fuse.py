"""Token fusion: tokens bound for the same server with nearly identical hidden states travel as one row.

Bipartite soft matching as in ToMe (Bolya et al., 2023), once per server and layer: the tokens a server receives
(in token order, protected tokens left out) are split alternately into sets A and B; every token of A finds its most
similar token of B by cosine of the hidden states and joins B's group when the cosine is above `threshold`. The
group's row is the mean of its members' hidden states (ToMe's merge); the server computes the union of the members'
experts on it and each member gets the result with its own routing weights (see plan.py for the return format).
`across=False` restricts merges to tokens of the same sequence; by default tokens of different sequences of a
batch merge too. A threshold above 1 merges nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from moecompress.execution.tokens.plan import DispatchPlan, LayerContext


def match_groups(hidden: torch.Tensor, candidates: torch.Tensor, sequence: torch.Tensor, threshold: float,
                 across: bool) -> torch.Tensor:
    """[T] long: representative (a token of B) of each candidate token of A that merges, else the token itself.

    hidden [T, H], candidates [T] bool (tokens that may merge), sequence [T] long."""
    T = hidden.shape[0]
    rep = torch.arange(T, device=hidden.device)
    idx = torch.nonzero(candidates).squeeze(1)
    a, b = idx[0::2], idx[1::2]
    if len(a) == 0 or len(b) == 0:
        return rep
    x = torch.nn.functional.normalize(hidden.float(), dim=-1)
    cos = x[a] @ x[b].T  # [A, B]
    if not across:
        cos = cos.masked_fill(sequence[a][:, None] != sequence[b][None, :], float("-inf"))
    best, j = cos.max(-1)  # [A]
    merge = best > threshold
    rep[a[merge]] = b[j[merge]]
    return rep


@dataclass(frozen=True)
class Fuse:
    """Merge tokens bound for the same server whose hidden states have cosine above `threshold`."""

    name: ClassVar[str] = "fuse"
    stage: ClassVar[str] = "fuse"
    threshold: float = 2.0
    across: bool = True

    def __call__(self, ctx: LayerContext, plan: DispatchPlan, state) -> DispatchPlan:
        groups = plan.groups.clone()
        T = ctx.num_tokens
        own = torch.arange(T, device=groups.device)
        for n in range(ctx.num_servers):
            candidates = (plan.groups[:, n] == own) & ~plan.protected
            if int(candidates.sum()) < 2:
                continue
            rep = match_groups(ctx.hidden, candidates, ctx.sequence, self.threshold, self.across)
            groups[:, n] = torch.where(candidates, rep, plan.groups[:, n])
        return replace(plan, groups=groups, notes=plan.notes + (self.name,))
