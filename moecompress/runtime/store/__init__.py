"""Storage layer of the runtime: a tiered expert store (issue 12).

Experts live in a slow tier (the checkpoint's safetensors files, or pinned CPU memory on a GPU box) and are computed
from a fast-tier cache of single-expert slots under a byte budget: pinning by routing mass per byte, eviction policies
by name, prefetch of layer l+1 while layer l computes, optional low-bit copies for misses of low routing weight.

    model = moecompress.from_pretrained(ckpt, expert_budget=2 << 30)            # defaults: store.DEFAULTS
    model.expert_store.counters()                                               # hits, misses, bytes/token, ...
    deploy(bundles, expert_budget=2 << 30)   # or --expert-budget: each server's experts (rank.py)

Decode steps take the fused CPU call over the slots where the resident model would (fused_path.py, fused.py). On a
GPU box (`tier="pinned"`) the slots are preallocated device pools indexed per layer by expert (slots.py), so decode
calls run the CUDA pair path's kernels over them in one batched launch per projection, the other experts from the
pinned host copy, with no host sync, bit-equal to the resident model (slot_path.py, gpu_layer.py); the bookkeeping
follows on a thread (deferred.py). `StoreConfig(gpu_slots=False)`: one expert at a time instead (store.py).
"""
from moecompress.runtime.store.attach import attach_store, detach_store
from moecompress.runtime.store.policies import EVICTION_POLICIES
from moecompress.runtime.store.prefetch import PREDICTORS
from moecompress.runtime.store.store import ExpertStore, StoreConfig

__all__ = ["attach_store", "detach_store", "EVICTION_POLICIES", "PREDICTORS", "ExpertStore", "StoreConfig"]
