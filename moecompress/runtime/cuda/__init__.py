"""CUDA kernels for packed experts (Triton): see kernels.py and decode.py for the math, hopper.py for the sm90 prefill
(Gluon, wgmma), routing.py for the device-side routing, experts.py for the MoE layer and the group-level entry that
kernel_registry.py lists under ("cuda", bits, path), pairs.py and launcher.py for the few-token plan and its
launches, graph_decode.py for generation (greedy or sampled, left-padded batches) with each step one CUDA graph replay
(the token pick: runtime/sampling.py).

Importing this package never needs Triton or a GPU: `available()` says whether the kernels can run here, and why not.
"""
from __future__ import annotations

import importlib.util
from functools import cache

import torch


@cache
def unavailable_reason() -> str | None:
    """None when the Triton kernels can run in this process, else why not (for skips and fallbacks)."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    return None


def available() -> bool:
    return unavailable_reason() is None
