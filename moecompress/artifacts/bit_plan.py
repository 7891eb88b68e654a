"""BitPlan: the bit-width of every expert projection and of every quantized dense linear.

Written by `allocate`, read by `quantize` and `export`. Bits 16 means "kept in bf16".
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from moecompress.errors import MoecompressError

BITS = (2, 3, 4, 8, 16)  # every bit-width the format stores; 16 = bf16
COPY_BITS = (2, 3, 4, 8)  # bit-widths a low-bit copy may take


@dataclass(frozen=True)
class BitPlan:
    group_size: int
    symmetric: bool
    # experts_path -> proj ("gate_up" | "up" | "down") -> bits of each expert, indexed by expert id
    experts: dict[str, dict[str, tuple[int, ...]]]
    # dense nn.Linear path -> bits (attention, shared experts, dense MLPs); absent = kept bf16
    linears: dict[str, int] = field(default_factory=dict)
    # bits of a second, low-bit copy of every routed expert (format/copies.py); None: no copies
    copy_bits: int | None = None

    def __post_init__(self):
        check_group_size(self.group_size)
        if self.copy_bits is not None and self.copy_bits not in COPY_BITS:
            raise MoecompressError(f"unsupported copy_bits {self.copy_bits!r}; allowed: "
                                   f"{', '.join(map(str, COPY_BITS))} (or none)")
        for path, projs in self.experts.items():
            for proj, bits in projs.items():
                for b in bits:
                    check_bits(b, f"{path}.{proj}")
        for path, b in self.linears.items():
            check_bits(b, path)

    def to_json(self) -> dict:
        return {
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "experts": {p: {k: list(v) for k, v in projs.items()} for p, projs in self.experts.items()},
            "linears": dict(self.linears),
            **({"copy_bits": self.copy_bits} if self.copy_bits is not None else {}),
        }

    @classmethod
    def from_json(cls, d: dict) -> "BitPlan":
        return cls(
            group_size=int(d["group_size"]),
            symmetric=bool(d["symmetric"]),
            experts={p: {k: tuple(int(b) for b in v) for k, v in projs.items()} for p, projs in d["experts"].items()},
            linears={k: int(v) for k, v in d.get("linears", {}).items()},
            copy_bits=None if d.get("copy_bits") is None else int(d["copy_bits"]),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "BitPlan":
        return cls.from_json(json.loads(Path(path).read_text()))

    @classmethod
    def uniform(cls, layout, bits: int, group_size: int = 64, symmetric: bool = False) -> "BitPlan":
        """Every expert projection at `bits`; dense linears kept bf16."""
        return cls(
            group_size=group_size,
            symmetric=symmetric,
            experts={m.experts_path: {p.name: (bits,) * m.num_experts for p in m.projs} for m in layout.moe_layers},
        )


def check_bits(bits: int, where: str = "") -> None:
    if bits not in BITS:
        at = f" at {where}" if where else ""
        raise MoecompressError(f"unsupported bits {bits!r}{at}; allowed: {', '.join(map(str, BITS))}")


def check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or group_size < 8 or group_size % 8:
        raise MoecompressError(f"group_size must be a positive multiple of 8 (e.g. 64 or 128), got {group_size!r}")
