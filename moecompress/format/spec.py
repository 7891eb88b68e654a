"""The `quantization_config` of a moecompress checkpoint and the tensor names it implies.

Everything needed to rebuild the module skeleton before loading lives here, so `config.json` alone says what each
safetensors entry is. A checkpoint that holds only some experts of a layer (one server's bundle) is the normal case:
an expert is held when some group lists it.

Tensor names, below an experts module path P (e.g. "model.layers.0.mlp.experts"), for each projection `proj`
("gate_up" | "up" | "down") and each bit-width `b` present in that layer:
    P.<proj>.b<b>.qweight  uint8   [n, out, in*b/8]   packed ints (b in 2,3,4,8)
    P.<proj>.b<b>.scales   float16 [n, out, in/group_size]
    P.<proj>.b<b>.zeros    uint8   [n, out, in/group_size]   (asymmetric only)
    P.<proj>.b16.weight    bf16    [n, out, in]              (16 = kept in bf16)
    P.<proj>.b<b>.bias     dtype   [n, out]                  (experts with biases only)
    P.gate_up_proj (or P.up_proj) uint8 [0]: empty marker under the model's own fused name, so that
        transformers without moecompress stops on a size mismatch instead of building random experts;
where n experts are listed, in increasing id order, in quantization_config.experts[P][proj][str(b)].
Weights are in the canonical orientation [out, in] whatever the model's own storage layout.
A quantized dense nn.Linear at path Q is stored as a group of one: Q.qweight [1, out, in*b/8], Q.scales,
Q.zeros (asymmetric), Q.bias [1, out] (if any).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from moecompress.errors import MoecompressError

QUANT_METHOD = "moecompress"
FORMAT_VERSION = 1
QUANT_BITS = (2, 3, 4, 8)
ALL_BITS = QUANT_BITS + (16,)
PROJS = ("gate_up", "up", "down")


@dataclass(frozen=True)
class ExpertsSpec:
    """One MoE layer's experts module in the checkpoint."""

    num_experts: int  # experts of the full model layer (ids 0..num_experts-1)
    # proj -> bits -> expert ids held at that bit-width (sorted)
    groups: dict[str, dict[int, tuple[int, ...]]]

    def held(self, proj: str) -> tuple[int, ...]:
        return tuple(sorted(e for ids in self.groups[proj].values() for e in ids))

    def bits_of(self, proj: str) -> dict[int, int]:
        return {e: b for b, ids in self.groups[proj].items() for e in ids}


@dataclass(frozen=True)
class FormatSpec:
    group_size: int
    symmetric: bool
    experts: dict[str, ExpertsSpec]
    linears: dict[str, int] = field(default_factory=dict)  # dense nn.Linear path -> bits (2/3/4/8)
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.version,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "experts": {
                path: {
                    "num_experts": spec.num_experts,
                    **{proj: {str(b): list(ids) for b, ids in sorted(g.items())} for proj, g in spec.groups.items()},
                }
                for path, spec in self.experts.items()
            },
            "linears": dict(self.linears),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FormatSpec":
        if d.get("quant_method") != QUANT_METHOD:
            raise MoecompressError(f"not a moecompress checkpoint: quant_method is {d.get('quant_method')!r}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise MoecompressError(
                f"checkpoint format_version {version!r} is not supported by this moecompress "
                f"(it reads version {FORMAT_VERSION}); upgrade moecompress or re-export the checkpoint"
            )
        try:
            experts = {}
            for path, entry in d["experts"].items():
                entry = dict(entry)
                n = int(entry.pop("num_experts"))
                groups = {}
                for proj, by_bits in entry.items():
                    if proj not in PROJS:
                        raise MoecompressError(f"{path}: unknown projection {proj!r}; allowed: {', '.join(PROJS)}")
                    groups[proj] = {int(b): tuple(sorted(int(e) for e in ids)) for b, ids in by_bits.items()}
                experts[path] = ExpertsSpec(num_experts=n, groups=groups)
            spec = cls(
                group_size=int(d["group_size"]),
                symmetric=bool(d["symmetric"]),
                experts=experts,
                linears={k: int(v) for k, v in d.get("linears", {}).items()},
                version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MoecompressError(f"malformed moecompress quantization_config: {exc!r}") from exc
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.group_size < 8 or self.group_size % 8:
            raise MoecompressError(f"group_size must be a positive multiple of 8, got {self.group_size}")
        for path, spec in self.experts.items():
            for proj, by_bits in spec.groups.items():
                seen: set[int] = set()
                for b, ids in by_bits.items():
                    if b not in ALL_BITS:
                        raise MoecompressError(
                            f"{path}.{proj}: unsupported bits {b}; allowed: {', '.join(map(str, ALL_BITS))}"
                        )
                    for e in ids:
                        if not 0 <= e < spec.num_experts or e in seen:
                            raise MoecompressError(f"{path}.{proj}: expert id {e} out of range or listed twice")
                        seen.add(e)
        for path, b in self.linears.items():
            if b not in QUANT_BITS:
                raise MoecompressError(f"{path}: unsupported bits {b} for a dense linear; allowed: 2, 3, 4, 8")


def group_prefix(experts_path: str, proj: str, bits: int) -> str:
    return f"{experts_path}.{proj}.b{bits}"
