"""Loss-aware sensitivity of dense linears (attention, shared experts, dense MLPs), in the experts' unit.

So that the allocator can spend one budget over experts AND dense linears, each linear gets the damage that
loss_aware.py gives an expert, with the linear's own output in place of the experts module's:

    damage_l(bits) = (1/N) * sum over held-out kept tokens t of (g_t . dW x_t)^2

x_t [in] the linear's input, g_t [out] = d loss / d (linear output at t), dW = Q(W) - W at `bits`, N the kept
tokens: the squared first-order loss change per token, as for experts. The candidates are simulated with RTN and
the clip search of the settings (GPTQ of a dense linear needs dense Hessians, which the sensitivity stage does not
read). Nothing is stored between batches: each batch's inputs and gradients are turned into damages at once.
Hooks live inside the `with` block of `_LinearCapture`; the model is never modified.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from moecompress.errors import MoecompressError
from moecompress.quantize.rtn import fake_quantize
from moecompress.sensitivity.deltas import QuantizerSettings
from moecompress.sensitivity.loss_aware import _NoParamGrads, next_token_loss


class _LinearCapture:
    """Inputs [.., in] and a zero leaf added to the output [.., out] of each named linear, per forward pass."""

    def __init__(self, model: nn.Module, paths: tuple[str, ...]):
        self.model, self.paths, self.handles = model, paths, []
        self.inputs: dict[str, torch.Tensor] = {}
        self.leaves: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "_LinearCapture":
        for path in self.paths:
            mod = self.model.get_submodule(path)
            self.handles.append(mod.register_forward_pre_hook(self._pre(path)))
            self.handles.append(mod.register_forward_hook(self._post(path)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, path: str):
        def hook(module, args):
            self.inputs[path] = args[0].detach()
        return hook

    def _post(self, path: str):
        def hook(module, args, output):
            zero = torch.zeros_like(output, requires_grad=True)
            self.leaves[path] = zero
            return output + zero
        return hook


def linear_shapes(model: nn.Module, paths: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """path -> (out_features, in_features) of each dense nn.Linear."""
    out = {}
    for path in paths:
        mod = model.get_submodule(path)
        if not isinstance(mod, nn.Linear):
            raise MoecompressError(f"{path} is a {type(mod).__name__}, not an nn.Linear; only linears get costs")
        out[path] = (mod.out_features, mod.in_features)
    return out


def linear_costs(model: nn.Module, paths: tuple[str, ...], batches: list[tuple[torch.Tensor, torch.Tensor]],
                 candidates: tuple[int, ...], settings: QuantizerSettings, progress: bool = True,
                 context_model: nn.Module | None = None) -> dict[str, dict[int, float]]:
    """Linear path -> bits -> loss-aware damage on the held-out `batches` (non-increasing in bits, 0 at 16).
    Inputs and gradients from `context_model` (default `model`); candidate weights quantized from `model`'s."""
    ctx = model if context_model is None else context_model
    linear_shapes(model, paths)
    device = next(ctx.parameters()).device
    deltas = {}  # path -> bits -> dW [out, in] float32
    for path in paths:
        w = model.get_submodule(path).weight.detach().to(device=device, dtype=torch.float32)
        deltas[path] = {b: fake_quantize(w, b, settings.group_size, settings.symmetric, settings.clip) - w
                        for b in candidates if b != 16}
    sums = {path: {b: 0.0 for b in deltas[path]} for path in paths}
    tokens = 0
    was = ctx.training
    ctx.eval()
    try:
        with _NoParamGrads(ctx), _LinearCapture(ctx, paths) as cap, torch.enable_grad():
            for ids, mask in tqdm(batches, desc="sensitivity (dense linears)", unit="batch", disable=not progress):
                ids, mask = ids.to(device), mask.to(device)
                logits = ctx(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, S, V]
                loss = next_token_loss(logits, ids, mask)
                grads = torch.autograd.grad(loss, [cap.leaves[p] for p in paths], allow_unused=True)
                keep = mask.reshape(-1).bool()  # [B*S]
                tokens += int(keep.sum())
                for path, g in zip(paths, grads):
                    if g is None:
                        continue
                    x = cap.inputs[path].reshape(keep.numel(), -1)[keep].float()  # [T, in]
                    g = g.reshape(keep.numel(), -1)[keep].float()  # [T, out]
                    for b, dw in deltas[path].items():
                        sums[path][b] += float((((x @ dw.T) * g).sum(-1) ** 2).sum())
                cap.inputs.clear()
                cap.leaves.clear()
    finally:
        ctx.train(was)
    out = {}
    for path in paths:
        best, by_bits = float("inf"), {}
        for b in sorted(candidates):
            d = 0.0 if b == 16 else sums[path][b] / max(tokens, 1)
            best = min(best, d)
            by_bits[b] = best
        out[path] = by_bits
    return out
