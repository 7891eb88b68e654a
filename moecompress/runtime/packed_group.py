"""One (projection, bit-width) group of a MoE layer's experts, stored packed and computed from the packed form.

A group holds n experts (ids in `experts`) in the tensors the format names (see format/spec.py). On CPU, 4-bit groups
are converted once by `prepare()` to PyTorch's int4 kernel layout (same size as our packed bytes); 2/3/8-bit groups
dequantize only the experts a batch hits, together, for the duration of one call; 16-bit groups hold bf16 weights.
"""
from __future__ import annotations

import torch
from torch import nn

from moecompress.format.pack import dequantize, pack
from moecompress.runtime import cpu_int4


class PackedGroup(nn.Module):
    def __init__(
        self,
        experts: tuple[int, ...],
        bits: int,
        in_features: int,
        out_features: int,
        group_size: int,
        symmetric: bool,
        has_bias: bool,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.experts = tuple(experts)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.in_features, self.out_features = in_features, out_features
        n, kw = len(experts), dict(device=device)
        if bits == 16:
            self.register_buffer("weight", torch.empty(n, out_features, in_features, dtype=dtype, **kw))
        else:
            ngroups = in_features // group_size
            self.register_buffer("qweight", torch.empty(n, out_features, in_features * bits // 8, dtype=torch.uint8, **kw))
            self.register_buffer("scales", torch.empty(n, out_features, ngroups, dtype=torch.float16, **kw))
            if not symmetric:
                self.register_buffer("zeros", torch.empty(n, out_features, ngroups, dtype=torch.uint8, **kw))
        if has_bias:
            self.register_buffer("bias", torch.empty(n, out_features, dtype=dtype, **kw))
        self.slot = {e: i for i, e in enumerate(self.experts)}  # expert id -> row in the stacked tensors
        self._int4: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per slot: (packed, scales_and_zeros)

    # -- kernels ---------------------------------------------------------------------------------------------------
    def prepare(self, compute_dtype: torch.dtype) -> None:
        """Convert 4-bit groups on CPU to the int4 kernel layout, dropping our packed copy (no duplicate in memory)."""
        if self.bits != 4 or self.qweight.device.type != "cpu" or not cpu_int4.available() or len(self.experts) == 0:
            return
        from moecompress.format.pack import unpack

        zeros = getattr(self, "zeros", None)
        self._int4 = [
            (
                cpu_int4.pack_int4(unpack(self.qweight[i], 4, self.in_features)),
                cpu_int4.scales_and_zeros(self.scales[i], None if zeros is None else zeros[i], compute_dtype),
            )
            for i in range(len(self.experts))
        ]
        del self._buffers["qweight"]
        self._register_state_dict_hook(_restore_qweight)

    def linear(self, slots: list[int], chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """For each hit expert slot, its rows x [m, in] -> [m, out]; all slots of the group in one call."""
        if self._int4 is not None:
            outs = [cpu_int4.int4_linear(x, self._int4[s][0], self.group_size, self._int4[s][1]).to(x.dtype)
                    for s, x in zip(slots, chunks)]
        else:
            w = self.dequantized(slots, chunks[0].dtype)  # [len(slots), out, in], transient
            outs = [x @ w[i].t() for i, x in enumerate(chunks)]
        if "bias" in self._buffers:
            outs = [y + self.bias[s].to(y.dtype) for s, y in zip(slots, outs)]
        return outs

    def dequantized(self, slots: list[int] | None = None, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """[len(slots), out, in] weights of the given slots (all when None)."""
        idx = list(range(len(self.experts))) if slots is None else slots
        if self.bits == 16:
            return self.weight[idx].to(dtype)
        zeros = self.zeros[idx] if not self.symmetric else None
        if self._int4 is not None:
            q = torch.stack([cpu_int4.unpack_int4(self._int4[s][0], self.in_features, self.group_size) for s in idx])
            qweight = pack(q, 4)
        else:
            qweight = self.qweight[idx]
        return dequantize(qweight, self.scales[idx], zeros, self.bits, self.group_size, self.in_features, dtype)

    def extra_repr(self) -> str:
        kernel = "int4-cpu" if self._int4 is not None else ("bf16" if self.bits == 16 else "dequant")
        return f"bits={self.bits}, experts={len(self.experts)}, in={self.in_features}, out={self.out_features}, kernel={kernel}"


def _restore_qweight(module: PackedGroup, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict of a prepared 4-bit group: put back `qweight` in the format's packing, exactly."""
    if module._int4 is None:
        return
    q = torch.stack([cpu_int4.unpack_int4(p, module.in_features, module.group_size) for p, _ in module._int4])
    state_dict[prefix + "qweight"] = pack(q, 4)
