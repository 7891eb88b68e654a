"""Build what one rank computes from its own bundle only.

- home of the expert model (bundle holds "full"): the transformers model, loaded as a checkpoint.
- expert server ("experts"): only its PackedExperts modules; the model skeleton is built on the meta device and
  nothing but the experts is materialised, so no dense weight is ever allocated (or random-initialised).
- pipeline stage ("layers"): the skeleton on meta, materialising only its decoder layers (and, on the first
  stage, embeddings, final norm and lm_head) from its bundle.
"""
from __future__ import annotations

import re
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.format.files import weight_files
from moecompress.runtime.loading.convert import prepare_kernels, replace_modules
from moecompress.runtime.edge import wire
from moecompress.runtime.edge.bundle import BundleInfo
from moecompress.format.spec import read_spec
from moecompress.runtime.experts.packed_experts import PackedExperts


def load_full(info: BundleInfo, dtype: torch.dtype) -> nn.Module:
    """The home of the expert model: every dense weight and the experts it holds (layers of which it holds no
    expert keep an unallocated module there; the dispatcher computes none of their pairs locally)."""
    if info.holds != "full":
        raise MoecompressError(f"server {info.server}'s bundle holds {info.holds}, not the dense weights a home needs")
    held = set(read_spec(info.directory).experts)
    skip = {p for p in info.experts_paths if p not in held}
    return load_rank_model(info.directory, info.experts_paths, dtype, layers=None, outer=True, skip=skip).eval()


def meta_model(directory: Path, dtype: torch.dtype) -> nn.Module:
    """The model of `directory`'s config.json on the meta device, its experts/linears already packed modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    replace_modules(model, read_spec(directory), dtype=dtype, device="meta")
    return model.eval()


def materialise(model: nn.Module, directory: Path, paths: list[str], dtype: torch.dtype) -> None:
    """Allocate the modules at `paths` on the CPU and fill every tensor of theirs from the bundle (strict)."""
    wanted = {p: {} for p in paths}
    for name in weight_files(directory):
        with safe_open(directory / name, "pt") as f:
            for key in f.keys():
                for p in paths:
                    if key.startswith(p + "."):
                        wanted[p][key[len(p) + 1:]] = f.get_tensor(key)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for p in paths:
        module = model.get_submodule(p).to_empty(device="cpu")
        missing, unexpected = module.load_state_dict(wanted[p], strict=False)
        if tied and module is model.get_output_embeddings() and missing == ["weight"]:
            module.weight = model.get_input_embeddings().weight  # tied: the embedding (materialised first)
            missing = []
        for name, sub in list(module.named_modules()):
            if sub._non_persistent_buffers_set:  # computed, not stored (rotary inv_freq): build it afresh
                fresh = type(sub)(config=model.config)
                if name:
                    parent, _, child = name.rpartition(".")
                    setattr(module.get_submodule(parent) if parent else module, child, fresh)
                else:
                    parent, _, child = p.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, child, fresh)
        if missing or unexpected:
            raise MoecompressError(f"{directory}: module {p} misses {missing[:3]} / has unexpected {unexpected[:3]} "
                                   "tensors; the bundle does not match its config.json")
        prepare_kernels(module, dtype)


def decoder_container(experts_paths) -> str:
    """Module path of the decoder layers' list ('model.layers'), read from the experts paths."""
    for path in experts_paths:
        m = re.match(r"^(.*)\.(\d+)\.", path)
        if m:
            return m.group(1)
    raise MoecompressError(f"cannot tell the decoder layers' module from experts paths {list(experts_paths)[:2]}")


def decoder_layer(path: str, container: str) -> int:
    return int(path[len(container) + 1:].split(".")[0])


def rank_paths(model: nn.Module, container: str, layers: set[int] | None, outer: bool, skip: set[str]) -> list[str]:
    """Module paths a rank materialises: the decoder layers in `layers` (all when None), with `outer` everything
    outside the decoder layers (embeddings, final norm, lm_head), always the state-less helpers (rotary embedding);
    never a path in `skip` (nor anything under it)."""
    paths: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if path in skip:
                continue
            if path == container:
                for i, layer in enumerate(child):
                    if layers is None or i in layers:
                        take(layer, f"{path}.{i}")
                continue
            if container.startswith(path + "."):
                walk(child, path)
            elif outer or not any(True for _ in child.state_dict()):
                take(child, path)

    def take(module: nn.Module, path: str) -> None:
        if any(s.startswith(path + ".") for s in skip):
            walk(module, path)
        else:
            paths.append(path)

    walk(model, "")
    return paths


def load_rank_model(directory: Path, experts_paths, dtype: torch.dtype, layers: set[int] | None, outer: bool,
                    skip: set[str] = frozenset()) -> nn.Module:
    """The bundle's model with only what this rank computes allocated (the rest stays on the meta device)."""
    model = meta_model(directory, dtype)
    container = decoder_container(experts_paths)
    materialise(model, directory, rank_paths(model, container, layers, outer, set(skip)), dtype)
    return model


def load_experts(info: BundleInfo, dtype: torch.dtype, model: nn.Module | None = None) -> dict[int, PackedExperts]:
    """{MoE layer: PackedExperts holding this server's experts}, materialised from the bundle alone."""
    model = model if model is not None else meta_model(info.directory, dtype)
    paths = [p for layer, p in enumerate(info.experts_paths)
             if any(info.server in copies for copies in info.assignment[layer])]
    materialise(model, info.directory, paths, dtype)
    out = {}
    for layer, path in enumerate(info.experts_paths):
        if path in paths:
            module = model.get_submodule(path)
            if not isinstance(module, PackedExperts):
                raise MoecompressError(f"{path} of server {info.server}'s bundle is not a packed experts module")
            out[layer] = module
    return out


class ExpertServer:
    """One server's experts in the expert model: answers a request with the routing-weighted sum of its pairs."""

    def __init__(self, server: int, home: int, experts: dict[int, PackedExperts], lock=None):
        """lock: held while computing (a home's experts, shared with its own rows' computations; homes.py)."""
        self.server, self.home, self.experts = server, home, experts
        self.lock = lock if lock is not None else nullcontext()
        self.compute_seconds = 0.0

    def compute(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if layer not in self.experts:
            raise MoecompressError(f"server {self.server} was asked for MoE layer {layer}, of which it holds no expert")
        with self.lock, torch.no_grad():
            start = time.perf_counter()
            out = self.experts[layer](hidden, ids, weights)
            self.compute_seconds += time.perf_counter() - start
        return out

    def handle(self, head: list[int], payload: torch.Tensor):
        """An OP_EXPERT request (header: layer, rows, top_k, dtype, a = hidden size) -> the reply to the home."""
        _, layer, rows, top_k, code, hidden_size = head[:6]
        dtype = wire.dtype_of(code)
        hidden, ids, weights = wire.decode_request(payload, rows, hidden_size, top_k, dtype)
        return [(self.home, None, wire.as_bytes(self.compute(layer, hidden, ids, weights).to(dtype)))]

    def control(self, op: int) -> None:
        pass

    def stats(self) -> list[float]:
        return [self.compute_seconds, 0.0, float(peak_rss())]


def peak_rss() -> int:
    """Peak resident memory of this process, bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
