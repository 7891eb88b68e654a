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
Low-bit copies (optional, `quantization_config.experts[P].copy_bits`, absent = none): a second copy of EVERY expert
of P at copy_bits, one group per projection of the experts its main groups hold (in a checkpoint all num_experts, in
a server's bundle that server's) in id order, in its own file
`expert_copies.safetensors` (format/copies.py) under copy_prefix(P, proj, copy_bits): `.qweight`, `.scales`,
`.zeros`, `.bias` laid out as the main groups' (same group_size and symmetry).
Weights are in the canonical orientation [out, in] whatever the model's own storage layout.
A quantized dense nn.Linear at path Q is stored as a group of one: Q.qweight [1, out, in*b/8], Q.scales,
Q.zeros (asymmetric), Q.bias [1, out] (if any).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

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
    copy_bits: int | None = None  # bits of the low-bit copy of every expert (format/copies.py); None: no copies

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

    @property
    def copy_bits(self) -> int | None:
        """The bits of the low-bit copies (the same for every experts module); None when there are none."""
        bits = {es.copy_bits for es in self.experts.values()} - {None}
        return bits.pop() if len(bits) == 1 else None

    def to_dict(self) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.version,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "experts": {
                path: {
                    "num_experts": spec.num_experts,
                    **({"copy_bits": spec.copy_bits} if spec.copy_bits is not None else {}),
                    **{proj: {str(b): list(ids) for b, ids in sorted(g.items())} for proj, g in spec.groups.items()},
                }
                for path, spec in self.experts.items()
            },
            "linears": dict(self.linears),
        }

    @classmethod
    def from_dict(cls, d) -> "FormatSpec":
        """Parse a quantization_config strictly: every field typed and bounded, unknown keys refused."""
        if not isinstance(d, dict):
            raise MoecompressError(f"quantization_config must be a mapping, got {type(d).__name__}")
        if d.get("quant_method") != QUANT_METHOD:
            raise MoecompressError(f"not a moecompress checkpoint: quant_method is {d.get('quant_method')!r}")
        version = d.get("format_version")
        if version != FORMAT_VERSION or type(version) is not int:
            raise MoecompressError(
                f"checkpoint format_version {version!r} is not supported by this moecompress "
                f"(it reads version {FORMAT_VERSION}); upgrade moecompress or re-export the checkpoint"
            )
        unknown = sorted(set(d) - CONFIG_KEYS)
        if unknown:
            raise MoecompressError(f"quantization_config: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(CONFIG_KEYS))}")
        experts_d = _need(d, "experts", dict, "quantization_config")
        experts = {_module_path(path): _experts_spec(path, entry) for path, entry in experts_d.items()}
        linears_d = d.get("linears", {})
        if not isinstance(linears_d, dict):
            raise MoecompressError("quantization_config.linears must map module paths to bits")
        linears = {_module_path(path): _int(b, f"linears.{path}", 2, 8) for path, b in linears_d.items()}
        spec = cls(group_size=_int(_need(d, "group_size", int, "quantization_config"), "group_size", 8, MAX_GROUP),
                   symmetric=_need(d, "symmetric", bool, "quantization_config"), experts=experts, linears=linears,
                   version=version)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.group_size < 8 or self.group_size % 8:
            raise MoecompressError(f"group_size must be a positive multiple of 8, got {self.group_size}")
        copy_bits = {es.copy_bits for es in self.experts.values()} - {None}
        if len(copy_bits) > 1:
            raise MoecompressError(f"experts modules have copies at different bits {sorted(copy_bits)}; one copy_bits "
                                   "for all of them")
        for path, spec in self.experts.items():
            if spec.copy_bits is not None and spec.copy_bits not in QUANT_BITS:
                raise MoecompressError(f"{path}: unsupported copy_bits {spec.copy_bits}; allowed: "
                                       f"{', '.join(map(str, QUANT_BITS))}")
            held = None
            for proj, by_bits in spec.groups.items():
                seen: set[int] = set()
                for b, ids in by_bits.items():
                    if b not in ALL_BITS:
                        raise MoecompressError(
                            f"{path}.{proj}: unsupported bits {b}; allowed: {', '.join(map(str, ALL_BITS))}"
                        )
                    if not ids:
                        raise MoecompressError(f"{path}.{proj}: the {b}-bit group lists no expert")
                    for e in ids:
                        if not 0 <= e < spec.num_experts or e in seen:
                            raise MoecompressError(f"{path}.{proj}: expert id {e} out of range "
                                                   f"0..{spec.num_experts - 1} or listed twice")
                        seen.add(e)
                if held is not None and seen != held:
                    raise MoecompressError(f"{path}: projections hold different experts ({sorted(held)} vs "
                                           f"{sorted(seen)} in {proj}); every projection must hold the same experts")
                held = seen
        for path, b in self.linears.items():
            if b not in QUANT_BITS:
                raise MoecompressError(f"{path}: unsupported bits {b} for a dense linear; allowed: 2, 3, 4, 8")
            if any(path == p or path.startswith(p + ".") for p in self.experts):
                raise MoecompressError(f"linears.{path} lies inside an experts module")


CONFIG_KEYS = {"quant_method", "format_version", "group_size", "symmetric", "experts", "linears"}
MAX_GROUP = 1 << 20
MAX_EXPERTS = 1 << 16  # an upper bound far above any model's; the model's own count is checked at load
MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def _need(d: dict, key: str, tp: type, where: str):
    if key not in d:
        raise MoecompressError(f"{where}: missing key {key!r}")
    value = d[key]
    if type(value) is not tp:
        raise MoecompressError(f"{where}.{key} must be {tp.__name__}, got {value!r}")
    return value


def _int(value, where: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise MoecompressError(f"quantization_config.{where} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _module_path(path) -> str:
    if not isinstance(path, str) or not MODULE_PATH.fullmatch(path):
        raise MoecompressError(f"quantization_config: {path!r} is not a module path (dotted names)")
    return path


def _experts_spec(path: str, entry) -> ExpertsSpec:
    if not isinstance(entry, dict):
        raise MoecompressError(f"quantization_config.experts.{path} must be a mapping")
    entry = dict(entry)
    n = _int(entry.pop("num_experts", None), f"experts.{path}.num_experts", 1, MAX_EXPERTS)
    copy_bits = entry.pop("copy_bits", None)
    if copy_bits is not None and (type(copy_bits) is not int or copy_bits not in QUANT_BITS):
        raise MoecompressError(f"quantization_config.experts.{path}.copy_bits must be one of "
                               f"{', '.join(map(str, QUANT_BITS))}, got {copy_bits!r}")
    if not entry:
        raise MoecompressError(f"quantization_config.experts.{path} lists no projection")
    groups = {}
    for proj, by_bits in entry.items():
        if proj not in PROJS:
            raise MoecompressError(f"{path}: unknown projection {proj!r}; allowed: {', '.join(PROJS)}")
        if not isinstance(by_bits, dict) or not by_bits:
            raise MoecompressError(f"quantization_config.experts.{path}.{proj} must map bits to expert ids")
        groups[proj] = {}
        for b, ids in by_bits.items():
            if not isinstance(b, (str, int)) or type(b) is bool or str(b) not in {str(x) for x in ALL_BITS}:
                raise MoecompressError(f"{path}.{proj}: unsupported bits {b!r}; allowed: {', '.join(map(str, ALL_BITS))}")
            if not isinstance(ids, (list, tuple)):
                raise MoecompressError(f"quantization_config.experts.{path}.{proj}.{b} must be a list of expert ids")
            groups[proj][int(b)] = tuple(sorted(_int(e, f"experts.{path}.{proj}.{b}", 0, n - 1) for e in ids))
    return ExpertsSpec(num_experts=n, groups=groups, copy_bits=copy_bits)


def group_prefix(experts_path: str, proj: str, bits: int) -> str:
    return f"{experts_path}.{proj}.b{bits}"


def copy_prefix(experts_path: str, proj: str, bits: int) -> str:
    """Prefix of the low-bit copy group of every expert of one projection (in expert_copies.safetensors)."""
    return f"{experts_path}.{proj}.copy.b{bits}"


def read_spec(directory: str | Path) -> FormatSpec:
    """The FormatSpec of a checkpoint or bundle directory (its config.json's quantization_config)."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise MoecompressError(f"{directory}: no config.json; expected a moecompress checkpoint directory")
    from moecompress.format.files import read_json_object

    qc = read_json_object(path, "model config").get("quantization_config")
    if not qc:
        raise MoecompressError(
            f"{directory} is not a moecompress checkpoint (config.json has no quantization_config); "
            "load plain models with transformers.AutoModelForCausalLM.from_pretrained"
        )
    try:
        return FormatSpec.from_dict(qc)
    except MoecompressError as exc:
        raise MoecompressError(f"{path}: {exc}") from None
