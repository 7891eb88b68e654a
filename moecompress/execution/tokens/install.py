"""Run a whole model's MoE layers through token policies and the reference executor, in a `with` block.

    with token_policies(model, experts_paths, holds, primary, pipeline, renormalize=True) as run:
        logits = model(input_ids).logits
    run.traffic  # [PlanTraffic] of every MoE layer of every forward call

Each experts module at `experts_paths[l]` (MoE layer l) is swapped for a `PolicyExperts` that plans the layer with
the pipeline and computes it with `execute_plan`; the original modules are put back on exit (also on error).
A forward pre-hook on the model (removed on exit) reads each call's token layout: sequence = batch row, position =
`position_ids` / `cache_position` when given, else 0..S-1; `run.set_tokens` overrides it for calls without ids.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from moecompress.execution.tokens.executor import execute_plan
from moecompress.execution.tokens.plan import LayerContext
from moecompress.execution.tokens.policy import PolicyState, TokenPipeline
from moecompress.execution.tokens.traffic import PlanTraffic, plan_traffic


class TokenRun:
    """The state of one `token_policies` block: placement tables, policies, token bookkeeping, traffic records."""

    def __init__(self, holds: torch.Tensor, primary: torch.Tensor, pipeline: TokenPipeline, home: int,
                 renormalize: bool, state: PolicyState | None):
        self.holds, self.primary = holds, primary  # [L, E, N], [L, E]
        self.pipeline, self.home, self.renormalize = pipeline, int(home), bool(renormalize)
        self.state = state or PolicyState()
        self.sequence: torch.Tensor | None = None
        self.position: torch.Tensor | None = None
        self.traffic: list[PlanTraffic] = []
        self.copies = None  # [L] experts callables of the home's low-bit copies (token_policies(copies=...))

    def set_tokens(self, sequence: torch.Tensor, position: torch.Tensor) -> None:
        """The sequence id and position of each token row of the next forward calls."""
        self.sequence, self.position = sequence.long(), position.long()

    def set_batch(self, batch_size: int, seq_len: int, start: int = 0) -> None:
        """Token rows of a [batch_size, seq_len] call (positions start..start+seq_len-1)."""
        self.set_tokens(torch.arange(batch_size).repeat_interleave(seq_len),
                        torch.arange(start, start + seq_len).repeat(batch_size))

    def context(self, layer: int, hidden, topk_ids, topk_weights) -> LayerContext:
        T = hidden.shape[0]
        sequence, position = self.sequence, self.position
        if sequence is None or sequence.shape[0] != T:
            sequence, position = torch.zeros(T, dtype=torch.long), torch.arange(T)
        return LayerContext(hidden=hidden, topk_ids=topk_ids.long(), topk_weights=topk_weights,
                            holds=self.holds[layer], primary=self.primary[layer],
                            home=torch.full((T,), self.home, dtype=torch.long), layer=layer,
                            sequence=sequence, position=position, renormalize=self.renormalize)


class PolicyExperts(nn.Module):
    """An experts module computed through a token pipeline (the wrapped module computes every server's experts)."""

    def __init__(self, inner: nn.Module, layer: int, run: TokenRun):
        super().__init__()
        self.inner, self.layer = inner, layer
        self.num_experts = getattr(inner, "num_experts", None)
        self._run = run

    def forward(self, hidden_states, top_k_index, top_k_weights):
        run = self._run
        ctx = run.context(self.layer, hidden_states, top_k_index, top_k_weights)
        plan = run.pipeline.plan(ctx, run.state)
        run.traffic.append(plan_traffic(ctx, plan))
        copies = None if run.copies is None else run.copies[self.layer]
        return execute_plan(ctx, plan, [self.inner] * ctx.num_servers, copies)


@contextmanager
def token_policies(model: nn.Module, experts_paths: Sequence[str], holds: torch.Tensor, primary: torch.Tensor,
                   pipeline: TokenPipeline, *, renormalize: bool, home: int = 0, state: PolicyState | None = None,
                   copies: Sequence | None = None):
    """Swap every experts module for a PolicyExperts for the duration of the block; yields the TokenRun. copies:
    per MoE layer the experts callable of the home's low-bit copies (those `state.copies` marks)."""
    run = TokenRun(holds, primary, pipeline, home, renormalize, state)
    run.copies = copies
    swapped = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: _read_layout(run, args, kwargs),
                                           with_kwargs=True)
    try:
        for layer, path in enumerate(experts_paths):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            original = getattr(parent, child)
            setattr(parent, child, PolicyExperts(original, layer, run))
            swapped.append((parent, child, original))
        yield run
    finally:
        hook.remove()
        for parent, child, original in reversed(swapped):
            setattr(parent, child, original)


def _read_layout(run: TokenRun, args, kwargs) -> None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        return None
    B, S = ids.shape
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = kwargs.get("cache_position")
    pos = torch.arange(S) if pos is None else pos.cpu().long()
    run.set_tokens(torch.arange(B).repeat_interleave(S), pos.expand(B, S).reshape(-1) if pos.ndim < 2 or
                   pos.shape[0] == 1 else pos.reshape(-1))
    return None
