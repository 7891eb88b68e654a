"""PackedExperts: drop-in replacement for a transformers 5.x fused experts module, computing from packed groups.

It keeps the call signature of the experts interface, `(hidden_states [T, H], top_k_index [T, K],
top_k_weights [T, K]) -> [T, H]`, and the original class's gate (`_apply_gate`, activation, post-expert norm), so
routing and activations stay the model's own. Experts absent from the checkpoint (another server holds them)
contribute nothing: summing the outputs of complementary bundles gives the full layer.
"""
from __future__ import annotations

import torch
from torch import nn

from moecompress.format.spec import ExpertsSpec
from moecompress.runtime.packed_group import PackedGroup


class ProjGroups(nn.Module):
    """All bit-width groups of one projection: submodules named b<bits>."""

    def __init__(self, groups: dict[int, PackedGroup]):
        super().__init__()
        for bits, group in sorted(groups.items()):
            self.add_module(f"b{bits}", group)

    def forward_sorted(self, x: torch.Tensor, bounds: list[tuple[int, int, int]], out_features: int) -> torch.Tensor:
        """x [S, in] sorted by expert; bounds: (expert, start, end) of each hit expert -> [S, out]."""
        y = x.new_zeros(x.shape[0], out_features)  # [S, out]; rows of experts not held stay 0
        for group in self.children():
            hit = [(group.slot[e], a, b) for e, a, b in bounds if e in group.slot]
            if not hit:
                continue
            outs = group.linear([s for s, _, _ in hit], [x[a:b] for _, a, b in hit])
            for (_, a, b), o in zip(hit, outs):
                y[a:b] = o
        return y


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
            self.add_module(name, ProjGroups(groups))

    def held_experts(self) -> tuple[int, ...]:
        first = getattr(self, self.proj_names[0])
        return tuple(sorted(e for g in first.children() for e in g.experts))

    def prepare(self, compute_dtype: torch.dtype) -> None:
        for group in self.modules():
            if isinstance(group, PackedGroup):
                group.prepare(compute_dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        num_tokens, top_k = top_k_index.shape
        flat = top_k_index.reshape(-1)  # [S], S = T * K
        order = torch.argsort(flat, stable=True)
        sorted_experts = flat[order]
        counts = torch.bincount(sorted_experts.clamp(max=self.num_experts), minlength=self.num_experts + 1)
        ends = counts.cumsum(0).tolist()
        bounds = [(e, ends[e] - int(counts[e]), ends[e]) for e in range(self.num_experts) if counts[e] > 0]
        token = order // top_k
        x = hidden_states[token]  # [S, H], grouped by expert
        first, down = self.proj_names
        h = getattr(self, first).forward_sorted(x, bounds, self.out_features[first])
        h = self._gate_fn(self, h) if self.has_gate else self.act_fn(h)
        y = getattr(self, down).forward_sorted(h, bounds, self.out_features[down])
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        weights = top_k_weights.reshape(-1)[order]
        weights = weights.masked_fill(sorted_experts >= self.num_experts, 0.0)  # expert-parallel sentinels
        y = y.float() * weights.float().unsqueeze(-1)
        out = torch.zeros(num_tokens, y.shape[-1], dtype=torch.float32, device=y.device).index_add_(0, token, y)
        return out.to(hidden_states.dtype)
