"""One decoder layer on the device at a time (recipe `offload: layer`, or `auto` when the model does not fit).

The model stays in host memory. Inside `with LayerOffload(model, layout, device):`
- everything outside the decoder layers (embeddings, final norm, head, rotary buffers) is on `device`;
- a forward pre-hook on each decoder layer gives its parameters and buffers device copies of their host tensors
  (`p.data = host.to(device)`) and moves its tensor inputs there; a forward hook gives them their host tensors
  back, so only the layer that computes occupies the device. The host tensors are the same storage throughout:
  views taken of a parameter (the sensitivity and GPTQ stages write candidate weights through them) stay valid;
- tensors autograd saves for a backward pass are kept in host memory (torch.autograd.graph.save_on_cpu) and
  brought back when the backward needs them: a loss-aware backward also holds one layer at a time, and it sees
  the weights of its forward even though the layer has been given its host tensors back since.
Computation is the same as with the whole model on `device`; results equal up to floating-point order. The
stages' per-layer math outside a forward (GPTQ, the sensitivity's damages) takes the device as an argument and
moves one layer's matrices there itself.

Not covered: the post-quantization steps (block-wise reconstruction, router refit, scale tuning) substitute
weights with torch.func.functional_call; under offload the pipeline runs them on the host.
"""
from __future__ import annotations

import torch
from torch import nn

from moecompress.arch.layout import ModelLayout

MODES = ("none", "layer", "auto")
FIT_SHARE = 0.8  # "auto": offload when the weights take more than this share of the device's free memory


def _to(x, device: torch.device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of `module` (each once)."""
    seen, out = set(), []
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class LayerOffload:
    """`with LayerOffload(model, layout, device, log=[]):` (module docstring). `log` gets ("load", i) and
    ("unload", i) per decoder layer forward, in order."""

    def __init__(self, model: nn.Module, layout: ModelLayout, device: str | torch.device, log: list | None = None):
        self.model, self.device, self.log = model, torch.device(device), log
        self.layers = list(model.get_submodule(layout.decoder_layers_path))
        self._handles, self._host = [], {}
        self._save = None

    def __enter__(self) -> "LayerOffload":
        layer_ids = {id(t) for layer in self.layers for t in _tensors(layer)}
        self._resident = [t for t in _tensors(self.model) if id(t) not in layer_ids]
        try:
            for t in self._resident:
                self._host[id(t)] = t.data
                t.data = t.data.to(self.device, copy=True)
            for i, layer in enumerate(self.layers):
                for t in _tensors(layer):
                    self._host[id(t)] = t.data
                self._handles.append(layer.register_forward_pre_hook(self._load(i), with_kwargs=True))
                self._handles.append(layer.register_forward_hook(self._unload(i)))
            self._save = torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
            self._save.__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._save is not None:
            self._save.__exit__(None, None, None)
            self._save = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for t in self._resident:  # anything written to a resident tensor is kept
            host = self._host[id(t)]
            if t.data is not host:
                host.copy_(t.data)
                t.data = host
        for layer in self.layers:
            self._give_back(layer)
        self._host.clear()

    def _give_back(self, layer: nn.Module) -> None:
        for t in _tensors(layer):
            host = self._host.get(id(t))
            if host is not None and t.data is not host:
                t.data = host

    def _load(self, i: int):
        def hook(module, args, kwargs):
            for t in _tensors(module):
                host = self._host.get(id(t))
                if host is not None:
                    t.data = host.to(self.device, copy=True)
            if self.log is not None:
                self.log.append(("load", i))
            return _to(args, self.device), _to(kwargs, self.device)
        return hook

    def _unload(self, i: int):
        def hook(module, args, output):
            self._give_back(module)
            if self.log is not None:
                self.log.append(("unload", i))
        return hook


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(model))


def wants_offload(mode: str, device: str, model_bytes: int) -> bool:
    """Whether to run with one layer at a time: "layer" always (off the CPU), "auto" when `model_bytes` exceed
    FIT_SHARE of the CUDA device's free memory, "none" never."""
    if mode == "none" or (mode == "auto" and not device.startswith("cuda")):
        return False
    if mode == "layer":
        return True
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return model_bytes > FIT_SHARE * free
