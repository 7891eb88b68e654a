"""Architecture adapters: find every MoE block, its router, its fused expert tensors and their layout."""
from moecompress.arch.adapters import (
    SUPPORTED,
    ArchSpec,
    describe,
    experts_layout,
    is_experts_module,
    proj_bias,
    proj_weights,
    set_proj_weights,
    split_gate_up,
    supported_types,
)
from moecompress.arch.layout import ModelLayout, MoELayer, ProjSpec

__all__ = [
    "SUPPORTED", "ArchSpec", "ModelLayout", "MoELayer", "ProjSpec", "describe", "experts_layout",
    "is_experts_module", "proj_bias", "proj_weights", "set_proj_weights", "split_gate_up", "supported_types",
]
