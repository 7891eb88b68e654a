"""How big a model is: bytes and average bits of a moecompress checkpoint (from its safetensors headers, no
model load) or of a plain model (its parameters counted as bf16)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from moecompress.evaluate.result import ModelSize
from moecompress.runtime.loading.inspect import checkpoint_report, tensor_table
from moecompress.format.spec import read_spec


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def checkpoint_size(directory: str | Path) -> ModelSize:
    """Size of a moecompress checkpoint directory.

    avg_bits: mean over the routed-expert weights of their nominal bits, weighted by weight count (from
    checkpoint_report); stored_bits: the routed experts' stored bytes (scales, zero-points, biases) x 8 per weight.
    bits_per_weight: all stored bytes x 8 over all weights, where a packed group counts its unpacked weights and any
    other tensor (embeddings, norms, attention) its elements.
    """
    report = checkpoint_report(directory)
    spec = read_spec(directory)
    table = tensor_table(directory)
    expert_weights = sum(lay["bf16_bytes"] for lay in report["layers"]) // 2
    expert_bit_weights = sum(lay["avg_bits"] * lay["bf16_bytes"] / 2 for lay in report["layers"])
    linear_weights = 0
    for path, bits in spec.linears.items():
        shape = table[f"{path}.scales"][0]  # [1, out, in / group_size]
        linear_weights += shape[1] * shape[2] * spec.group_size
    packed = tuple(p + "." for p in list(spec.experts) + list(spec.linears))
    other = sum(_numel(shape) for key, (shape, _) in table.items() if not key.startswith(packed))
    weights = expert_weights + linear_weights + other
    total = report["total_bytes"]
    return ModelSize(bytes=total, bf16_bytes=2 * weights,
                     avg_bits=expert_bit_weights / expert_weights if expert_weights else 16.0,
                     bits_per_weight=8 * total / weights if weights else 16.0, source="checkpoint",
                     stored_bits=8 * report["expert_bytes"] / expert_weights if expert_weights else 16.0)


def parameter_size(model: nn.Module) -> ModelSize:
    """A plain (uncompressed) model: its parameters in bf16, tied weights counted once; 16 bits."""
    seen, weights = set(), 0
    for p in model.parameters():
        ptr = p.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            weights += p.numel()
    return ModelSize(bytes=2 * weights, bf16_bytes=2 * weights, avg_bits=16.0, bits_per_weight=16.0,
                     source="parameters", stored_bits=16.0)
