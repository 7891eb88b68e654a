"""The expert store inside one server of an edge deployment (`deploy(..., expert_budget=)`, `--expert-budget`).

Each server keeps at most `budget` bytes of its own experts in memory and reads the rest from its bundle's files on
use. The home (it has the dense weights, hence each layer's router) prefetches with the routers (the defaults of
store.default_config); an expert-only server, without routers, prefetches from the activation paths shipped in its
bundle (expert_stats.safetensors), or not at all without them. A bundle with low-bit copies (`moecompress shard` of
a checkpoint exported with copies: the copies of the server's experts) computes misses under the default copy
threshold of their width with them (store.DEFAULT_COPY_THRESHOLD), the copies counted in the budget.

Diagnostics: with MOECOMPRESS_STORE_COUNTERS=DIR in the environment, each server's store writes its counters to
DIR/store-<bundle directory name>.json when its process exits (the server processes' stores are otherwise out of
reach of the home; the multi-process test reads them); the store then stays alive until the process exits.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
from pathlib import Path

from torch import nn

from moecompress.format.expert_stats import EXPERT_STATS_FILE
from moecompress.format.spec import read_spec
from moecompress.runtime.experts.packed_experts import PackedExperts
from moecompress.runtime.store.attach import attach_store
from moecompress.runtime.store.store import ExpertStore, default_config


def held_experts_modules(model: nn.Module, experts_paths) -> dict[int, PackedExperts]:
    """{MoE layer: PackedExperts} of the layers whose experts this model holds (allocated, at least one expert)."""
    out = {}
    for layer, path in enumerate(experts_paths):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, PackedExperts) and module.held_experts():
            if all(t.device.type != "meta" for t in module.buffers()):
                out[layer] = module
    return out


def attach_server_store(directory: str | Path, experts: dict[int, PackedExperts], experts_paths, budget: int | None,
                        model: nn.Module | None = None) -> ExpertStore | None:
    """Put one server's experts ({MoE layer: module}, global layer numbers) under a store of `budget` bytes reading
    its bundle `directory`; None when budget is None or the server holds no expert. model: the server's full model
    when it has one (the home), for router prefetch."""
    if budget is None or not experts:
        return None
    has_stats = (Path(directory) / EXPERT_STATS_FILE).exists()
    config = default_config(int(budget), has_stats, copy_bits=read_spec(directory).copy_bits)
    if model is None:  # no routers here: the activation paths, when shipped
        config = dataclasses.replace(config, prefetch="paths" if has_stats else None)
    paths = {layer: experts_paths[layer] for layer in experts}
    store = attach_store(model, directory, config, modules=experts, paths=paths)
    where = os.environ.get(COUNTERS_ENV)
    if where:
        atexit.register(_write_counters, store, Path(where) / f"store-{Path(directory).name}.json")
    return store


def _write_counters(store: ExpertStore, target: Path) -> None:
    try:
        target.write_text(json.dumps(store.counters()))
    except OSError:  # the directory is gone: nobody reads them
        pass


COUNTERS_ENV = "MOECOMPRESS_STORE_COUNTERS"
