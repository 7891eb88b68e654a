"""The prefill of bf16 / float16 (unquantized) MoE models on CPUs without native bf16 compute, through our C++ GEMM.

On an AVX2-only CPU (AMD EPYC Zen 1-3, Intel before Cooper Lake) torch's bf16 matmul converts every element on every
use: ~13-17 GFLOP/s on one core where a float32 GEMM reaches ~100 (eval/results/cpu_bf16_avx2_s28.md). The C++ GEMM
of csrc/lowbit/gemm16.h packs panels of weight rows converted to float32 once per call and runs a register-blocked
FMA micro-kernel at the float32 rate, reading the 16-bit weights in place (no float32 copy of the model).

`Gemm16Prefill(model)` (a `with` block, or a handle with `.remove()`) switches, for the forwards inside it:
- the experts of every MoE layer that transformers' experts interface dispatches (fused gate_up_proj [E, 2I, H] /
  down_proj [E, H, I], 16-bit, on the CPU, the default SiLU gate) to one C++ call per layer for calls of more than
  MIN_TOKENS tokens (moe_prefill16: routing sort, gate_up, silu(gate) * up, down, the weighted sum, all threaded);
  fewer tokens (decode through transformers) run the implementation that was active before;
- the dense 16-bit nn.Linear modules named in DENSE_LINEARS (attention q/k/v/o; not lm_head: a prefill keeps only
  the last token's logits, one row) to linear16 for inputs of more than MIN_TOKENS rows: an instance attribute
  `forward` on those modules inside the block, deleted on leaving it.
It applies only where `gemm16_isa()` names an ISA: auto (default) where the CPU lacks native bf16 compute
(cpu_features: no AMX, no AVX512_BF16 on the ISA in use; MOECOMPRESS_CPU_ISA=cpu:avx2 counts as AVX2-only), on the
x86 SIMD ISAs (measured there; ARM keeps torch's); MOECOMPRESS_CPU_GEMM16=always / never overrides.
CpuDecoder.prefill (the prompt of a CPU generation) runs its forward inside this block.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.runtime.experts import cpu_moe
from moecompress.runtime.kernels import cpu_features, cpu_lowbit

GEMM16_ENV = "MOECOMPRESS_CPU_GEMM16"
INTERFACE_NAME = "moecompress_cpu_gemm16"
MIN_TOKENS = 8  # calls of more tokens take the GEMM (a decode step of batch <= 8 keeps its own path)
DENSE_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
_STATE_ATTR = "_moecompress_gemm16"  # per experts module while switched: the implementation active before
DTYPES = (torch.bfloat16, torch.float16)


def gemm16_isa() -> str | None:
    """The ISA whose 16-bit GEMM runs bf16 / float16 prefills here, or None (torch's matmul: native bf16, or not
    measured on this ISA)."""
    mode = os.environ.get(GEMM16_ENV, "auto")
    if mode not in ("auto", "always", "never"):
        raise MoecompressError(f"{GEMM16_ENV}={mode!r}; allowed: auto, always, never")
    if mode == "never" or not cpu_lowbit.available():
        return None
    isa = cpu_features.best_isa()
    if mode == "always":
        return isa if isa in cpu_lowbit.ISA_ID else "cpu:avx512_vnni" if isa == "cpu:amx" else "cpu:portable"
    native = isa == "cpu:amx" or (isa == "cpu:avx512_vnni" and "avx512_bf16" in cpu_features.detect().flags)
    return isa if isa in ("cpu:avx2", "cpu:avx512_vnni") and not native else None


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The registered experts implementation: the C++ layer for many tokens, else the one active before."""
    state = self.__dict__.get(_STATE_ATTR)
    if state is None:
        raise RuntimeError(f"experts implementation {INTERFACE_NAME!r} is active outside a Gemm16Prefill block")
    original, isa = state
    if hidden_states.shape[0] <= MIN_TOKENS or hidden_states.device.type != "cpu":
        return original(self, hidden_states, top_k_index, top_k_weights)
    return cpu_lowbit.moe_prefill16(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, isa)


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if INTERFACE_NAME not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(INTERFACE_NAME, _experts_forward)


def fits(experts: nn.Module) -> bool:
    """A fused experts module the C++ layer computes: dispatched through transformers' experts interface, 16-bit
    contiguous [gate; up] -> SiLU(gate) * up -> down on the CPU, no biases / transposes / post-expert norms."""
    fwd = type(experts).forward
    if getattr(fwd, "__wrapped__", None) is None or not hasattr(getattr(experts, "config", None),
                                                                 "_experts_implementation_internal"):
        return False
    gate_up, down = (getattr(experts, n, None) for n in ("gate_up_proj", "down_proj"))
    if not all(isinstance(w, torch.Tensor) and w.dim() == 3 and w.dtype in DTYPES and w.device.type == "cpu"
               and w.is_contiguous() for w in (gate_up, down)):
        return False
    return (gate_up.dtype == down.dtype and gate_up.shape[1] == 2 * down.shape[2]
            and gate_up.shape[2] == down.shape[1] and cpu_moe.plain_fused_experts(experts))


def _linear_forward(module: nn.Linear, isa: str):
    """The linear's forward inside the block: linear16 for more than MIN_TOKENS rows, else nn.Linear's own."""
    def forward(x):
        if x.dim() < 2 or x.numel() // x.shape[-1] <= MIN_TOKENS or x.device.type != "cpu":
            return nn.Linear.forward(module, x)
        y = cpu_lowbit.linear16(x.reshape(-1, x.shape[-1]), module.weight, isa)
        if module.bias is not None:
            y = y + module.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return forward


class Gemm16Prefill:
    """`with Gemm16Prefill(model):` forwards inside run the C++ GEMM for 16-bit experts and dense linears (see the
    module docstring); nothing changes where gemm16_isa() is None or nothing fits. `.remove()` = leaving the block."""

    def __init__(self, model: nn.Module, dense: bool = True):
        self.model, self.dense = model, dense
        self.isa = gemm16_isa()
        self._configs: dict[int, tuple[object, str | None]] = {}
        self._switched: list[nn.Module] = []
        self._linears: list[nn.Linear] = []
        self.experts = self.linears = 0  # how many were switched (tests, benches)

    def __enter__(self) -> "Gemm16Prefill":
        if self.isa is None:
            return self
        try:
            self._switch()
        except BaseException:
            self.remove()
            raise
        return self

    def _switch(self) -> None:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        _register()
        for name, module in self.model.named_modules():
            if fits(module):
                if _STATE_ATTR in module.__dict__:
                    raise MoecompressError(f"{name} is already switched (nested Gemm16Prefill?)")
                cfg = module.config
                impl = cfg._experts_implementation_internal
                if impl == INTERFACE_NAME:
                    impl = self._configs[id(cfg)][1]
                original = ALL_EXPERTS_FUNCTIONS.get_interface(impl or "eager", type(module).forward.__wrapped__)
                module.__dict__[_STATE_ATTR] = (original, self.isa)
                self._switched.append(module)
                self._configs.setdefault(id(cfg), (cfg, impl))
                cfg._experts_implementation_internal = INTERFACE_NAME
                self.experts += 1
            elif (self.dense and isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in DENSE_LINEARS
                  and module.weight.dtype in DTYPES and module.weight.device.type == "cpu"
                  and module.weight.is_contiguous()):
                if "forward" in module.__dict__:
                    raise MoecompressError(f"{name} already has its own forward (nested Gemm16Prefill?)")
                module.forward = _linear_forward(module, self.isa)  # this instance only, until remove()
                self._linears.append(module)
                self.linears += 1

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for cfg, impl in self._configs.values():
            cfg._experts_implementation_internal = impl
        for module in self._switched:
            module.__dict__.pop(_STATE_ATTR, None)
        for module in self._linears:
            module.__dict__.pop("forward", None)
        self._configs.clear()
        self._switched.clear()
        self._linears.clear()
