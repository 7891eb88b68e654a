"""CostTable: what each candidate bit-width would cost, per item — written by `sensitivity`, read by `allocate`.

An *item* is what gets one bit-width: an expert projection (`proj` = "gate_up" | "up" | "down"), a whole expert
(`proj` = "*": all its projections share the bits), or a dense nn.Linear (`kind` "linear", `proj` and `expert`
None). For each candidate `bits` an item has a `damage` (estimated output error, comparable across items and layers)
and `bytes` (packed weights plus scales/zero-points, from format/sizes.py; biases are not counted).

Item keys, used by pins and by `build_cost_table`: `{experts_path}.{expert}` for a whole expert,
`{experts_path}.{expert}.{proj}` for one projection, the module path for a linear.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from moecompress.arch.layout import ModelLayout, MoELayer
from moecompress.artifacts.bit_plan import check_bits, check_group_size
from moecompress.errors import MoecompressError
from moecompress.format.sizes import matrix_bytes

ALL_PROJS = "*"


def item_key(path: str, expert: int | None = None, proj: str | None = None) -> str:
    """The key of an item: see the module docstring."""
    if expert is None:
        return path
    return f"{path}.{expert}" if proj == ALL_PROJS else f"{path}.{expert}.{proj}"


@dataclass(frozen=True)
class CostItem:
    kind: str  # "expert" | "linear"
    path: str  # experts_path for "expert", module path for "linear"
    proj: str | None  # projection name or "*" (whole expert) for "expert"; None for "linear"
    expert: int | None  # expert id for "expert"; None for "linear"
    layer: int | None  # MoE-layer ordinal holding the item; None for a linear outside every MoE decoder layer
    numel: int  # number of weights the item covers
    bits: tuple[int, ...]  # candidate bit-widths, strictly increasing
    damage: tuple[float, ...]  # estimated damage at each candidate
    bytes: tuple[int, ...]  # stored bytes at each candidate

    def __post_init__(self):
        key = self.key
        if self.kind == "expert":
            if self.expert is None or self.proj is None:
                raise MoecompressError(f"cost item {key}: an expert item needs `expert` and `proj` (a name or '*')")
        elif self.kind == "linear":
            if self.expert is not None or self.proj is not None:
                raise MoecompressError(f"cost item {key}: a linear item has no `expert` or `proj`")
        else:
            raise MoecompressError(f"cost item {key}: kind must be 'expert' or 'linear', got {self.kind!r}")
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        object.__setattr__(self, "damage", tuple(float(d) for d in self.damage))
        object.__setattr__(self, "bytes", tuple(int(b) for b in self.bytes))
        for b in self.bits:
            check_bits(b, key)
        if not self.bits or list(self.bits) != sorted(set(self.bits)):
            raise MoecompressError(f"cost item {key}: bits must be non-empty and strictly increasing, got {self.bits}")
        if not len(self.damage) == len(self.bytes) == len(self.bits):
            raise MoecompressError(f"cost item {key}: bits, damage and bytes must have one entry per candidate")
        if not all(math.isfinite(d) for d in self.damage):
            raise MoecompressError(f"cost item {key}: damage must be finite, got {self.damage}")
        if min(self.bytes) <= 0 or self.numel <= 0:
            raise MoecompressError(f"cost item {key}: bytes and numel must be positive")

    @property
    def key(self) -> str:
        return item_key(self.path, self.expert, self.proj)


@dataclass(frozen=True)
class CostTable:
    group_size: int
    symmetric: bool
    method: str  # how damage was estimated, e.g. "hessian-trace rtn"
    items: tuple[CostItem, ...]

    def __post_init__(self):
        check_group_size(self.group_size)
        object.__setattr__(self, "items", tuple(self.items))
        seen: set[str] = set()
        for it in self.items:
            if it.key in seen:
                raise MoecompressError(f"cost table lists item {it.key} twice")
            seen.add(it.key)
        for it in self.items:
            if it.kind == "expert" and it.proj != ALL_PROJS and item_key(it.path, it.expert, ALL_PROJS) in seen:
                whole = item_key(it.path, it.expert, ALL_PROJS)
                raise MoecompressError(f"cost table has both the whole expert {whole} and its projection {it.key}")

    def to_json(self) -> dict:
        return {
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "method": self.method,
            "items": [
                {
                    "kind": it.kind, "path": it.path, "proj": it.proj, "expert": it.expert, "layer": it.layer,
                    "numel": it.numel, "bits": list(it.bits), "damage": list(it.damage), "bytes": list(it.bytes),
                }
                for it in self.items
            ],
        }

    @classmethod
    def from_json(cls, d: dict) -> "CostTable":
        try:
            items = tuple(CostItem(**it) for it in d["items"])
        except TypeError as e:  # a missing or unknown key
            raise MoecompressError(f"malformed cost table item: {e}") from None
        return cls(int(d["group_size"]), bool(d["symmetric"]), str(d["method"]), items)

    def save(self, path: str | Path) -> None:
        # json writes floats with repr(): the round trip is exact.
        Path(path).write_text(json.dumps(self.to_json(), allow_nan=False))

    @classmethod
    def load(cls, path: str | Path) -> "CostTable":
        return cls.from_json(json.loads(Path(path).read_text()))


def expert_bytes(moe: MoELayer, proj: str, bits: int, group_size: int, symmetric: bool) -> int:
    """Stored bytes of one expert's projection `proj` ("*": all its projections) at `bits`."""
    projs = moe.projs if proj == ALL_PROJS else (moe.proj(proj),)
    return sum(matrix_bytes(p.out_features, p.in_features, bits, group_size, symmetric) for p in projs)


def build_cost_table(
    layout: ModelLayout,
    damage: Mapping[str, Mapping[int, float]],
    *,
    group_size: int,
    symmetric: bool,
    method: str,
    linear_shapes: Mapping[str, tuple[int, int]] | None = None,
) -> CostTable:
    """A CostTable from damages keyed by item key (then bits); numel, layer and bytes come from the layout.

    Every routed expert projection must be covered exactly once, by a whole-expert or a projection item.
    Linear items need their `[out_features, in_features]` in `linear_shapes`.
    """
    check_group_size(group_size)
    linear_shapes = dict(linear_shapes or {})
    experts = {}  # key -> (moe, expert, proj)
    for moe in layout.moe_layers:
        for e in range(moe.num_experts):
            for proj in (ALL_PROJS, *(p.name for p in moe.projs)):
                experts[item_key(moe.experts_path, e, proj)] = (moe, e, proj)
    linear_layer = {}
    for path in linear_shapes:
        linear_layer[path] = next(
            (m.layer for m in layout.moe_layers if path.startswith(f"{layout.decoder_layers_path}.{m.decoder_layer}.")),
            None,
        )
    items, covered = [], {}
    for key, by_bits in damage.items():
        bits = tuple(sorted(int(b) for b in by_bits))
        dmg = tuple(float(by_bits[b]) for b in bits)
        if key in experts:
            moe, e, proj = experts[key]
            projs = moe.projs if proj == ALL_PROJS else (moe.proj(proj),)
            for p in projs:
                other = covered.setdefault((moe.experts_path, e, p.name), key)
                if other != key:
                    raise MoecompressError(f"cost items {other} and {key} both cover {moe.experts_path}.{e}.{p.name}")
            numel = sum(p.out_features * p.in_features for p in projs)
            nbytes = tuple(expert_bytes(moe, proj, b, group_size, symmetric) for b in bits)
            items.append(CostItem("expert", moe.experts_path, proj, e, moe.layer, numel, bits, dmg, nbytes))
        elif key in linear_shapes:
            out_f, in_f = linear_shapes[key]
            nbytes = tuple(matrix_bytes(out_f, in_f, b, group_size, symmetric) for b in bits)
            items.append(CostItem("linear", key, None, None, linear_layer[key], out_f * in_f, bits, dmg, nbytes))
        else:
            examples = ", ".join(list(experts)[:3])
            raise MoecompressError(
                f"cost item {key!r} is neither a routed expert (keys like {examples}) nor a linear in linear_shapes"
            )
    for moe in layout.moe_layers:
        for e in range(moe.num_experts):
            for p in moe.projs:
                if (moe.experts_path, e, p.name) not in covered:
                    raise MoecompressError(f"no damage given for {moe.experts_path}.{e}.{p.name} nor its whole expert")
    return CostTable(group_size=group_size, symmetric=symmetric, method=method, items=tuple(items))
