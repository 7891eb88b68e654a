"""CalibrationStats: what calibration measured about the routed experts of one model on one calibration set.

Written by `calibrate`, read by `sensitivity` (Hessians), `allocate` (popularity) and `shard` (co-activation,
activation paths, routing trace). On disk, a directory:

- `stats.safetensors`: every tensor but the expert Hessians, keys below;
- `hessians.<layer>.safetensors`: the expert Hessians of one MoE layer, stacked per projection, `[E, in, in]`,
  keys `<proj>` and `<proj>.weighted` (one file a layer, so a stage can stream them, and layer-by-layer
  calibration can write each layer's as soon as it is done instead of holding all of them);
- `summary.json`: the metadata and a per-layer summary a person can read (the loader reads only the metadata).

Tensor keys: `tokens` [L,E] int64, `mass` [L,E] float64, `coactivation` [L,E,E] int64, `paths` [L-1,E,E] int64,
`domain_tokens` / `domain_mass` [D,L,E], `hessian_tokens` [L,E] int64, `dense_hessian.<path>` [in,in],
`trace.indices` [T,L,K] int32 and `trace.weights` [T,L,K] float32. `layer` is the MoE ordinal 0..L-1; proj is
"gate_up" | "up" | "down". In memory, `hessians` maps "<layer>.<proj>[.weighted]" to the [E,in,in] tensor; a loaded
stats reads each from its file when asked (`HessianFiles`).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from moecompress.errors import MoecompressError

FORMAT_VERSION = 1
TENSORS_FILE = "stats.safetensors"
SUMMARY_FILE = "summary.json"


def hessian_key(layer: int, proj: str, weighted: bool = False) -> str:
    return f"{layer}.{proj}" + (".weighted" if weighted else "")


def hessian_file(directory: str | Path, layer: int) -> Path:
    return Path(directory) / f"hessians.{layer}.safetensors"


def write_layer_hessians(directory: str | Path, layer: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one MoE layer's Hessians ({"<proj>[.weighted]": [E, in, in]}) to hessians.<layer>.safetensors."""
    from safetensors.torch import save_file

    path = hessian_file(directory, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    return path


class HessianFiles(Mapping):
    """Read-only "<layer>.<proj>[.weighted]" -> [E, in, in] mapping over hessians.<layer>.safetensors files;
    each tensor is read from disk when asked for, and the last one read is kept (so `stats.hessian(l, p)[e]` over
    the experts of one layer reads the file once)."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        self._last: tuple[str, torch.Tensor] | None = None
        self._where: dict[str, tuple[Path, str]] = {}
        for path in sorted(self.directory.glob("hessians.*.safetensors")):
            layer = path.name.split(".")[1]
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    self._where[f"{layer}.{name}"] = (path, name)

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if self._last is not None and self._last[0] == key:
            return self._last[1]
        path, name = self._where[key]
        with safe_open(str(path), framework="pt") as f:
            tensor = f.get_tensor(name)
        self._last = (key, tensor)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def layer_files(self) -> dict[int, Path]:
        return {int(k.split(".")[0]): p for k, (p, _) in self._where.items()}


@dataclass(frozen=True, eq=False)
class CalibrationStats:
    model_type: str
    experts_paths: tuple[str, ...]  # one per MoE layer, index = layer
    num_experts: int
    top_k: int
    # Popularity over the kept (non-pad) tokens.
    tokens: torch.Tensor  # [L, E] int64: tokens routed to each expert
    mass: torch.Tensor  # [L, E] float64: sum of the routing weights those tokens gave the expert
    coactivation: torch.Tensor  # [L, E, E] int64: tokens that chose both experts in that layer (diagonal = tokens)
    paths: torch.Tensor  # [L-1, E, E] int64: tokens that chose expert i in layer l and expert j in layer l+1
    num_tokens: int  # kept (non-pad) tokens seen
    seq_len: int
    samples: int
    seed: int
    dataset: str = ""
    domains: tuple[str, ...] = ()
    domain_tokens: torch.Tensor | None = None  # [D, L, E] int64
    domain_mass: torch.Tensor | None = None  # [D, L, E] float64
    # Per-expert Hessians of the projections' inputs, key hessian_key(layer, proj[, weighted]) -> [E, in, in]:
    # unweighted sum_t x_t x_t^T over the expert's tokens; weighted sum_t w_t^2 x_t x_t^T (w = routing weight).
    # A dict, or HessianFiles (read from disk on access).
    hessians: Mapping[str, torch.Tensor] = field(default_factory=dict)
    hessian_tokens: torch.Tensor | None = None  # [L, E] int64: tokens in each unweighted Hessian
    hessian_dtype: str = "float32"
    all_experts: bool = False  # unweighted Hessians saw every kept token, not only the routed ones
    dense_hessians: dict[str, torch.Tensor] = field(default_factory=dict)  # nn.Linear path -> [in, in]
    dense_tokens: int = 0  # tokens in each dense Hessian
    trace_indices: torch.Tensor | None = None  # [T, L, K] int32: the experts each kept token chose, per layer
    trace_weights: torch.Tensor | None = None  # [T, L, K] float32: their routing weights
    min_tokens: int = 16  # coverage threshold: experts with fewer tokens are reported as under-covered

    @property
    def num_layers(self) -> int:
        return len(self.experts_paths)

    @property
    def mean_weight(self) -> torch.Tensor:
        """[L, E] float64: mean routing weight an expert received from its tokens (0 for an expert with none)."""
        return self.mass / self.tokens.clamp(min=1).to(torch.float64)

    @property
    def load_share(self) -> torch.Tensor:
        """[L, E] float64: share of each layer's expert slots (tokens x top_k) taken by each expert."""
        total = self.tokens.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float64)
        return self.tokens.to(torch.float64) / total

    def hessian(self, layer: int, proj: str, weighted: bool = False) -> torch.Tensor:
        key = hessian_key(layer, proj, weighted)
        if key not in self.hessians:
            have = ", ".join(sorted(self.hessians)) or "none (calibrated with hessians off)"
            raise MoecompressError(f"no Hessian {key!r} in the calibration stats; available: {have}")
        return self.hessians[key]

    def under_covered(self, min_tokens: int | None = None) -> list[tuple[int, int]]:
        """(layer, expert) pairs whose Hessians saw fewer than `min_tokens` tokens (default: self.min_tokens)."""
        counts = self.hessian_tokens if self.hessian_tokens is not None else self.tokens
        thr = self.min_tokens if min_tokens is None else min_tokens
        return [(int(l), int(e)) for l, e in (counts < thr).nonzero().tolist()]

    def layer_summary(self) -> list[dict]:
        """Per MoE layer: max/mean load ratio, dead experts (no token), under-covered experts."""
        out = []
        counts = self.hessian_tokens if self.hessian_tokens is not None else self.tokens
        for layer in range(self.num_layers):
            t = self.tokens[layer].to(torch.float64)
            mean = float(t.mean()) if t.numel() else 0.0
            out.append({
                "layer": layer,
                "experts_path": self.experts_paths[layer],
                "max_over_mean_load": float(t.max() / mean) if mean > 0 else 0.0,
                "min_tokens": int(self.tokens[layer].min()),
                "max_tokens": int(self.tokens[layer].max()),
                "dead_experts": [int(e) for e in (self.tokens[layer] == 0).nonzero().flatten()],
                "under_covered_experts": [int(e) for e in (counts[layer] < self.min_tokens).nonzero().flatten()],
            })
        return out

    # ---- on-disk form ----------------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        t = {"tokens": self.tokens, "mass": self.mass, "coactivation": self.coactivation, "paths": self.paths}
        if self.domain_tokens is not None:
            t["domain_tokens"] = self.domain_tokens
            t["domain_mass"] = self.domain_mass
        if self.hessian_tokens is not None:
            t["hessian_tokens"] = self.hessian_tokens
        for k, v in self.dense_hessians.items():
            t[f"dense_hessian.{k}"] = v
        if self.trace_indices is not None:
            t["trace.indices"] = self.trace_indices
            t["trace.weights"] = self.trace_weights
        return {k: v.detach().cpu().contiguous() for k, v in t.items()}

    def _metadata(self) -> dict:
        tensor_fields = {"tokens", "mass", "coactivation", "paths", "domain_tokens", "domain_mass", "hessians",
                         "hessian_tokens", "dense_hessians", "trace_indices", "trace_weights"}
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in tensor_fields}
        meta["experts_paths"] = list(self.experts_paths)
        meta["domains"] = list(self.domains)
        return meta

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(self._tensors(), str(d / TENSORS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        self._save_hessians(d)
        summary = {"format_version": FORMAT_VERSION, "metadata": self._metadata(),
                   "hessians": sorted(self.hessians), "dense_hessians": sorted(self.dense_hessians),
                   "has_trace": self.trace_indices is not None, "layers": self.layer_summary()}
        (d / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        return d

    def _save_hessians(self, d: Path) -> None:
        on_disk = isinstance(self.hessians, HessianFiles)
        if on_disk and self.hessians.directory.resolve() == d.resolve():
            return  # written there already (layer-by-layer calibration with hessian_dir = this directory)
        for stale in d.glob("hessians.*.safetensors"):
            stale.unlink()
        if on_disk:  # copy the files, never load them all
            for layer, src in self.hessians.layer_files().items():
                shutil.copyfile(src, hessian_file(d, layer))
            return
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in self.hessians.items():
            layer, rest = key.split(".", 1)
            by_layer.setdefault(int(layer), {})[rest] = v
        for layer, tensors in by_layer.items():
            write_layer_hessians(d, layer, tensors)

    @classmethod
    def load(cls, directory: str | Path) -> "CalibrationStats":
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / TENSORS_FILE).is_file() or not (d / SUMMARY_FILE).is_file():
            raise MoecompressError(f"{d} is not a calibration stats directory (needs {TENSORS_FILE} and {SUMMARY_FILE})")
        summary = json.loads((d / SUMMARY_FILE).read_text())
        if summary.get("format_version") != FORMAT_VERSION:
            raise MoecompressError(f"{d / SUMMARY_FILE}: format_version {summary.get('format_version')!r}, "
                                   f"this moecompress reads {FORMAT_VERSION}")
        meta = dict(summary["metadata"])
        meta["experts_paths"] = tuple(meta["experts_paths"])
        meta["domains"] = tuple(meta["domains"])
        t = load_file(str(d / TENSORS_FILE))
        return cls(
            **meta,
            tokens=t["tokens"], mass=t["mass"], coactivation=t["coactivation"], paths=t["paths"],
            domain_tokens=t.get("domain_tokens"), domain_mass=t.get("domain_mass"),
            hessians=HessianFiles(d),
            hessian_tokens=t.get("hessian_tokens"),
            dense_hessians={k[len("dense_hessian."):]: v for k, v in t.items() if k.startswith("dense_hessian.")},
            trace_indices=t.get("trace.indices"), trace_weights=t.get("trace.weights"),
        )
