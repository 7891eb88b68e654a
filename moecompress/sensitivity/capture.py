"""Capture what every experts module receives (hidden states, top-k indices, top-k weights) on held-out batches,
and, for the loss-aware method, the gradient of the loss with respect to its output.

Hooks live inside `with BlockCapture(model, layout, grads) as cap:`; nothing stays on the model afterwards.
- a forward pre-hook on each experts module records its inputs (positional or by the names transformers uses);
- with `grads`, a forward hook adds a zero leaf z [T, H] (requires_grad) to the experts output, so that
  d loss / d z is exactly d loss / d (experts output) whatever the block does with it afterwards (even in place).
Captures keep only the non-padding tokens (the block flattens [B, S] to [B*S]) and are stored on the CPU.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from moecompress.arch.experts_call import routing_args
from moecompress.arch.layout import ModelLayout
from moecompress.errors import MoecompressError

@dataclass(frozen=True, eq=False)
class LayerCapture:
    """What one experts module saw on the held-out tokens (padding removed), CPU tensors."""

    hidden: torch.Tensor  # [T, H] model dtype
    top_k_index: torch.Tensor  # [T, K] int64
    top_k_weights: torch.Tensor  # [T, K] float32
    grad: torch.Tensor | None = None  # [T, H] float32: d loss / d experts output; None without grads

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]


class BlockCapture:
    """`with BlockCapture(model, layout, grads) as cap:` then per batch `cap.begin(mask)`, forward, `cap.end(loss)`."""

    def __init__(self, model: nn.Module, layout: ModelLayout, grads: bool = False):
        self.model, self.layout, self.grads = model, layout, grads
        self._handles = []
        self._batch: dict[int, tuple] = {}  # layer -> (hidden, idx, weights, zero leaf or None)
        self._keep: torch.Tensor | None = None
        self._parts: dict[int, list[tuple]] = {m.layer: [] for m in layout.moe_layers}
        self.num_tokens = 0

    def __enter__(self) -> "BlockCapture":
        try:
            for m in self.layout.moe_layers:
                experts = self.model.get_submodule(m.experts_path)
                self._handles.append(experts.register_forward_pre_hook(self._pre_hook(m.layer), with_kwargs=True))
                if self.grads:
                    self._handles.append(experts.register_forward_hook(self._post_hook(m.layer)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre_hook(self, layer: int):
        def hook(module, args, kwargs):
            hidden, idx, w = routing_args(args, kwargs)
            self._batch[layer] = (hidden.detach(), idx.detach(), w.detach(), None)
        return hook

    def _post_hook(self, layer: int):
        def hook(module, args, output):
            zero = torch.zeros_like(output, requires_grad=True)  # [T, H] leaf
            self._batch[layer] = self._batch[layer][:3] + (zero,)
            return output + zero
        return hook

    def begin(self, attention_mask: torch.Tensor) -> None:
        """Start a batch: attention_mask [B, S] (1 = token), flattened the way the blocks flatten tokens."""
        self._batch = {}
        self._keep = attention_mask.reshape(-1).bool()
        self.num_tokens += int(self._keep.sum())

    def end(self, loss: torch.Tensor | None = None) -> None:
        """Store the batch's captures (with d loss / d output when capturing grads: `loss` is then needed)."""
        missing = [m.experts_path for m in self.layout.moe_layers if m.layer not in self._batch]
        if missing:
            raise MoecompressError(f"experts modules {missing} were not called in the forward pass")
        grads = {}
        if self.grads:
            if loss is None:
                raise ValueError("BlockCapture(grads=True).end needs the loss")
            layers = sorted(self._batch)
            got = torch.autograd.grad(loss, [self._batch[l][3] for l in layers], allow_unused=True)
            grads = {l: g for l, g in zip(layers, got)}
        for layer, (hidden, idx, w, zero) in self._batch.items():
            n = self._keep.numel()
            hidden = hidden.reshape(-1, hidden.shape[-1])
            if hidden.shape[0] != n:
                raise MoecompressError(f"MoE layer {layer} saw {hidden.shape[0]} tokens, the batch has {n}")
            keep = self._keep.to(hidden.device)
            part = [hidden[keep].cpu(), idx.reshape(n, -1)[keep].to(torch.int64).cpu(),
                    w.reshape(n, -1)[keep].to(torch.float32).cpu()]
            if self.grads:
                g = grads[layer]
                g = torch.zeros_like(hidden, dtype=torch.float32) if g is None else g.reshape(n, -1)
                part.append(g[keep].to(torch.float32).cpu())
            self._parts[layer].append(tuple(part))
        self._batch = {}

    def captures(self) -> list[LayerCapture]:
        """One LayerCapture per MoE layer (index = layer), all batches concatenated."""
        out = []
        for m in self.layout.moe_layers:
            parts = self._parts[m.layer]
            if not parts:
                raise MoecompressError("no batch was captured; give at least one held-out sequence")
            cols = list(zip(*parts))
            out.append(LayerCapture(*(torch.cat(c) for c in cols)))
        return out


def holdout_batches(batches: Iterable[tuple], holdout: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The last ceil(holdout * N) of the N sequences in `batches` ((input_ids [B, S], attention_mask [B, S], ...)
    tuples; extra entries ignored), keeping the batch structure. holdout in (0, 1]."""
    if not 0 < holdout <= 1:
        raise MoecompressError(f"sensitivity holdout must be in (0, 1], got {holdout}")
    batches = [(b[0], b[1]) for b in batches]
    total = sum(ids.shape[0] for ids, _ in batches)
    if total == 0:
        raise MoecompressError("the measured sensitivity methods need calibration batches; none were given")
    want = max(1, -(-int(round(holdout * total * 1e6)) // 1_000_000))  # ceil, robust to float noise
    out = []
    for ids, mask in reversed(batches):
        if want <= 0:
            break
        take = min(want, ids.shape[0])
        out.append((ids[-take:], mask[-take:]))
        want -= take
    return out[::-1]
