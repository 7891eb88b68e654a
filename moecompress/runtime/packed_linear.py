"""PackedLinear: a dense nn.Linear (attention, shared expert, dense MLP) stored group-wise quantized.

It is a one-expert PackedGroup, so its tensors follow the group naming with n = 1 (format/spec.py).
"""
from __future__ import annotations

import torch

from moecompress.runtime.packed_group import PackedGroup


class PackedLinear(PackedGroup):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 has_bias: bool, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__((0,), bits, in_features, out_features, group_size, symmetric, has_bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_sorted(x.reshape(-1, x.shape[-1]), [x.numel() // x.shape[-1]])  # [tokens, out], one slot
        return y.reshape(*x.shape[:-1], self.out_features)
