"""Run a checkpoint one decoder layer at a time, so peak memory is about one layer plus the activations.

1. The model is built on the meta device (parameters only; buffers such as rotary `inv_freq` are computed for
   real), then everything outside the decoder layers is loaded, except the LM head, which calibration never runs.
2. Inputs of the decoder layers: each layer is swapped for a catcher that records its call (hidden states, and
   the attention mask / position ids / position embeddings the model's own forward computed for that layer, e.g.
   GPT-OSS's per-layer sliding-window masks) and passes the hidden states through, and the base model's forward
   is run. So whatever the architecture's forward does before its layer loop (embedding scale, rotary, masks) is
   reproduced, not re-derived. The first pass gives the hidden states entering layer 0; later, layer i's
   arguments for a batch are recaptured just before it runs (stopping the forward at layer i), so only the
   hidden states of every batch are kept, not every layer's masks.
3. Per decoder layer: load its weights, run every batch through it (hidden states carried forward), then put its
   weights back on the meta device and hand the freed memory back to the OS.

Weights are read with `safetensors.safe_open` (files opened per layer and closed after) and go through
transformers' own key conversion (`conversion_mapping.py`: e.g. per-expert `experts.<e>.gate_proj.weight` keys,
which `save_pretrained` writes, fused into `experts.gate_up_proj`), by handing one layer's keys at a time to
`convert_and_load_state_dict_in_model`.
"""
from __future__ import annotations

import ctypes
import json
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from moecompress.arch import describe
from moecompress.errors import MoecompressError

_OUTSIDE = -1  # group of the keys outside the decoder layers


@contextmanager
def _quiet_transformers_progress():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`). Without it, glibc's dynamic mmap threshold
    makes each layer's freed weights stay in the heap, and RSS grows by about one layer per layer."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def checkpoint_files(path: Path) -> dict[str, str]:
    """Checkpoint key -> safetensors file name, from model.safetensors.index.json or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single.name for k in f.keys()}
    raise MoecompressError(f"{path}: layer-by-layer calibration needs safetensors weights "
                           "(model.safetensors or model.safetensors.index.json)")


class _Stop(Exception):
    """Raised by the catcher of the layer whose call was wanted: nothing after it needs to run."""


class _Catcher(nn.Module):
    """Stands in for decoder layer `index`: records its call, returns the hidden states unchanged."""

    def __init__(self, index: int, layer: nn.Module, sink: list, stop: bool):
        super().__init__()
        object.__setattr__(self, "_wrapped", layer)  # not a submodule: attribute lookups only
        self.index, self.sink, self.stop = index, sink, stop

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((self.index, hidden_states, args, kwargs))
        if self.stop:
            raise _Stop
        return hidden_states


class LayerwiseModel:
    """A causal LM skeleton whose decoder layers are materialised one at a time from a checkpoint directory."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 attn_implementation: str | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.path, self.dtype, self.device = Path(path), dtype, torch.device(device)
        config = AutoConfig.from_pretrained(self.path)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        self.model.eval()
        self.layout = describe(self.model)
        self.layers = self.model.get_submodule(self.layout.decoder_layers_path)
        self._mapping = get_model_conversion_mapping(self.model)
        self._groups = self._group_keys()

    def _group_keys(self) -> dict[int, dict[str, list[str]]]:
        """Decoder layer index (or _OUTSIDE) -> file -> checkpoint keys, by the name each key loads into."""
        from transformers.core_model_loading import WeightConverter, rename_source_key

        files = checkpoint_files(self.path)
        meta_sd = self.model.state_dict()
        renamings = [t for t in self._mapping if not isinstance(t, WeightConverter)]
        converters = [t for t in self._mapping if isinstance(t, WeightConverter)]
        head = self.model.get_output_embeddings()
        head_path = next((n for n, m in self.model.named_modules() if m is head), None) if head is not None else None
        prefix = self.layout.decoder_layers_path + "."
        groups: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for key, file in files.items():
            target, _ = rename_source_key(key, renamings, converters, self.model.base_model_prefix, meta_sd)
            if head_path and (target == head_path or target.startswith(head_path + ".")):
                continue
            group = int(target[len(prefix):].split(".", 1)[0]) if target.startswith(prefix) else _OUTSIDE
            groups[group][file].append(key)
        return groups

    def _load(self, group: int) -> None:
        from safetensors import safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        config = LoadStateDictConfig(dtype=self.dtype, weight_mapping=self._mapping,
                                     device_map={"": str(self.device)})
        with ExitStack() as stack, _quiet_transformers_progress():
            state = {}
            for file, keys in self._groups.get(group, {}).items():
                f = stack.enter_context(safe_open(str(self.path / file), framework="pt", device="cpu"))
                state.update({k: f.get_slice(k) for k in keys})
            info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        if info.mismatched_keys:
            raise MoecompressError(f"{self.path}: checkpoint shapes do not match the config for "
                                   f"{sorted(k for k, *_ in info.mismatched_keys)[:5]}")

    def load_outside_layers(self) -> None:
        """Embeddings, final norm and every other weight outside the decoder layers (not the LM head)."""
        self._load(_OUTSIDE)
        head = self.model.get_output_embeddings()
        head_params = {id(p) for p in head.parameters()} if head is not None else set()
        missing = [n for n, t in self._named_tensors(self.model)
                   if t.device.type == "meta" and id(t) not in head_params
                   and not n.startswith(self.layout.decoder_layers_path + ".")]
        if missing:
            raise MoecompressError(f"{self.path}: no weights for {missing[:5]} in the checkpoint")
        for module in self.model.modules():  # buffers were built on the CPU (rotary inv_freq, ...)
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf.device.type != "meta" and buf.device != self.device:
                    module._buffers[name] = buf.to(self.device)

    def load_layer(self, i: int) -> nn.Module:
        self._load(i)
        layer = self.layers[i]
        missing = [n for n, t in self._named_tensors(layer) if t.device.type == "meta"]
        if missing:
            raise MoecompressError(f"{self.path}: no weights for decoder layer {i}: {missing[:5]}")
        return layer

    def free_layer(self, i: int) -> None:
        self.layers[i].to_empty(device="meta")
        _release_freed_memory()

    @staticmethod
    def _named_tensors(module: nn.Module):
        yield from module.named_parameters()
        yield from module.named_buffers()

    @torch.no_grad()
    def layer_calls(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, stop_at: int | None = None):
        """Run the base model's forward with every decoder layer replaced by a pass-through catcher and return
        the calls the layers got, [(index, hidden_states, args, kwargs)], in order; with `stop_at`, stop after
        that layer's call. For layer 0, hidden_states is what enters the decoder stack (the embeddings, scaled
        as the model does); for the others it is that too (the catchers pass it through), so only their args and
        kwargs (attention mask, position ids / embeddings, ...) are meaningful."""
        sink: list = []
        originals = list(self.layers)
        for i, layer in enumerate(originals):
            self.layers[i] = _Catcher(i, layer, sink, stop=i == stop_at)
        try:
            self.model.base_model(input_ids=input_ids.to(self.device),
                                  attention_mask=attention_mask.to(self.device), use_cache=False)
        except _Stop:
            pass
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        if not sink or sink[0][0] != 0 or (stop_at is not None and sink[-1][0] != stop_at):
            raise MoecompressError(f"{type(self.model).__name__}: could not capture the inputs of its decoder layers")
        return sink


@torch.no_grad()
def run_layerwise(lm: LayerwiseModel, batches: list[tuple[torch.Tensor, torch.Tensor]], on_batch,
                  on_layer_done=None, progress: bool = True) -> None:
    """Push every batch (input_ids, attention_mask) through the model, one decoder layer at a time.
    on_batch(b) is called before batch b enters a layer (to point the recorder at batch b), on_layer_done(i)
    after decoder layer i has seen every batch. Only the hidden states of every batch are kept between layers;
    a layer's mask and position embeddings are recomputed by the model's own forward when it needs them."""
    from tqdm.auto import tqdm

    lm.load_outside_layers()
    hidden, n_layers = [], 0
    for ids, mask in batches:
        calls = lm.layer_calls(ids, mask)
        hidden.append(calls[0][1])
        n_layers = len(calls)
    for i in tqdm(range(n_layers), desc="calibrate (layer by layer)", unit="layer", disable=not progress):
        layer = lm.load_layer(i)
        for b, (ids, mask) in enumerate(batches):
            _, _, args, kwargs = lm.layer_calls(ids, mask, stop_at=i)[-1]
            on_batch(b)
            out = layer(hidden[b], *args, **kwargs)
            hidden[b] = out[0] if isinstance(out, tuple) else out
        lm.free_layer(i)
        if on_layer_done is not None:
            on_layer_done(i)
