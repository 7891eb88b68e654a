"""PackedExperts: drop-in replacement for a transformers 5.x fused experts module, computing from packed groups.

It keeps the call signature of the experts interface, `(hidden_states [T, H], top_k_index [T, K],
top_k_weights [T, K]) -> [T, H]`, and the original class's gate (`_apply_gate`, activation, post-expert norm), so
routing and activations stay the model's own. Experts absent from the checkpoint (another server holds them)
contribute nothing: summing the outputs of complementary bundles gives the full layer.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from moecompress.format.spec import ExpertsSpec
from moecompress.runtime import cuda
from moecompress.runtime.cuda import experts as cuda_experts
from moecompress.runtime.experts import cpu_moe, cpu_prefill
from moecompress.runtime.experts.packed_group import PackedGroup


class ProjGroups(nn.Module):
    """All bit-width groups of one projection: submodules named b<bits>.

    Rows are computed sorted by *position*: the groups in order, inside a group its slots in order. `route` sorts
    the (token, expert) pairs that way and counts the rows of every position.
    """

    def __init__(self, groups: dict[int, PackedGroup], num_experts: int, out_features: int):
        super().__init__()
        for bits, group in sorted(groups.items()):
            self.add_module(f"b{bits}", group)
        self.num_experts, self.out_features = num_experts, out_features
        self._lookup: list[int] = []  # [num_experts + 1]: expert -> position, len(positions) where dropped
        self._lookup_tensor: torch.Tensor | None = None  # made on first use, on the device of the routing

    def positions(self) -> list[int]:
        """Expert id at every position."""
        return [e for group in self.children() for e in group.experts]

    def set_computed(self, experts: set[int]) -> None:
        """Only these experts get rows (the others, and expert-parallel sentinels, contribute nothing)."""
        positions = self.positions()
        lookup = [len(positions)] * (self.num_experts + 1)  # the last entry: expert-parallel sentinels (and -1)
        for pos, e in enumerate(positions):
            if e in experts:
                lookup[e] = pos
        self._lookup, self._lookup_tensor = lookup, None

    def route(self, flat_experts: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """flat_experts [S] -> (pair indices of the computed pairs sorted by position [R], rows per position)."""
        if self._lookup_tensor is None or self._lookup_tensor.device != flat_experts.device:
            self._lookup_tensor = torch.tensor(self._lookup, device=flat_experts.device)
        num_positions = self._lookup[-1]
        keys = self._lookup_tensor[flat_experts.clamp(max=self.num_experts)]  # [S]
        order = torch.argsort(keys, stable=True)
        counts = torch.bincount(keys, minlength=num_positions + 1)[:num_positions].tolist()
        return order[: sum(counts)], counts

    def forward_sorted(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [R, in] sorted by position, counts: rows per position -> [R, out]."""
        outs, row, pos = [], 0, 0
        for group in self.children():
            c = counts[pos:pos + len(group.experts)]
            pos += len(group.experts)
            rows = sum(c)
            if rows:
                outs.append(group.linear_sorted(x[row:row + rows], c))
            row += rows
        if not outs:
            return x.new_zeros(0, self.out_features)
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class PackedExperts(nn.Module):
    def __init__(self, template: nn.Module, projs: list[tuple[str, int, int]], spec: ExpertsSpec, group_size: int,
                 symmetric: bool, dtype: torch.dtype = torch.bfloat16, device=None):
        """template: the model's own experts module (may be on meta); projs: (name, in_features, out_features)."""
        super().__init__()
        self.num_experts = spec.num_experts
        self.has_gate = bool(getattr(template, "has_gate", True))
        self.has_bias = bool(getattr(template, "has_bias", False))
        self.proj_names = tuple(name for name, _, _ in projs)
        self.out_features = {name: out for name, _, out in projs}
        for name, value in vars(template).items():  # scalar settings the gate may read (e.g. GPT-OSS alpha, limit)
            if not name.startswith("_") and name != "training" and isinstance(value, (int, float, bool, str)):
                setattr(self, name, value)
        for name, module in template.named_children():  # activation, post-expert norm
            if not any(True for _ in module.parameters()) or name == "post_expert_norm":
                self.add_module(name, module)
        self._gate_fn = getattr(type(template), "_apply_gate", None)
        self.has_post_expert_norm = bool(getattr(template, "has_post_expert_norm", False))
        # The fused tensor's own name, empty: transformers without moecompress stops on its size mismatch instead
        # of building random experts in place of the missing fused weight (format/spec.py).
        self.register_buffer(f"{self.proj_names[0]}_proj", torch.empty(0, dtype=torch.uint8, device=device))
        for name, in_f, out_f in projs:
            groups = {
                bits: PackedGroup(ids, bits, in_f, out_f, group_size, symmetric, self.has_bias, dtype, device)
                for bits, ids in spec.groups.get(name, {}).items()
            }
            self.add_module(name, ProjGroups(groups, spec.num_experts, out_f))
        # an expert is computed where every projection holds it (a bundle holds the same experts in all of them)
        proj_groups = [getattr(self, name) for name in self.proj_names]
        computed = set.intersection(*(set(p.positions()) for p in proj_groups))
        for p in proj_groups:
            p.set_computed(computed)
        self._same_order = all(p.positions() == proj_groups[0].positions() for p in proj_groups)
        self.expert_store = None  # a store.LayerView when an ExpertStore holds the experts (runtime/store/)

    def held_experts(self) -> tuple[int, ...]:
        first = getattr(self, self.proj_names[0])
        return tuple(sorted(e for g in first.children() for e in g.experts))

    def prepare(self, compute_dtype: torch.dtype) -> None:
        for group in self.modules():
            if isinstance(group, PackedGroup):
                group.prepare(compute_dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """The first of COMPUTE_PATHS that takes this call, else the general path (`compute`)."""
        for path in COMPUTE_PATHS:
            run = path(self, hidden_states)
            if run is not None:
                return run(hidden_states, top_k_index, top_k_weights)
        return self.compute(hidden_states, top_k_index, top_k_weights)

    def compute(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """The general path: every projection's groups in turn, any device, any number of tokens."""
        num_tokens, top_k = top_k_index.shape
        flat = top_k_index.reshape(-1)  # [S], S = T * K
        first, down = (getattr(self, name) for name in self.proj_names)
        order, counts = first.route(flat)  # [R] computed pairs, sorted by first's positions
        h = first.forward_sorted(hidden_states[order // top_k], counts)  # [R, out_first]
        h = self._gate_fn(self, h) if self.has_gate else self.act_fn(h)
        if not self._same_order:  # down groups its experts differently: re-sort the rows
            down_order, counts = down.route(flat)
            row_of_pair = torch.empty_like(flat)
            row_of_pair[order] = torch.arange(order.shape[0], device=flat.device)
            h, order = h[row_of_pair[down_order]], down_order
        y = down.forward_sorted(h, counts)  # [R, H]
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        weights = top_k_weights.reshape(-1)[order]
        y = y.float() * weights.float().unsqueeze(-1)
        out = torch.zeros(num_tokens, y.shape[-1], dtype=torch.float32, device=y.device).index_add_(0, order // top_k, y)
        return out.to(hidden_states.dtype)


def _store(module: PackedExperts, hidden: torch.Tensor):
    """Experts in a budgeted cache (runtime/store/): it picks the fused or per-expert compute itself."""
    return None if module.expert_store is None else functools.partial(module.expert_store.forward, module)


def _cuda(module: PackedExperts, hidden: torch.Tensor):
    """Triton kernels on CUDA, no host sync."""
    if hidden.is_cuda and cuda.available() and cuda_experts.supports(module, hidden):
        return functools.partial(cuda_experts.forward, module)
    return None


# (module, hidden_states) -> a callable (hidden_states, top_k_index, top_k_weights) -> [T, H] for the calls it takes,
# else None; the first that takes a call runs it. cpu_moe.fused_layer: CPU decode, the whole layer in one C++ call;
# cpu_prefill.prefill_layer: the same for more tokens, where the prefill kernels are the int8 ones (AVX2).
COMPUTE_PATHS = (_store, _cuda, cpu_moe.fused_layer, cpu_prefill.prefill_layer)
