"""The reference executor: a MoE layer's output under a dispatch plan, computed in one process.

`experts_of_server[n](hidden [R, H], ids [R, 1], weights [R, 1]) -> [R, H]` computes server n's experts on one
(row, expert) pair per row (the experts-module call of transformers' MoE blocks with top-1; PackedExperts and a full
model's experts module both fit): the executor flattens each server's pairs, so no sentinel ids are ever passed and
every pair is computed exactly once. A full model's experts module can serve every server.

Per server n: a token whose home is n computes on its own hidden state; a remote token computes on its group's row
(the mean of the group's members, see fuse.py) as the server receives it (dispatch precision), and the server's
result comes back at the return precision. Results are summed over servers in server order in float32. The numbers
do not depend on `per_pair` (only the traffic does), and a fused group's result is quantized per member.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from moecompress.errors import MoecompressError
from moecompress.execution.tokens.payload import round_trip
from moecompress.execution.tokens.plan import DispatchPlan, LayerContext

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def group_rows(hidden: torch.Tensor, groups_n: torch.Tensor) -> torch.Tensor:
    """[T, H]: for every token sent to a server (groups_n [T] >= 0) its group's row, the mean of the members'
    hidden states (the token's own state when it travels alone); rows of unsent tokens are the tokens' own."""
    T = hidden.shape[0]
    sent = groups_n >= 0
    g = groups_n[sent]
    sums = torch.zeros(T, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, g, hidden[sent].float())
    count = torch.bincount(g, minlength=T).clamp_min(1)
    mean = (sums / count[:, None]).to(hidden.dtype)  # [T, H], row r: mean of group r
    out = hidden.clone()
    out[sent] = mean[g]
    return out


def execute_plan(ctx: LayerContext, plan: DispatchPlan, experts_of_server: Sequence[ExpertsFn],
                 copies: ExpertsFn | None = None) -> torch.Tensor:
    """[T, H] the MoE layer's output under `plan` (routed experts only; the caller adds shared experts); `copies`
    computes the pairs the plan puts on the home's low-bit copies (plan.on_copy), after the servers' sum."""
    N = ctx.num_servers
    if len(experts_of_server) != N:
        raise MoecompressError(f"execute_plan needs one experts callable per server ({N}), got "
                               f"{len(experts_of_server)}")
    hidden = ctx.hidden
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    by_copy = plan.copy_pairs(ctx.home)  # [T, k]
    for n in range(N):
        on_n = (plan.servers == n) & ~by_copy  # [T, k]
        tokens = on_n.any(-1)
        if not bool(tokens.any()):
            continue
        remote = tokens & (ctx.home != n)
        x = hidden
        if bool(remote.any()):
            groups_n = plan.groups[:, n]
            if bool((groups_n[remote] < 0).any()):
                raise MoecompressError(f"plan computes pairs on server {n} for tokens it does not send there")
            rows = group_rows(hidden, torch.where(remote, groups_n, torch.full_like(groups_n, -1)))
            x = torch.where(remote[:, None], round_trip(rows, plan.dispatch_precision), hidden)
        t, j = torch.nonzero(on_n, as_tuple=True)  # the pairs computed on n
        y_pairs = experts_of_server[n](x[t], plan.experts[t, j][:, None], plan.weights[t, j][:, None])  # [P, H]
        y = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device).index_add_(0, t, y_pairs.float())
        y = y.to(hidden.dtype)  # what server n returns (its routing-weighted sum per token)
        if bool(remote.any()):
            y = torch.where(remote[:, None], round_trip(y, plan.return_precision), y)
        out += y.float()
    if bool(by_copy.any()):
        if copies is None:
            raise MoecompressError("the plan computes pairs with the home's low-bit copies but no copies were given")
        t, j = torch.nonzero(by_copy, as_tuple=True)
        y_pairs = copies(hidden[t], plan.experts[t, j][:, None], plan.weights[t, j][:, None])
        out += torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device).index_add_(
            0, t, y_pairs.float()).to(hidden.dtype).float()
    return out.to(hidden.dtype)
