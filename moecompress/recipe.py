"""Recipes: YAML files that map 1:1 onto frozen dataclasses. Unknown keys and bad values are errors.

A recipe fixes every input of `moecompress quantize`, so a run is reproducible; the run writes its resolved recipe
plus package versions and input hashes as `recipe.lock.yaml`, itself a valid recipe.
"""
from __future__ import annotations

import dataclasses
import re
import typing
import warnings
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path

import yaml

from moecompress.errors import MoecompressError


class Quantizer(str, Enum):
    RTN = "rtn"
    GPTQ = "gptq"


class Clip(str, Enum):
    MINMAX = "minmax"  # each group's grid spans its [min, max]
    MSE = "mse"  # the range shrink with the least (diag-Hessian weighted) squared rounding error


class Granularity(str, Enum):
    EXPERT = "expert"  # one bit-width per expert (all its projections)
    PROJECTION = "projection"  # gate_up / up and down separately


class SensitivityMethod(str, Enum):
    HESSIAN = "hessian"  # tr(dW H dW^T) with the routing-weighted Hessians
    MEASURED = "measured"  # actual MoE-block output error on held-out calibration tokens
    LOSS_AWARE = "loss_aware"  # block output error weighted by squared loss gradients
    KL = "kl"  # the model's next-token KL with one item alone quantized (one forward per item and bits)


class Solver(str, Enum):
    AUTO = "auto"
    MILP = "milp"
    LAGRANGIAN = "lagrangian"


@dataclass(frozen=True)
class CalibrationConfig:
    dataset: str = "builtin:stdlib-calib"  # .txt / .jsonl(.gz) path, builtin:NAME, or hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]
    samples: int = 128
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    all_experts: bool = True  # also feed every token to every expert, for the Hessians of rare experts
    min_tokens: int = 16  # below this an expert's routed Hessian is replaced by its all-tokens Hessian
    layerwise: bool = False  # one decoder layer in memory at a time
    # share of the calibration documents (by characters, per domain) held back for the sensitivity stage
    # (calibrate/split.py): it measures on sensitivity.holdout x samples sequences of them, with candidates made
    # from the Hessians of the other sequences; GPTQ still uses all. 0 (measured better): the sensitivity runs the
    # last sensitivity.holdout share of the calibration sequences themselves
    held_back: float = 0.0


@dataclass(frozen=True)
class SensitivityConfig:
    method: SensitivityMethod = SensitivityMethod.HESSIAN
    granularity: Granularity = Granularity.EXPERT
    holdout: float = 0.25  # share of calibration sequences held out by the measured / loss-aware methods
    # how each candidate's weights are made when its cost is measured: rtn (fast proxy) or gptq (the quantize
    # stage's GPTQ rules, so the cost is that of the weights the export writes; slower: one GPTQ per expert & bits)
    quantizer: Quantizer = Quantizer.RTN
    # measured methods: rescale each MoE layer's costs to the real KL with the whole layer quantized
    # (sensitivity/layer_scale.py)
    layer_scale: bool = False


@dataclass(frozen=True)
class BudgetConfig:
    avg_bits: float | None = None  # nominal bits per routed-expert weight (the bytes of that many bits per weight
    # plus the group scales/zero-points every quantized weight carries; reports give stored_bits with them too)
    megabytes: float | None = None  # or: total routed-expert bytes, in MiB
    servers: str | None = None  # or: what fits on these servers, e.g. "4x64MB" (their memory less the dense weights)

    def __post_init__(self):
        given = [v for v in (self.avg_bits, self.megabytes, self.servers) if v is not None]
        if len(given) != 1:
            raise MoecompressError("budget: give exactly one of avg_bits, megabytes or servers")
        if self.servers is None and given[0] <= 0:
            raise MoecompressError(f"budget: must be positive, got {given[0]}")


@dataclass(frozen=True)
class AllocationConfig:
    budget: BudgetConfig = field(default_factory=lambda: BudgetConfig(avg_bits=3.0))
    candidates: tuple[int, ...] = (2, 3, 4, 8)
    min_bits: int = 2
    max_bits: int = 16
    layer_min_bits: dict[int, int] = field(default_factory=dict)  # MoE layer -> minimum bits
    solver: Solver = Solver.AUTO
    # dense linear groups ("attention", "shared_experts", "dense_mlp") allocated in the same budget as the experts,
    # from their loss-aware costs, instead of fixed by protect: the budget grows by their bytes at the protect bits
    # (so avg_bits keeps its meaning), and they take the candidates' bits. Needs sensitivity.method loss_aware.
    dense: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantizeConfig:
    method: Quantizer = Quantizer.GPTQ
    group_size: int = 64
    symmetric: bool = False
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False  # static groups when true; off measured better on refmoe-qwen3 (eval/bench_quality.py)
    clip: Clip = Clip.MSE


@dataclass(frozen=True)
class TuneConfig:
    """Post-quantization steps, in this order: block-wise output reconstruction of the scales
    (quantize/blockwise.py), end-to-end scale tuning (quantize/tune.py), router refit (quantize/router.py).
    Each is off at 0 steps."""

    steps: int = 0
    lr: float = 3e-3
    batch_size: int = 16  # calibration sequences per step
    holdout: float = 0.1  # share of the calibration sequences kept out for the before/after check
    seed: int = 0
    blockwise_steps: int = 0  # Adam steps per MoE layer fitting its scales to the layer's output (0: off)
    router_steps: int = 0  # L-BFGS steps refitting each router to the quantized model's routing (0: off)


@dataclass(frozen=True)
class ProtectConfig:
    """Pins by rule; the router is never quantized. 16 keeps bf16."""

    attention: int = 16
    shared_experts: int = 16
    dense_mlp: int = 16
    # the output projection: per decoded token it is read whole (a third to a half of all bytes read on a
    # Qwen3-30B-A3B-shaped model); quantized by round to nearest with quantize.clip's range search (no Hessian is
    # recorded for it); refused where the model ties it to the input embeddings
    lm_head: int = 16
    first_layers: int = 0  # pin every expert of the first N MoE layers to pin_bits
    last_layers: int = 0
    pin_bits: int = 8


@dataclass(frozen=True)
class StoreConfig:
    """What the checkpoint holds for the runtime's expert store (issue 12)."""

    copy_bits: int | None = None  # a second copy of every routed expert at these bits (2, 3, 4 or 8), for
    # computing a missing expert at low precision; its bytes come out of allocation.budget; null: no copies


@dataclass(frozen=True)
class EvalConfig:
    dataset: str = "builtin:stdlib-eval"
    samples: int = 32
    seq_len: int = 256
    seed: int = 1


@dataclass(frozen=True)
class Recipe:
    model: str
    output: str
    revision: str | None = None
    dtype: str = "bfloat16"  # dtype of the checkpoint's float tensors
    compute_dtype: str = "float32"  # dtype the model is loaded in for calibration, sensitivity and quantization
    device: str = "cpu"  # where calibration, sensitivity, GPTQ and tuning run: "cpu", "cuda" or "cuda:N"
    # "none": the whole model on `device`; "layer": the model stays in host memory and one decoder layer at a time
    # is on `device` while it computes (pipeline/offload.py); "auto": "layer" when the model does not fit on it
    offload: str = "none"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    eval: EvalConfig | None = None
    # token policies of the edge runtime's expert model (execution/tokens: a spec string, a list of {name: ..., knob:
    # ...} or a mapping {name: {knob: ...}}); `moecompress generate/run/eval --bundles --tokens RECIPE.yaml` reads it
    tokens: typing.Any = None
    lock: dict | None = None  # written by a run (versions, input hashes); checked when present

    def __post_init__(self):
        validate(self)


DTYPES = ("bfloat16", "float16", "float32")
DENSE_GROUPS = ("attention", "shared_experts", "dense_mlp")
ALLOWED_BITS = (2, 3, 4, 8, 16)
COPY_BITS = (2, 3, 4, 8)  # store.copy_bits (artifacts/bit_plan.py COPY_BITS)


def validate(r: Recipe) -> None:
    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise MoecompressError(f"recipe key {key}: {msg}")

    need(r.dtype in DTYPES, "dtype", f"got {r.dtype!r}; allowed: {', '.join(DTYPES)}")
    need(r.compute_dtype in DTYPES, "compute_dtype", f"got {r.compute_dtype!r}; allowed: {', '.join(DTYPES)}")
    need(isinstance(r.device, str) and re.fullmatch(r"cpu|cuda(:[0-9]+)?", r.device) is not None, "device",
         f"got {r.device!r}; allowed: cpu, cuda, cuda:N")
    c = r.calibration
    need(c.samples > 0, "calibration.samples", f"must be > 0, got {c.samples}")
    need(c.seq_len > 1, "calibration.seq_len", f"must be > 1, got {c.seq_len}")
    need(c.batch_size > 0, "calibration.batch_size", f"must be > 0, got {c.batch_size}")
    need(0 < r.sensitivity.holdout < 1, "sensitivity.holdout", f"must be in (0, 1), got {r.sensitivity.holdout}")
    need(0 <= c.held_back < 1, "calibration.held_back", f"must be in [0, 1) (0: none held back), got {c.held_back}")
    need(r.offload in ("none", "layer", "auto"), "offload", f"got {r.offload!r}; allowed: none, layer, auto")
    a = r.allocation
    for b in a.candidates:
        need(b in ALLOWED_BITS, "allocation.candidates", f"bits {b} not allowed; allowed: 2, 3, 4, 8, 16")
    need(len(a.candidates) > 0, "allocation.candidates", "must not be empty")
    need(a.min_bits in ALLOWED_BITS, "allocation.min_bits", f"got {a.min_bits}; allowed: 2, 3, 4, 8, 16")
    need(a.max_bits in ALLOWED_BITS, "allocation.max_bits", f"got {a.max_bits}; allowed: 2, 3, 4, 8, 16")
    need(a.min_bits <= a.max_bits, "allocation.min_bits", "must be <= allocation.max_bits")
    if a.budget.avg_bits is not None:
        need(a.budget.avg_bits <= 16, "allocation.budget.avg_bits", f"{a.budget.avg_bits} bits per weight is more "
             "than bf16 (16): no allocation can use it; give at most 16")
        top = max(b for b in a.candidates if a.min_bits <= b <= a.max_bits)
        if a.budget.avg_bits >= top:
            warnings.warn(f"recipe key allocation.budget.avg_bits: {a.budget.avg_bits} >= {top}, the widest candidate "
                          "bit-width: every expert gets the widest candidate, the budget changes nothing", stacklevel=2)
    need(any(a.min_bits <= b <= a.max_bits for b in a.candidates), "allocation.candidates",
         "no candidate lies within [min_bits, max_bits]")
    for group in a.dense:
        need(group in DENSE_GROUPS, "allocation.dense", f"got {group!r}; allowed: {', '.join(DENSE_GROUPS)}")
    if a.dense:
        need(r.sensitivity.method == SensitivityMethod.LOSS_AWARE, "allocation.dense",
             f"needs sensitivity.method loss_aware (got {r.sensitivity.method.value}): only its costs are "
             "comparable between experts and dense linears")
        need(a.budget.servers is None, "allocation.dense", "is not supported with a servers budget; give "
             "allocation.budget.avg_bits or megabytes")
    for layer, b in a.layer_min_bits.items():
        need(b in ALLOWED_BITS, f"allocation.layer_min_bits.{layer}", f"got {b}; allowed: 2, 3, 4, 8, 16")
    q = r.quantize
    need(q.group_size >= 8 and q.group_size % 8 == 0, "quantize.group_size", f"must be a multiple of 8, got {q.group_size}")
    need(0 <= q.damp < 1, "quantize.damp", f"must be in [0, 1), got {q.damp}")
    need(q.block_size > 0, "quantize.block_size", f"must be > 0, got {q.block_size}")
    t = r.tune
    need(t.steps >= 0, "tune.steps", f"must be >= 0 (0 skips tuning), got {t.steps}")
    need(t.lr > 0, "tune.lr", f"must be > 0, got {t.lr}")
    need(t.batch_size > 0, "tune.batch_size", f"must be > 0, got {t.batch_size}")
    need(0 < t.holdout < 1, "tune.holdout", f"must be in (0, 1), got {t.holdout}")
    need(t.blockwise_steps >= 0, "tune.blockwise_steps", f"must be >= 0 (0: off), got {t.blockwise_steps}")
    need(t.router_steps >= 0, "tune.router_steps", f"must be >= 0 (0: off), got {t.router_steps}")
    p = r.protect
    for key in ("attention", "shared_experts", "dense_mlp", "lm_head", "pin_bits"):
        need(getattr(p, key) in ALLOWED_BITS, f"protect.{key}", f"got {getattr(p, key)}; allowed: 2, 3, 4, 8, 16")
    need(p.first_layers >= 0 and p.last_layers >= 0, "protect.first_layers", "must be >= 0")
    if r.tokens is not None:
        from moecompress.execution.tokens.policy import build_pipeline

        try:
            build_pipeline(r.tokens)
        except MoecompressError as exc:
            raise MoecompressError(f"recipe key tokens: {exc}") from None
    need(r.store.copy_bits in COPY_BITS + (None,), "store.copy_bits",
         f"got {r.store.copy_bits!r}; allowed: {', '.join(map(str, COPY_BITS))}, or null for no copies")


# -- YAML <-> dataclasses --------------------------------------------------------------------------------------------
def _build(cls, data, key: str):
    """Build dataclass `cls` from a mapping, strictly: unknown keys and wrong types are errors naming the key."""
    if not isinstance(data, dict):
        raise MoecompressError(f"recipe key {key or '<top>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MoecompressError(f"recipe: unknown key {(key + '.' if key else '') + unknown[0]}; "
                               f"allowed here: {', '.join(sorted(names))}")
    kwargs = {name: _coerce(hints[name], value, f"{key}.{name}" if key else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise MoecompressError(f"recipe key {key or '<top>'}: {exc}") from exc


def _coerce(tp, value, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, Enum):
        allowed = [m.value for m in tp]
        if value not in allowed:
            raise MoecompressError(f"recipe key {key}: got {value!r}; allowed: {', '.join(allowed)}")
        return tp(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise MoecompressError(f"recipe key {key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise MoecompressError(f"recipe key {key}: expected a mapping, got {value!r}")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()} if args else value
    if tp is bool:
        if not isinstance(value, bool):
            raise MoecompressError(f"recipe key {key}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and value != int(value)):
            raise MoecompressError(f"recipe key {key}: expected {tp.__name__}, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise MoecompressError(f"recipe key {key}: expected a string, got {value!r}")
        return value
    return value


def to_dict(obj) -> dict:
    def plain(v):
        if isinstance(v, Enum):
            return v.value
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(obj)


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise MoecompressError(f"--set expects key=value (e.g. allocation.budget.avg_bits=2.5), got {item!r}")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def recipe_from_dict(data: dict, overrides: list[str] = ()) -> Recipe:
    if data is not None and not isinstance(data, dict):
        raise MoecompressError(f"recipe: expected a mapping of keys (model, output, calibration, ...), got a "
                               f"{type(data).__name__}")
    data = dict(data or {})
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        if path[-2:-1] == ["budget"]:  # a budget has exactly one of its keys: setting one replaces the other
            node.clear()
        node[path[-1]] = value
    for required in ("model", "output"):
        if required not in data:
            raise MoecompressError(f"recipe: missing required key {required!r}")
    return _build(Recipe, data, "")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise MoecompressError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MoecompressError(f"recipe file {path} is not valid YAML: {exc}") from exc
    return recipe_from_dict(data, overrides)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
