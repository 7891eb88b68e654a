"""The token-policy protocol, the registry of policies by name, and their composition.

A policy is any object with a `name`, a `stage` (one of STAGES) and
`__call__(ctx: LayerContext, plan: DispatchPlan, state: PolicyState) -> DispatchPlan`: it returns a changed copy of the
plan (never mutates it) and is a pure function of its arguments, so the runtime's dispatcher and the traffic replay
that call it get the same plan. Policies run in stage order dedup -> protect -> prune -> fuse -> precision (stable
within a stage: in the order given), starting from the lossless send-once plan (`plan.lossless_plan`).

Spec strings (command line, recipe): policies joined by `+`, each `name` or `name:knob=value,knob=value`, e.g.
`protect:first=4+prune_server:threshold=0.05,relative=true+precision:dispatch=int8` (`int8`, `fp8`, `bf16` alone:
that payload both ways). The same as a list of dicts
(`[{"name": "prune_server", "threshold": 0.05}]`) or one dict `{name: {knob: value}}`. An empty spec, None or "none"
is the lossless default. A user policy: a dataclass with ClassVars `name` and `stage` and knob fields, registered with
`register_policy(cls)` (or passed in a registry dict of your own to `build_pipeline`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol, runtime_checkable

import torch

from moecompress.errors import MoecompressError
from moecompress.execution.tokens.fuse import Fuse
from moecompress.execution.tokens.payload import check_precision
from moecompress.execution.tokens.plan import DispatchPlan, LayerContext, lossless_plan
from moecompress.execution.tokens.localize import Localize
from moecompress.execution.tokens.prune import Protect, PruneLayer, PruneServer, SkipWeakest, Substitute

STAGES = ("dedup", "protect", "prune", "fuse", "precision")


@dataclass(frozen=True, eq=False)
class PolicyState:
    """Read-only inputs of the policies, shared by all layers of a deployment."""

    similarity: torch.Tensor | None = None  # [L, E, E] expert similarity, for `substitute`
    copies: torch.Tensor | None = None  # [L, E] bool: the home holds a low-bit copy of expert e (`localize:copies=true`)


@runtime_checkable
class TokenPolicy(Protocol):
    name: str
    stage: str

    def __call__(self, ctx: LayerContext, plan: DispatchPlan, state: PolicyState) -> DispatchPlan: ...


@dataclass(frozen=True)
class PerPair:
    """The naive exchange, for comparison: one row per remote (token, expert) pair instead of once per server."""

    name: ClassVar[str] = "per_pair"
    stage: ClassVar[str] = "dedup"

    def __call__(self, ctx, plan, state):
        return replace(plan, per_pair=True, notes=plan.notes + (self.name,))


@dataclass(frozen=True)
class Precision:
    """Payload precision of the rows sent to the servers (`dispatch`) and of the rows they send back (`return`)."""

    name: ClassVar[str] = "precision"
    stage: ClassVar[str] = "precision"
    dispatch: str = "bf16"
    return_: str = "bf16"

    def __post_init__(self):
        check_precision(self.dispatch)
        check_precision(self.return_)

    def __call__(self, ctx, plan, state):
        return replace(plan, dispatch_precision=self.dispatch, return_precision=self.return_,
                       notes=plan.notes + (self.name,))


POLICIES: dict[str, type] = {cls.name: cls for cls in (PerPair, Protect, PruneServer, PruneLayer, SkipWeakest,
                                                        Substitute, Localize, Fuse, Precision)}


def register_policy(cls: type, registry: dict[str, type] = POLICIES) -> type:
    """Make a user policy class findable by its `name` (usable as a decorator)."""
    if not isinstance(getattr(cls, "name", None), str) or getattr(cls, "stage", None) not in STAGES:
        raise MoecompressError(f"a token policy class needs a str `name` and a `stage` in {', '.join(STAGES)}")
    registry[cls.name] = cls
    return cls


@dataclass(frozen=True)
class TokenPipeline:
    """Policies in stage order; `plan(ctx, state)` is the dispatch plan of one MoE layer."""

    policies: tuple = ()

    def __post_init__(self):
        names = [p.name for p in self.policies]
        if "per_pair" in names and "fuse" in names:
            raise MoecompressError("per_pair (the naive exchange) cannot be combined with fuse")

    def plan(self, ctx: LayerContext, state: PolicyState | None = None) -> DispatchPlan:
        plan = lossless_plan(ctx)
        for policy in self.policies:
            plan = policy(ctx, plan, state or PolicyState())
        return plan

    @property
    def spec(self) -> str:
        """The canonical spec string of this pipeline (`none` when lossless)."""
        parts = []
        for p in self.policies:
            knobs = [f"{_knob(f.name)}={_fmt(getattr(p, f.name))}" for f in dataclasses.fields(p)]
            parts.append(p.name + (":" + ",".join(knobs) if knobs else ""))
        return "+".join(parts) or "none"


def _knob(field_name: str) -> str:
    return field_name.rstrip("_")


def _fmt(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _convert(policy: str, knob: str, kind, value):
    kind = {"float": float, "int": int, "bool": bool, "str": str}.get(kind, kind) if isinstance(kind, str) else kind
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise MoecompressError(f"{policy}: {knob} must be true or false, got {value!r}")
            return text in ("true", "1", "yes")
        try:
            return kind(text)
        except ValueError:
            raise MoecompressError(f"{policy}: {knob} must be a {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MoecompressError(f"{policy}: {knob} must be a {kind.__name__}, got {value!r}")
    return value


PRECISION_ALIASES = ("native", "bf16", "int8", "fp8")  # `int8` = precision:dispatch=int8,return=int8


def make_policy(name: str, knobs: dict, registry: dict[str, type] = POLICIES):
    """One policy from its name and knob values (strings are parsed), validated."""
    if name in PRECISION_ALIASES and name not in registry and not knobs:
        return Precision(dispatch=name, return_=name)
    if name not in registry:
        raise MoecompressError(f"unknown token policy {name!r}; allowed: {', '.join(sorted(registry))} (and the "
                               f"payload shorthands {', '.join(PRECISION_ALIASES)})")
    cls = registry[name]
    fields = {_knob(f.name): f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    unknown = sorted(set(knobs) - set(fields))
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise MoecompressError(f"unknown knob(s) {', '.join(unknown)} for token policy {name!r}; allowed: {allowed}")
    kwargs = {fields[k].name: _convert(name, k, fields[k].type, v) for k, v in knobs.items()}
    return cls(**kwargs)


def parse_spec(spec) -> list[tuple[str, dict]]:
    """[(name, {knob: value})] of a spec string, a dict {name: {knobs}} or a list of {"name": ..., knob: ...}."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return []
    if isinstance(spec, str):
        out = []
        for part in spec.split("+"):
            name, _, rest = part.strip().partition(":")
            knobs = {}
            for item in filter(None, (s.strip() for s in rest.split(","))):
                key, eq, value = item.partition("=")
                if not eq:
                    raise MoecompressError(f"token policy knob {item!r} in {part.strip()!r} needs the form knob=value")
                knobs[key.strip()] = value.strip()
            out.append((name.strip(), knobs))
        return out
    if isinstance(spec, dict):
        return [(str(k), dict(v or {})) for k, v in spec.items()]
    if isinstance(spec, (list, tuple)):
        out = []
        for item in spec:
            if isinstance(item, str):
                out += parse_spec(item)
            elif isinstance(item, dict) and "name" in item:
                out.append((str(item["name"]), {k: v for k, v in item.items() if k != "name"}))
            else:
                raise MoecompressError(f"a token policy entry must be a spec string or a dict with 'name', "
                                       f"got {item!r}")
        return out
    raise MoecompressError(f"token policies must be a spec string, a dict or a list, got {type(spec).__name__}")


def build_pipeline(spec=None, registry: dict[str, type] = POLICIES) -> TokenPipeline:
    """The pipeline of a spec (see the module doc); policy objects in a list are taken as they are."""
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(p, TokenPolicy) for p in spec):
        policies = list(spec)
    else:
        policies = [make_policy(name, knobs, registry) for name, knobs in parse_spec(spec)]
    for p in policies:
        if getattr(p, "stage", None) not in STAGES:
            raise MoecompressError(f"token policy {p.name!r} has stage {getattr(p, 'stage', None)!r}; "
                                   f"allowed: {', '.join(STAGES)}")
    policies.sort(key=lambda p: STAGES.index(p.stage))
    return TokenPipeline(tuple(policies))
