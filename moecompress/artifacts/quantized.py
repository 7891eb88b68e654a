"""QuantizedTensors: the quantize stage's output, one QuantizedWeight per expert projection / dense linear.

Keys: "<experts_path>.<proj>.<expert>" for experts (see `expert_key`), the module path for dense linears.
On disk: `quantized.safetensors` (packed qweight, scales, zeros per key) + `quantized.json` (bits, group size,
fallbacks), so export can run without re-quantizing. The low-bit copies of the experts (when the plan has copy_bits)
are a second QuantizedTensors in the same directory under the stem `copies` (`copies.safetensors`, `copies.json`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moecompress.format.pack import dequantize_unpacked, pack, unpack

TENSORS_FILE = "quantized.safetensors"
META_FILE = "quantized.json"
COPIES_STEM = "copies"


def expert_key(experts_path: str, proj: str, expert: int) -> str:
    return f"{experts_path}.{proj}.{expert}"


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized matrix, unpacked (the quantizers' output; `packed()` is what the format stores)."""

    q: torch.Tensor  # uint8 [..., out, in], unpacked integers in 0..2**bits-1
    scales: torch.Tensor  # float16 [..., out, in/group_size]
    zeros: torch.Tensor | None  # uint8 [..., out, in/group_size]; None when symmetric (z = 2**(bits-1))
    bits: int
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Weights [..., out, in] as the runtime computes them."""
        return dequantize_unpacked(self.q, self.scales, self.zeros, self.bits, self.group_size, dtype)

    def packed(self) -> torch.Tensor:
        """The packed integers [..., out, in*bits/8] that the format stores as `qweight`."""
        return pack(self.q, self.bits)


@dataclass(frozen=True, eq=False)
class QuantizedTensors:
    weights: dict  # key -> QuantizedWeight
    fallbacks: dict[str, str] = field(default_factory=dict)  # key -> why RTN was used instead of GPTQ
    method: str = "rtn"

    def save(self, directory: str | Path, stem: str = "quantized") -> None:
        """`stem`.safetensors and `stem`.json in `directory` (quantized.*, or copies.* for the low-bit copies)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, meta = {}, {}
        for key, qw in self.weights.items():
            tensors[f"{key}::qweight"] = qw.packed().contiguous()
            tensors[f"{key}::scales"] = qw.scales.contiguous()
            if qw.zeros is not None:
                tensors[f"{key}::zeros"] = qw.zeros.contiguous()
            meta[key] = {"bits": qw.bits, "group_size": qw.group_size, "in_features": qw.q.shape[-1]}
        save_file(tensors, directory / f"{stem}.safetensors")
        (directory / f"{stem}.json").write_text(json.dumps(
            {"method": self.method, "fallbacks": self.fallbacks, "weights": meta}, indent=1, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path, stem: str = "quantized") -> "QuantizedTensors":
        directory = Path(directory)
        meta = json.loads((directory / f"{stem}.json").read_text())
        tensors = load_file(directory / f"{stem}.safetensors")
        weights = {}
        for key, m in meta["weights"].items():
            q = unpack(tensors[f"{key}::qweight"], m["bits"], m["in_features"])
            weights[key] = QuantizedWeight(q=q, scales=tensors[f"{key}::scales"], zeros=tensors.get(f"{key}::zeros"),
                                           bits=m["bits"], group_size=m["group_size"])
        return cls(weights=weights, fallbacks=meta["fallbacks"], method=meta["method"])
