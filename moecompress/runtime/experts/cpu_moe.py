"""The MoE layer of a few tokens (decode) on CPU in one C++ call (csrc/lowbit/moe.cpp).

Per token step, PackedExperts' general path routes in Python (sort, count, gather), calls each projection's groups
one by one and re-quantizes the activations per call: at batch 1 that overhead costs more than the experts' integer
dot products. Where the layer fits the fused call, every routed expert's gate_up projection, silu(gate) * up, the
down projection and the routing-weighted sum run in one call, with the same decode kernels the registry picks for
the groups (int8 activations x packed weights, kernel_registry.py), the activations quantized once per row and
projection, and the work split over (expert, block of output rows) across threads.

It applies (`fused_layer`) when: at most FUSED_MAX_TOKENS tokens; CPU tensors; every group of both projections is
format-packed (2/3/4/8-bit, not converted to the int4 layout) and the registry's decode kernel for it is a `q8_*`
one, all of one ISA (so x is bf16/fp16, or MOECOMPRESS_INT8_ACTIVATIONS=always); the experts module is the default
gated one (transformers' `_default_apply_gate` with SiLU), without bias or post-expert norm. Elsewhere the general
path runs. The result differs from the general path only by rounding: the gate_up output and the activation stay
float32 here (the general path rounds them to x's dtype between the calls).

`dense_layer` builds the same call with the layer's 16-bit groups included (moe.cpp computes them with a float32
GEMV); the whole-model CPU decode step (runtime/cpu_step/) uses it, the per-layer path above does not.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moecompress.errors import MoecompressError
from moecompress.runtime.kernels import cpu_features, cpu_lowbit, kernel_registry

# Tokens per call up to which the layer runs fused (decode steps of batch <= 8); MOECOMPRESS_CPU_FUSED_TOKENS=N sets
# another limit (0: never fused, e.g. to compare with the general path in eval/bench_cpu.py --compare-fused).
FUSED_MAX_TOKENS = 8
FUSED_TOKENS_ENV = "MOECOMPRESS_CPU_FUSED_TOKENS"
_CACHE_ATTR = "_cpu_moe_fused"  # per module: {settings key: FusedLayer or None}


@dataclass(frozen=True)
class FusedLayer:
    args: tuple  # both projections' groups (qweight, scales, zeros, bits lists) and expert maps, made once
    group_size: int
    isa: str
    op: str = "moe_decode"  # the C++ op: moe_decode, or moe_prefill (cpu_prefill.py: same arguments and result)

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H] in hidden's dtype."""
        return moe_decode(hidden, top_k_index, top_k_weights, self.args, self.group_size, self.isa, self.op)


def moe_decode(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, args, group_size: int,
               isa: str, op: str = "moe_decode") -> torch.Tensor:
    """The C++ call `op`: args = both projections' (qweight list, scales list, zeros list, bits list, expert map
    [experts, 2]); hidden [T, H] -> [T, H] in hidden's dtype."""
    y = getattr(cpu_lowbit._module(), op)(hidden.float().contiguous(), top_k_index.long().contiguous(),
                                          top_k_weights.float().contiguous(), *args, group_size,
                                          cpu_lowbit.ISA_ID[isa])
    return y.to(hidden.dtype)


def decode_isa(group, dtype: torch.dtype) -> str | None:
    """The ISA of the group's `q8_*` decode kernel for the format's packing, or None: the fused call does not apply."""
    kernel = kernel_registry.select(group.bits, "decode", group, dtype, layout="packed")
    return "cpu:" + kernel.name.removeprefix("q8_") if kernel.name.startswith("q8_") else None


def fused_layer(module, hidden: torch.Tensor) -> FusedLayer | None:
    """The fused call for this PackedExperts module and these hidden states, or None (the general path runs)."""
    if hidden.shape[0] > max_tokens() or hidden.device.type != "cpu":
        return None
    return cached_on(module, (hidden.dtype, *kernel_registry.settings()), lambda: build_layer(module, hidden.dtype))


def cached_on(module, key: tuple, build) -> FusedLayer | None:
    """The module's fused call for `key` (dtype / "dense" and the kernel settings), built once."""
    cache = module.__dict__.setdefault(_CACHE_ATTR, {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def max_tokens() -> int:
    value = os.environ.get(FUSED_TOKENS_ENV)
    if value is None:
        return FUSED_MAX_TOKENS
    if not value.isdigit():
        raise MoecompressError(f"{FUSED_TOKENS_ENV}={value!r}: give a whole number of tokens (0: never fused)")
    return int(value)


def gated_silu(module) -> bool:
    return (gated_silu_fn(module, module._gate_fn) and module.has_gate and not module.has_bias
            and not module.has_post_expert_norm and len(module.proj_names) == 2)


def gated_silu_fn(module, gate_fn) -> bool:
    """`gate_fn` (the gate function the module applies) is transformers' default ([gate; up] -> silu(gate) * up) and
    the module's act_fn is SiLU."""
    try:
        from transformers.activations import SiLUActivation
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return False
    return gate_fn is _default_apply_gate and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU))


def plain_fused_experts(experts) -> bool:
    """transformers' fused experts in the layout the C++ MoE calls compute: [gate; up] concatenated, not transposed,
    no biases, no post-expert norm, SiLU(gate) * up by the default gate function."""
    layout = (getattr(experts, "has_gate", True), getattr(experts, "is_concatenated", True),
              getattr(experts, "is_transposed", False), getattr(experts, "has_bias", False),
              getattr(experts, "has_post_expert_norm", False))
    gate_fn = getattr(type(experts), "_apply_gate", None)
    return layout == (True, True, False, False, False) and gated_silu_fn(experts, gate_fn)


def build_layer(module, dtype: torch.dtype, dense: bool = False) -> FusedLayer | None:
    """dense: 16-bit groups join the call too (moe.cpp computes them in float32 with its dense GEMV; the whole-model
    decode step, cpu_step/, uses that), else a layer holding any is left to the general path."""
    if not gated_silu(module) or not cpu_lowbit.available():
        return None
    first, down = (getattr(module, name) for name in module.proj_names)
    args, isas, group_sizes = [], set(), set()
    for proj in (first, down):
        groups = list(proj.children())
        qs, ss, zs, bits = [], [], [], []
        for g in groups:
            if not len(g.experts):
                return None
            if g.bits == 16:
                if not dense or g.weight.device.type != "cpu" or g.weight.dtype not in (torch.float32, torch.bfloat16) \
                        or "bias" in g._buffers:
                    return None
                qs.append(g.weight.contiguous())
                ss.append(torch.empty(0, dtype=torch.float16))
                zs.append(torch.empty(0, dtype=torch.uint8))
                bits.append(16)
                continue
            if g._int4 is not None or g.qweight.device.type != "cpu":
                return None
            isa = decode_isa(g, dtype)
            if isa is None:
                return None
            isas.add(isa)
            group_sizes.add(g.group_size)
            qs.append(g.qweight)
            ss.append(g.scales)
            zs.append(torch.empty(0, dtype=torch.uint8) if g.symmetric else g.zeros)
            bits.append(g.bits)
        where = torch.full((module.num_experts, 2), -1, dtype=torch.int64)  # expert -> (group, slot)
        for gi, g in enumerate(groups):
            for slot, e in enumerate(g.experts):
                if 0 <= e < module.num_experts:
                    where[e] = torch.tensor([gi, slot])
        args += [qs, ss, zs, bits, where]
    if len(isas) > 1 or len(group_sizes) > 1 or not (isas or dense):
        return None
    # only the experts both projections compute (ProjGroups.set_computed: the last lookup entry marks the others)
    for where, proj in ((args[4], first), (args[9], down)):
        for e in range(module.num_experts):
            if proj._lookup[e] == proj._lookup[-1]:
                where[e] = -1
    isa = isas.pop() if isas else dense_isa()
    if isa is None:
        return None
    return FusedLayer(tuple(args), group_sizes.pop() if group_sizes else 32, isa)


def dense_isa() -> str | None:
    """The ISA whose kernels a layer of 16-bit groups only runs with (the dense GEMV is AVX2 on x86 SIMD ISAs)."""
    best = cpu_features.best_isa()
    return {"cpu:amx": "cpu:avx512_vnni"}.get(best, best) if best in (*cpu_lowbit.ISA_ID, "cpu:amx") else None


def dense_layer(module) -> FusedLayer | None:
    """The fused call with 16-bit groups included (float32 GEMV), for the whole-model decode step; None where the
    layer does not fit it. Int8 activations for the packed groups whatever the model's dtype is not implied: the
    groups' decode kernels must be q8_* ones for bfloat16 activations (what a decode step of such a model takes)."""
    return cached_on(module, ("dense", *kernel_registry.settings()),
                     lambda: build_layer(module, torch.bfloat16, dense=True))
