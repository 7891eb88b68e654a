"""The expert statistics shipped with a checkpoint: `expert_stats.safetensors`, read by the runtime's expert store.

Written by export from the run's calibration (popularity for pinning, layer-to-layer paths for prefetch), copied
unchanged into every server bundle by `moecompress shard` (indexed by global expert id). Old checkpoints have no
such file: `read_expert_stats` gives None. The file is listed in the checkpoint's manifest like every other file.

Tensors (L = MoE layers in the order of the format's experts paths, E = experts per layer, D = domains):
    mass         float32 [L, E]     routing-weight mass per expert, each layer normalised to sum 1
    tokens       int64   [L, E]     tokens routed to each expert
    paths        float32 [L-1, E, E] P(expert j used at MoE layer l+1 | expert i used at layer l); rows sum to 1
                                     (uniform 1/E where calibration saw no token use expert i)
    domain_mass  float32 [D, L, E]  mass per domain, normalised per domain and layer ([0, L, E] without domains)
Metadata: format_version, domains (JSON list), experts_paths (JSON list).

Imports only torch, safetensors and our exception type: the runtime depends on this file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moecompress.errors import MoecompressError

EXPERT_STATS_FILE = "expert_stats.safetensors"
STATS_VERSION = 1
ROW_TOLERANCE = 1e-4  # |sum - 1| allowed for a normalised row (float32 sums)


@dataclass(frozen=True, eq=False)
class ExpertStats:
    mass: torch.Tensor  # [L, E] float32, each layer sums to 1
    tokens: torch.Tensor  # [L, E] int64
    paths: torch.Tensor  # [L-1, E, E] float32, rows sum to 1
    domains: tuple[str, ...] = ()
    domain_mass: torch.Tensor | None = None  # [D, L, E] float32; None is stored as [0, L, E]
    experts_paths: tuple[str, ...] = ()  # one per MoE layer (empty: not recorded)

    def __post_init__(self):
        if self.domain_mass is None:
            object.__setattr__(self, "domain_mass", torch.zeros(0, *self.mass.shape, dtype=torch.float32))
        object.__setattr__(self, "domains", tuple(self.domains))
        object.__setattr__(self, "experts_paths", tuple(self.experts_paths))
        check_expert_stats(self)

    @property
    def num_layers(self) -> int:
        return self.mass.shape[0]

    @property
    def num_experts(self) -> int:
        return self.mass.shape[1]

    @classmethod
    def from_counts(cls, mass: torch.Tensor, tokens: torch.Tensor, paths: torch.Tensor,
                    domains: tuple[str, ...] = (), domain_mass: torch.Tensor | None = None,
                    experts_paths: tuple[str, ...] = ()) -> "ExpertStats":
        """Normalise raw calibration counts: mass [L, E] and domain_mass [D, L, E] per layer, paths [L-1, E, E]
        (co-use counts) per row; a layer (row) without any mass (use) becomes uniform."""
        dm = None if domain_mass is None or not len(domains) else normalise(domain_mass.to(torch.float64))
        return cls(mass=normalise(mass.to(torch.float64)), tokens=tokens.to(torch.int64).clone(),
                   paths=normalise(paths.to(torch.float64)), domains=tuple(domains), domain_mass=dm,
                   experts_paths=tuple(experts_paths))


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Each last-dimension row divided by its sum, in float64, returned float32; all-zero rows become uniform."""
    total = x.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(x, 1.0 / x.shape[-1]) if x.shape[-1] else x
    return torch.where(total > 0, x / total.clamp(min=torch.finfo(x.dtype).tiny), uniform).to(torch.float32)


def check_expert_stats(s: ExpertStats, where: str = "expert stats") -> None:
    """Shapes, dtypes and normalisation; MoecompressError naming the tensor."""
    def need(ok: bool, msg: str):
        if not ok:
            raise MoecompressError(f"{where}: {msg}")

    for name, t, dtype, dims in (("mass", s.mass, torch.float32, 2), ("tokens", s.tokens, torch.int64, 2),
                                 ("paths", s.paths, torch.float32, 3), ("domain_mass", s.domain_mass, torch.float32, 3)):
        need(isinstance(t, torch.Tensor) and t.dtype == dtype and t.dim() == dims,
             f"{name} must be a {dims}-D {dtype} tensor, got "
             f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    L, E = s.mass.shape
    need(E > 0, "mass has no experts")
    need(tuple(s.tokens.shape) == (L, E), f"tokens has shape {list(s.tokens.shape)}, mass {[L, E]}")
    need(tuple(s.paths.shape) == (max(L - 1, 0), E, E), f"paths has shape {list(s.paths.shape)}, expected "
         f"{[max(L - 1, 0), E, E]}")
    need(tuple(s.domain_mass.shape) == (len(s.domains), L, E), f"domain_mass has shape "
         f"{list(s.domain_mass.shape)}, expected {[len(s.domains), L, E]} for domains {list(s.domains)}")
    need(all(isinstance(d, str) for d in s.domains) and len(set(s.domains)) == len(s.domains),
         "domains must be distinct strings")
    need(not s.experts_paths or (len(s.experts_paths) == L and all(isinstance(p, str) for p in s.experts_paths)),
         f"experts_paths lists {len(s.experts_paths)} paths for {L} MoE layers")
    need(bool((s.tokens >= 0).all()), "tokens has negative counts")
    for name, t in (("mass", s.mass), ("paths", s.paths), ("domain_mass", s.domain_mass)):
        need(bool(torch.isfinite(t).all()) and bool((t >= 0).all()), f"{name} has negative or non-finite values")
        if t.numel():
            err = float((t.to(torch.float64).sum(-1) - 1).abs().max())
            need(err <= ROW_TOLERANCE, f"{name} rows must sum to 1 (off by {err:.2e})")


def write_expert_stats(checkpoint_dir: str | Path, stats: ExpertStats) -> Path:
    """Write CHECKPOINT/expert_stats.safetensors (the caller lists it in the manifest, as export does)."""
    from safetensors.torch import save_file

    check_expert_stats(stats)
    path = Path(checkpoint_dir) / EXPERT_STATS_FILE
    tensors = {"mass": stats.mass, "tokens": stats.tokens, "paths": stats.paths, "domain_mass": stats.domain_mass}
    # one metadata key: safetensors writes several in no fixed order, and a checkpoint must be byte-identical on resume
    metadata = {"moecompress": json.dumps({"format_version": str(STATS_VERSION), "domains": list(stats.domains),
                                           "experts_paths": list(stats.experts_paths)}, sort_keys=True)}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def read_expert_stats(checkpoint_dir: str | Path) -> ExpertStats | None:
    """The checkpoint's (or bundle's) expert stats; None when it has no such file (checkpoints written before it)."""
    from safetensors import SafetensorError, safe_open

    path = Path(checkpoint_dir) / EXPERT_STATS_FILE
    if not path.exists():
        return None
    from moecompress.format.headers import read_header

    header = read_header(path)  # checked against the file size before anything is read
    names = {"mass", "tokens", "paths", "domain_mass"}
    if set(header) != names:
        raise MoecompressError(f"{path}: tensors {sorted(header)}, expected exactly {sorted(names)}; re-export")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in names}
    except SafetensorError as exc:
        raise MoecompressError(f"{path}: unreadable ({exc}); re-export the checkpoint") from exc
    try:
        meta = json.loads(meta.get("moecompress", "{}"))
    except ValueError:
        raise MoecompressError(f"{path}: metadata is not JSON; re-export the checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format_version") != str(STATS_VERSION):
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise MoecompressError(f"{path}: format_version {version!r}, this moecompress reads "
                               f"{STATS_VERSION}; upgrade moecompress or re-export")
    domains, experts_paths = meta.get("domains", []), meta.get("experts_paths", [])
    if not isinstance(domains, list) or not isinstance(experts_paths, list):
        raise MoecompressError(f"{path}: metadata domains/experts_paths must be JSON lists")
    try:
        return ExpertStats(mass=t["mass"], tokens=t["tokens"], paths=t["paths"], domains=tuple(domains),
                           domain_mass=t["domain_mass"], experts_paths=tuple(experts_paths))
    except MoecompressError as exc:
        raise MoecompressError(f"{path}: {exc}") from None
