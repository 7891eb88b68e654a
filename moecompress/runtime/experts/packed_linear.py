"""PackedLinear: a dense nn.Linear (attention, shared expert, dense MLP) stored group-wise quantized.

It is a one-expert PackedGroup, so its tensors follow the group naming with n = 1 (format/spec.py).

A decode step calls each PackedLinear with one or a few rows, where the general path's Python (hit slots, kernel
runs, index tensors) costs as much as the kernel itself on small projections (k_proj of refmoe-qwen3: 78 µs per call
against 17 µs in C++). Rows below the prefill kernel's crossover go straight to the registry's decode kernel (the
group's cached lookup): the same kernel with the same arguments as the general path, so the same numbers.
"""
from __future__ import annotations

import torch

from moecompress.runtime.experts.packed_group import PackedGroup, prefill_min_rows


class PackedLinear(PackedGroup):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 has_bias: bool, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__((0,), bits, in_features, out_features, group_size, symmetric, has_bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        x2 = x.reshape(rows, x.shape[-1])
        run = self._decode_run(x2)
        y = run(self, x2, [0], [rows]) if run is not None else self.linear_sorted(x2, [rows])  # [tokens, out]
        return y.reshape(*x.shape[:-1], self.out_features)

    def _decode_run(self, x: torch.Tensor):
        """The decode kernel's `run` that `linear_sorted` would take for x's rows on CPU, or None where the general
        path must run (bf16 or int4-layout weights, a bias, another device, rows for the prefill kernel)."""
        if (x.device.type != "cpu" or self.bits == 16 or self._int4 is not None or "bias" in self._buffers
                or self.qweight.device.type != "cpu"):
            return None
        decode, prefill = self._kernels(x.dtype)  # looked up once per dtype and setting
        if decode is prefill or x.shape[0] >= prefill_min_rows(prefill):
            return None
        return decode.run
