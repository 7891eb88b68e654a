"""Byte accounting of the format: what a quantized matrix really costs on disk and in memory."""
from __future__ import annotations

import math

SCALE_BYTES = 2  # float16 scale per group
ZERO_BYTES = 1  # uint8 zero-point per group (asymmetric only)
BF16_BYTES = 2
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "I64": 8, "F64": 8}  # safetensors


def packed_weight_bytes(out_features: int, in_features: int, bits: int) -> int:
    """Bytes of the packed integer weights alone: exactly bits/8 per weight (16 = bf16)."""
    if bits == 16:
        return out_features * in_features * BF16_BYTES
    return out_features * math.ceil(in_features * bits / 8)


def metadata_bytes(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Bytes of scales (and zero-points) of a group-wise quantized matrix; 0 for bf16."""
    if bits == 16:
        return 0
    groups = out_features * math.ceil(in_features / group_size)
    return groups * (SCALE_BYTES + (0 if symmetric else ZERO_BYTES))


def matrix_bytes(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Total bytes of one stored matrix: packed weights plus metadata (biases not included)."""
    return packed_weight_bytes(out_features, in_features, bits) + metadata_bytes(
        out_features, in_features, bits, group_size, symmetric
    )
