"""What the user asks of an allocation: a byte budget and the rules on which bit-widths each item may take."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from moecompress.artifacts.bit_plan import BITS, check_bits
from moecompress.artifacts.cost_table import CostItem
from moecompress.errors import MoecompressError

MIB = 2**20  # `megabytes` are MiB, as in the recipe


def metadata_bytes(items) -> float:
    """Bytes of the scales and zero-points the given cost items carry once quantized (the same at every bit-width
    below 16; taken from each item's bytes at its lowest such bit-width less the packed bits; 0 for bf16-only)."""
    total = 0.0
    for it in items:
        quantized = [(b, n) for b, n in zip(it.bits, it.bytes) if b != 16]
        if quantized:
            b, n = min(quantized)
            total += n - it.numel * b / 8
    return total


@dataclass(frozen=True)
class Budget:
    """Exactly one of three ways to give the byte budget of all the cost table's items together.

    - `avg_bits`: NOMINAL bits per routed-expert weight, scales and zero-points not counted. The budget is the bytes
      of that many bits per weight plus the scales/zero-points the quantized weights carry anyway:
      budget bytes = floor(avg_bits * numel / 8 + metadata), numel = the weights of the cost table's expert items
      (of all its items if it has none), metadata = their scale/zero-point bytes (`metadata_bytes`). So avg_bits 3
      is exactly the bytes of uniform 3-bit experts (3.375 stored bits per weight at group 64, asymmetric), and
      2.5 lies halfway between uniform 2- and 3-bit.
    - `bytes`: the budget in bytes; `megabytes`: in MiB (2^20 bytes).
    The budget covers the bytes of every item of the cost table, dense linears and pinned items included.
    Biases are never counted. Reports call bytes x 8 / weights, metadata included, "stored bits".
    """

    avg_bits: float | None = None
    bytes: int | None = None
    megabytes: float | None = None

    def __post_init__(self):
        given = {k: v for k, v in (("avg_bits", self.avg_bits), ("bytes", self.bytes), ("megabytes", self.megabytes))
                 if v is not None}
        if len(given) != 1:
            raise MoecompressError(f"give exactly one of avg_bits, bytes, megabytes as budget; got {given or 'none'}")
        (name, value), = given.items()
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise MoecompressError(f"budget {name} must be a positive number, got {value!r}")

    def to_bytes(self, numel: int, metadata: float) -> int:
        """The budget in bytes, for `numel` routed-expert weights carrying `metadata` bytes of scales/zero-points."""
        if self.bytes is not None:
            return int(self.bytes)
        exact = self.avg_bits * numel / 8 + metadata if self.avg_bits is not None else self.megabytes * MIB
        return math.floor(round(exact, 6))  # round first: 0.35 * 80 / 8 is 3.5, not 3.4999999999999996

    def describe(self, nbytes: int, numel: int, metadata: float) -> str:
        """`nbytes` in this budget's unit first, then in the others: the smallest such budget that holds it."""
        def holds(unit: str):
            return lambda v: Budget(**{unit: v}).to_bytes(numel, metadata) >= nbytes

        avg = _round_up(max((nbytes - metadata) * 8 / numel, 1e-4), 4, holds("avg_bits"))
        mb = _round_up(nbytes / MIB, 7, holds("megabytes"))
        units = {"avg_bits": f"avg_bits={avg:g}", "bytes": f"bytes={nbytes}", "megabytes": f"megabytes={mb:g}"}
        first = next(k for k in units if getattr(self, k) is not None)
        return ", ".join([units.pop(first), *units.values()])


def _round_up(x: float, decimals: int, holds) -> float:
    """The smallest number of `decimals` decimals at or above `x` for which `holds` is true (float-safe)."""
    step = 10.0**-decimals
    v = round(math.floor(x / step) * step, decimals)
    while not holds(v):
        v = round(v + step, decimals)
    return v


@dataclass(frozen=True)
class AllocationRules:
    """Which bit-widths each item may take; the dicts are read, never changed.

    An item may take a bit-width the cost table has for it that is also in `candidates` and lies within
    [max(min_bits, layer_min_bits[item.layer]), max_bits]. A pin overrides all of these: the item takes exactly the
    pinned bits (which the cost table must have). Pins are keyed by item key (see artifacts/cost_table.py) or by an
    fnmatch pattern over keys, e.g. "model.layers.0.*"; an exact key wins, then the first matching pattern.
    """

    candidates: tuple[int, ...] = BITS
    min_bits: int = 2
    max_bits: int = 16
    layer_min_bits: dict[int, int] = field(default_factory=dict)
    pins: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "candidates", tuple(self.candidates))
        for b in self.candidates:
            check_bits(b, "candidates")
        check_bits(self.min_bits, "min_bits")
        check_bits(self.max_bits, "max_bits")
        if self.min_bits > self.max_bits:
            raise MoecompressError(f"min_bits {self.min_bits} is above max_bits {self.max_bits}")
        for layer, b in self.layer_min_bits.items():
            check_bits(b, f"layer_min_bits[{layer}]")
        for key, b in self.pins.items():
            check_bits(b, f"pins[{key!r}]")

    def allowed(self, items: tuple[CostItem, ...]) -> list[list[int]]:
        """For each item, the indices into its candidates it may take. Errors name the item and the rule."""
        layers = {it.layer for it in items}
        unknown = sorted(set(self.layer_min_bits) - layers)
        if unknown:
            raise MoecompressError(f"layer_min_bits names layer {unknown[0]}, which has no item in the cost table")
        patterns = [k for k in self.pins if any(c in k for c in "*?[")]
        used: set[str] = set()
        out = []
        for it in items:
            pin_key = it.key if it.key in self.pins else next((p for p in patterns if fnmatchcase(it.key, p)), None)
            if pin_key is not None:
                used.add(pin_key)
                b = self.pins[pin_key]
                if b not in it.bits:
                    raise MoecompressError(f"pins[{pin_key!r}] = {b}, but item {it.key} has costs only for {it.bits}")
                out.append([it.bits.index(b)])
                continue
            lo = max(self.min_bits, self.layer_min_bits.get(it.layer, self.min_bits))
            ok = [j for j, b in enumerate(it.bits) if b in self.candidates and lo <= b <= self.max_bits]
            if not ok:
                raise MoecompressError(
                    f"item {it.key} can take no bit-width: the cost table has bits {it.bits}, the rules allow "
                    f"{self.candidates} within [{lo}, {self.max_bits}]"
                )
            out.append(ok)
        unused = [k for k in self.pins if k not in used]
        if unused:
            raise MoecompressError(f"pin {unused[0]!r} matches no item of the cost table")
        return out
