"""Feed a RoutingRecorder from a running model, inside a `with RoutingHooks(...)` block.

Experts: transformers 5.x experts classes dispatch their forward through `ALL_EXPERTS_FUNCTIONS`
(`transformers/integrations/moe.py`) on `experts.config._experts_implementation`, *after* routing: the function
receives (experts module, hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]). We register one
stateless function under "moecompress_calibrate"; inside the block, the config object each experts module reads is
switched to that name and the module carries a tap (recorder + MoE layer + the implementation that was active:
"eager" = the class's own forward, or e.g. "grouped_mm"); the function records, then calls that implementation, so
outputs are unchanged. On exit the configs get back their exact previous value and the taps are removed.

Why not the config setter or `model.set_experts_implementation`: the setter recurses into sub-configs and
`set_experts_implementation` validates and walks sub-models; we switch exactly the config objects the experts read
(`experts.config`, a sub-config for multimodal models) through `_experts_implementation_internal` and restore them.

An experts module that does not go through the interface gets a forward pre-hook instead (its forward also
takes hidden_states, top_k_index, top_k_weights). Dense linears (attention, shared experts, dense MLPs) get a
forward pre-hook that accumulates the Hessian of their input.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from moecompress.arch import ModelLayout, MoELayer
from moecompress.arch.experts_call import routing_args
from moecompress.calibrate.recorder import RoutingRecorder
from moecompress.errors import MoecompressError

INTERFACE_NAME = "moecompress_calibrate"
_TAP_ATTR = "_moecompress_calibrate_tap"
def _recording_experts_forward(self, *args, **kwargs):
    tap = self.__dict__.get(_TAP_ATTR)
    if tap is None:
        raise RuntimeError(f"experts implementation {INTERFACE_NAME!r} is active outside a RoutingHooks block")
    return tap(self, *args, **kwargs)


def _ensure_registered() -> None:
    if INTERFACE_NAME not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(INTERFACE_NAME, _recording_experts_forward)


def uses_experts_interface(experts: nn.Module) -> bool:
    """True when the module's forward dispatches through ALL_EXPERTS_FUNCTIONS on its config."""
    fwd = type(experts).forward
    return (getattr(fwd, "__wrapped__", None) is not None and hasattr(experts, "config")
            and hasattr(experts.config, "_experts_implementation_internal"))


class _Tap:
    """Records one experts call, then runs the implementation that was active before the block."""

    def __init__(self, recorder: RoutingRecorder, moe_layer: MoELayer, original):
        self.recorder, self.moe_layer, self.original = recorder, moe_layer, original

    def __call__(self, module, *args, **kwargs):
        self.recorder.record_experts(self.moe_layer, module, *routing_args(args, kwargs))
        return self.original(module, *args, **kwargs)


class RoutingHooks:
    """`with RoutingHooks(model, layout, recorder, dense_paths):` every forward inside feeds `recorder`."""

    def __init__(self, model: nn.Module, layout: ModelLayout, recorder: RoutingRecorder,
                 dense_paths: Iterable[str] = ()):
        self.model, self.layout, self.recorder = model, layout, recorder
        self.dense_paths = tuple(dense_paths)
        self._configs: dict[int, tuple[object, str | None]] = {}  # id(config) -> (config, previous value)
        self._tapped: list[nn.Module] = []
        self._handles = []

    def __enter__(self) -> "RoutingHooks":
        _ensure_registered()
        try:
            for m in self.layout.moe_layers:
                experts = self.model.get_submodule(m.experts_path)
                if _TAP_ATTR in experts.__dict__:
                    raise MoecompressError(f"{m.experts_path} is already being recorded (nested RoutingHooks?)")
                if uses_experts_interface(experts):
                    cfg = experts.config
                    impl = cfg._experts_implementation_internal
                    if impl == INTERFACE_NAME:
                        impl = self._configs[id(cfg)][1]
                    original = ALL_EXPERTS_FUNCTIONS.get_interface(impl or "eager", type(experts).forward.__wrapped__)
                    experts.__dict__[_TAP_ATTR] = _Tap(self.recorder, m, original)
                    self._tapped.append(experts)
                    if id(cfg) not in self._configs:
                        self._configs[id(cfg)] = (cfg, impl)
                        cfg._experts_implementation_internal = INTERFACE_NAME
                else:
                    self._handles.append(experts.register_forward_pre_hook(self._pre_hook(m), with_kwargs=True))
            for path in self.dense_paths:
                mod = self.model.get_submodule(path)
                if not isinstance(mod, nn.Linear):
                    raise MoecompressError(f"dense Hessian path {path!r} is a {type(mod).__name__}, not nn.Linear")
                self._handles.append(mod.register_forward_pre_hook(self._dense_hook(path), with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _pre_hook(self, moe_layer: MoELayer):
        def hook(module, args, kwargs):
            self.recorder.record_experts(moe_layer, module, *routing_args(args, kwargs))
        return hook

    def _dense_hook(self, path: str):
        def hook(module, args, kwargs):
            self.recorder.record_dense(path, args[0] if args else kwargs["input"])
        return hook

    def __exit__(self, *exc) -> None:
        for cfg, impl in self._configs.values():
            cfg._experts_implementation_internal = impl
        for experts in self._tapped:
            experts.__dict__.pop(_TAP_ATTR, None)
        for h in self._handles:
            h.remove()
        self._configs.clear()
        self._tapped.clear()
        self._handles.clear()
