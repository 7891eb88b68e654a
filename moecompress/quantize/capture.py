"""What one module receives on calibration batches, for the post-quantization fits (router refit, block-wise
reconstruction): a forward pre-hook inside a `with` block, padding dropped, the model optionally run with some
parameters substituted (torch.func.functional_call), so the quantized model needs no copy of the model."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

Reader = Callable[[tuple, dict], tuple[torch.Tensor, ...]]  # (args, kwargs) of the call -> tensors [B*S, ...]


def first_arg(args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    """The module's first positional input (e.g. a router's hidden states)."""
    return (args[0],)


class _Inputs:
    def __init__(self, module: nn.Module, read: Reader):
        self.module, self.read, self.parts, self.keep, self._h = module, read, [], None, None

    def __enter__(self):
        def hook(module, args, kwargs):
            n = self.keep.numel()
            got = [t.reshape(n, -1) for t in self.read(args, kwargs)]  # [B*S, ...] each
            self.parts.append(tuple(t[self.keep.to(t.device)].detach() for t in got))
        self._h = self.module.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._h.remove()


@torch.no_grad()
def module_inputs(model: nn.Module, weights: dict | None, module_path: str,
                  batches: list[tuple[torch.Tensor, torch.Tensor]], read: Reader = first_arg) -> list[torch.Tensor]:
    """The inputs of `module_path` on `batches` (input_ids, attention_mask), one [T, ...] tensor per value `read`
    returns (T = real tokens), on the model's device, the model run with `weights` (name -> tensor) substituted."""
    device = next(model.parameters()).device
    with _Inputs(model.get_submodule(module_path), read) as cap:
        for ids, mask in batches:
            ids, mask = ids.to(device), mask.to(device)
            cap.keep = mask.reshape(-1) > 0
            kwargs = dict(input_ids=ids, attention_mask=mask, use_cache=False)
            if weights is None:
                model(**kwargs)
            else:
                functional_call(model, weights, args=(), kwargs=kwargs)
    return [torch.cat(c) for c in zip(*cap.parts)]


def split_holdout(batches: list[tuple], holdout: float) -> tuple[list[tuple], list[tuple]]:
    """(fit, held-out) batches: the last ceil(holdout * N) of the N sequences are held out."""
    batches = [(b[0], b[1]) for b in batches]
    n_seq = sum(ids.shape[0] for ids, _ in batches)
    n_hold = max(1, math.ceil(n_seq * holdout))
    fit, hold, seen = [], [], 0
    for ids, mask in batches:
        cut = min(max(n_seq - n_hold - seen, 0), ids.shape[0])
        if cut:
            fit.append((ids[:cut], mask[:cut]))
        if cut < ids.shape[0]:
            hold.append((ids[cut:], mask[cut:]))
        seen += ids.shape[0]
    return fit, hold
