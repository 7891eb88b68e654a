"""The store's fused decode path on the CPU (store/fused.py): decode steps that the fully resident layer runs as
cpu_moe's fused C++ call run that call over the slots: one call for all routed experts when all are resident,
resident low-bit copies joining it; on a miss, one call for the resident ones while the store's reader threads read
the missing ones (the C++ call runs without the GIL), one for those, then the one call's sum (`overlap=False`: wait
for every miss, then the one call).
"""
from __future__ import annotations

import torch

from moecompress.errors import MoecompressError
from moecompress.runtime.experts import cpu_moe
from moecompress.runtime.store.fused import (FusedSettings, fused_call, fused_rows, layer_settings, settings_key,
                                             weighted_sum)


class FusedPath:
    """One store's (store.ExpertStore) fused decode calls."""

    def __init__(self, store):
        self.store = store
        self.decided: dict = {}  # (layer, settings_key) -> FusedSettings or None: the fused decode call's decision

    def settings(self, layer: int, module, hidden: torch.Tensor) -> FusedSettings | None:
        """The fused call's settings where the fully resident layer would take it for this call, else None."""
        if hidden.shape[0] > cpu_moe.max_tokens() or hidden.device.type != "cpu":
            return None
        key = (layer, settings_key(hidden.dtype))
        if key not in self.decided:
            copies = self.store.copies.get(layer, {})
            self.decided[key] = layer_settings(module, self.store.cache.layout, layer, copies, hidden.dtype)
        return self.decided[key]

    def forward(self, layer: int, module, settings: FusedSettings, hidden, top_k_index, top_k_weights):
        """One fused call per chunk of tokens whose experts fit in the cache together (normally the whole call)."""
        held = self.store.cache.layout.shapes[layer]
        rows = [[e for e in r if e in held] for r in top_k_index.tolist()]  # per token: its held experts
        nbytes, room = self.store.cache.layout.nbytes, self.store.cache.room()
        chunks, chunk, size = [], [], 0  # token ranges whose distinct experts fit in `room` together
        seen: set = set()
        for t, experts in enumerate(rows):
            new = {e for e in experts if e not in seen}
            extra = sum(nbytes[(layer, e)] for e in new)
            if chunk and size + extra > room:
                chunks.append(chunk)
                chunk, size, seen = [], 0, set()
                new = set(experts)
                extra = sum(nbytes[(layer, e)] for e in new)
            if extra > room:
                raise MoecompressError(f"MoE layer {layer}: one token's routed experts ({extra} bytes) do not fit in "
                                       f"the expert cache's {room} unpinned bytes; give a larger expert budget")
            chunk.append(t)
            seen |= new
            size += extra
        chunks.append(chunk)
        self.store._calls += 1
        if len(chunks) == 1:
            out = self._chunk(layer, module, settings, hidden, top_k_index, top_k_weights)
        else:
            out = torch.cat([self._chunk(layer, module, settings, hidden[c[0]:c[-1] + 1],
                                               top_k_index[c[0]:c[-1] + 1], top_k_weights[c[0]:c[-1] + 1])
                             for c in chunks])
        self.store.cache.end_layer(layer)
        return out

    def _chunk(self, layer, module, settings, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        threshold, copies = self.store.config.copy_threshold, self.store.copies.get(layer)
        held_here = self.store.cache.layout.shapes[layer]
        weight: dict[int, float] = {}  # held expert -> its highest routing weight in the chunk
        for experts, ws in zip(top_k_index.tolist(), self.store._copy_weights(top_k_weights).tolist()):
            for e, w in zip(experts, ws):
                if e in held_here:
                    weight[e] = max(weight.get(e, w), w)
        order = list(weight)
        copy_slot = copies[module.proj_names[0]].slot if copies else {}  # expert -> its row in the copy groups
        may_copy = [threshold is not None and e in copy_slot and weight[e] < threshold for e in order]
        kinds = self.store.cache.classify([((layer, e), sub) for e, sub in zip(order, may_copy)],
                                    copy_inflight=self.store.config.copy_fetch,
                                    copy_always=self.store.config.copy_deterministic)
        held = [(layer, e) for e, kind in zip(order, kinds) if kind == "hit"]
        self.store._submit_reads(layer, order, kinds)  # misses are read by the reader threads, in parallel
        table = {}
        try:
            for e, kind in zip(order, kinds):
                if kind == "copy":  # the resident low-bit copy computes it
                    table[e] = (copies, copy_slot[e])
                elif kind == "hit":
                    table[e] = (self.store.cache.slots[(layer, e)].groups, 0)
            if "miss" not in kinds or not self.store.config.overlap:  # (every miss read, then) the one call
                late = self._wait_misses(layer, order, kinds, held)
                return fused_call(settings, module.proj_names, module.num_experts, hidden, top_k_index, top_k_weights,
                                  {**table, **late})
            # misses: the resident experts compute (the C++ call runs without the GIL) while the reader threads
            # read the missing ones; then those; the rows are summed in the one call's order (fused.weighted_sum)
            args = (settings, module.proj_names, module.num_experts, hidden, top_k_index)
            parts = [fused_rows(*args, table)] if table else []
            parts.append(fused_rows(*args, self._wait_misses(layer, order, kinds, held)))
            return weighted_sum(parts, top_k_weights, hidden.dtype)
        finally:
            for key in held:
                self.store.cache.release(key)

    def _wait_misses(self, layer: int, order: list[int], kinds: list[str], held: list) -> dict:
        """The missed experts' slots once read (added to `held`, released by the caller): expert -> (groups, 0)."""
        late = {}
        for e, kind in zip(order, kinds):
            if kind == "miss":
                slot = self.store.cache.wait_for((layer, e))
                held.append((layer, e))
                late[e] = (slot.groups, 0)
        return late
