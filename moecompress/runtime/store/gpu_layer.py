"""One MoE layer call of the GPU tier computed from the slot table (slots.py) with the CUDA pair path's kernels
(runtime/cuda/pairs.py, decode.py), no host sync:

    lookups from one snapshot of the resident flags (slots.SlotTable.lookups)
    plan over the device slots:  permute -> first projection -> (gate) -> down      (the other experts dropped)
    plan over the pinned host copy: the same launches, the resident experts dropped (skipped when the layer was seen
        fully resident and nothing was evicted since)
    the down partial sums of both added (each pair's row is zero in one of them), then the pair path's sum kernel

Every pair is computed by one of the two plans with the same kernel and constants as the fully resident layer's pair
path, from the same packed bytes (device slot or pinned host memory, which the GPU reads over PCIe), and summed by
the same sum kernel in the same order: the output equals the fully resident layer's bit for bit. A missing expert
costs no copy wait: the host plan reads it directly while the side stream copies it into a slot for its next use.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from moecompress.runtime import cuda
from moecompress.runtime.store.tiers import device_view

DECODE_DTYPES = (torch.bfloat16, torch.float16)


def _viewed(groups: list, device: torch.device) -> list:
    """[(group, first position)] with each group's tensors as device views (same object layout as PackedGroup)."""
    out = []
    for g, pos0 in groups:
        v = SimpleNamespace(bits=g.bits, experts=g.experts, symmetric=g.symmetric, group_size=g.group_size,
                            in_features=g.in_features, out_features=g.out_features)
        for name in ("qweight", "scales", "zeros"):
            t = g._buffers.get(name)
            setattr(v, name, None if t is None else device_view(t, device))
        out.append((v, pos0))
    return out


class SlotLayers:
    """The pair plans of each (layer, tokens, top_k, dtype) over the slot table's pools and the host copy."""

    def __init__(self, table):
        self.table = table
        self.plans: dict = {}
        self.graphs: dict = {}  # (layer, tokens, top_k, dtypes) -> slot_graphs.GraphCall (StoreConfig.gpu_graphs)

    def eligible(self, layer: int, module, hidden: torch.Tensor, top_k_index: torch.Tensor) -> bool:
        from moecompress.runtime.cuda import experts as cuda_experts, launch

        if not (hidden.is_cuda and hidden.dtype in DECODE_DTYPES and cuda.available()):
            return False
        tokens, top_k = top_k_index.shape
        proj = getattr(module, module.proj_names[0])
        return (tokens <= launch.PAIR_TOKENS and tokens * top_k <= launch.PAIR_MAX_MEAN_ROWS * proj.num_experts
                and cuda_experts.pair_supported(module) and layer in self.table.host.groups)

    def _plans(self, layer: int, module, tokens: int, top_k: int, dtype, device):
        key = (layer, tokens, top_k, dtype)
        if key not in self.plans:
            from moecompress.runtime.cuda.experts import silu_gate
            from moecompress.runtime.cuda.pairs import PairPlan

            t = self.table
            names = module.proj_names
            projs = [SimpleNamespace(num_experts=getattr(module, n).num_experts,
                                     out_features=getattr(module, n).out_features) for n in names]
            gated = silu_gate(module)
            on_device = PairPlan(module, *[(projs[i], t.kernel_groups(layer, n), t.lut_device[layer][i])
                                           for i, n in enumerate(names)], gated, tokens, top_k, dtype, device)
            on_host = PairPlan(module, *[(projs[i], _viewed(t.host.groups[layer][n], device), t.lut_host[layer][i])
                                         for i, n in enumerate(names)], gated, tokens, top_k, dtype, device)
            self.plans[key] = (on_device, on_host)
        return self.plans[key]

    def forward(self, layer: int, module, x: torch.Tensor, flat: torch.Tensor, weights: torch.Tensor, top_k: int,
                host_pass: bool, timing: tuple | None = None) -> torch.Tensor:
        """x [T, H] contiguous, flat [T * top_k] expert ids, weights [T * top_k] -> [T, H]; the lookups must be
        current (SlotTable.lookups, same stream). timing: (start, end) CUDA events around the host plan."""
        on_device, on_host = self._plans(layer, module, x.shape[0], top_k, x.dtype, x.device)
        out = torch.empty(x.shape[0], on_device.hidden, dtype=x.dtype, device=x.device)
        self.compute(on_device, on_host, x, flat, weights, out, host_pass, timing)
        return out

    @staticmethod
    def compute(on_device, on_host, x, flat, weights, out, host_pass: bool, timing) -> None:
        """The launches of one call into `out` [T, H] (eagerly, or captured by slot_graphs.GraphCall)."""
        on_device.project(x, flat)
        if host_pass:
            if timing is not None:
                timing[0].record()
            on_host.project(x, flat)
            on_device.partial.add_(on_host.partial)  # a pair's row is zero in the plan that dropped it: exact
            if timing is not None:
                timing[1].record()
        on_device.sum(weights, out)

    def graph_call(self, layer: int, module, x: torch.Tensor, flat: torch.Tensor, weights: torch.Tensor, top_k: int,
                   predict=None):
        """The layer's slot_graphs.GraphCall for these shapes and dtypes (made at the first such call; predict: its
        graph_predict.GraphPrediction, fixed then)."""
        key = (layer, x.shape[0], top_k, x.dtype, flat.dtype, weights.dtype)
        call = self.graphs.get(key)
        if call is None:
            from moecompress.runtime.store.slot_graphs import GraphCall

            call = self.graphs[key] = GraphCall(self, layer, module, x, flat, weights, top_k, predict)
        return call
