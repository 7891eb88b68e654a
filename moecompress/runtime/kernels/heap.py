"""Give the heap memory that a long CPU forward freed back to the operating system.

A prefill allocates tens of MB of transient buffers (each expert group's inputs and outputs, the C++ kernels' int8
activations and tiles). glibc's malloc serves those from its heap once its mmap threshold has adapted to them, and
keeps what is freed at the top of the heap for later calls: on the CPU benchmark's Qwen3-30B-A3B-shaped model at
2 bits, process RSS after a 512-token prefill and a decode stood 106 MB (20 % of the packed bytes) above what
`malloc_trim` leaves. `install(model)` trims once after every forward of at least TRIM_MIN_TOKENS tokens on CPU:
decode steps (a few tokens, small buffers) never trim, a prefill pays one trim (a few ms against a forward of
seconds) and page-faults its buffers in again next time. Elsewhere (not glibc, CUDA) it does nothing.

`mapped_zeros` is for long-lived buffers that are freed all at once (a decoder's KV cache): zeros on their own
anonymous mapping, so that they never enter malloc's free lists. Pages count in RSS only once written, and the
mapping goes back to the OS when the last tensor on it is freed. On refmoe-qwen3 the 2.4 MB cache of a batch-4
decoder otherwise stayed in the heap after the decoder was gone (with the prompt's cache, ~6.5 MB kept, session 27).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
from functools import cache

import torch

TRIM_MIN_TOKENS = 64
_ATTR = "_moecompress_heap_hook"


@cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim() -> bool:
    """malloc_trim(0): True where glibc released memory."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def _tokens(args, kwargs) -> int:
    for x in (kwargs.get("input_ids"), args[0] if args else None, kwargs.get("inputs_embeds")):
        if isinstance(x, torch.Tensor):
            return x.shape[:2].numel() if x.is_floating_point() else x.numel()
    return 0


def _after_forward(module, args, kwargs, output):
    if _tokens(args, kwargs) >= TRIM_MIN_TOKENS and next(module.parameters()).device.type == "cpu":
        trim()


def install(model) -> bool:
    """Trim after long CPU forwards of `model` (once per model); True if installed."""
    if _libc() is None or getattr(model, _ATTR, None) is not None:
        return False
    setattr(model, _ATTR, model.register_forward_hook(_after_forward, with_kwargs=True))
    return True


def mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Zeros of `shape` on their own anonymous mapping (unmapped when the last tensor on it is freed)."""
    numel = math.prod(shape)
    if numel == 0:
        return torch.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, numel * dtype.itemsize)  # zero pages; the tensor keeps the mapping alive
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)
