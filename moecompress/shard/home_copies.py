"""`moecompress shard --home-copies BITS`: low-bit copies of remote experts for every home, in the home's bundle.

Every server holding the dense weights can be a home (`deploy(homes=...)`); each gets, in server-K/home-copies/ (the
copies bundle: runtime/edge/tokens_copies.py; the bundle format of format/spec.py, its own manifest, its files
pinned by placement.json), low-bit copies of experts it does not hold: those with the most calibration routing mass
per copy byte within `budget` x the mean server's expert bytes (shard.home.choose_home_copies). The token policy
`localize:copies=true` computes on them. Their tensors are sliced from a low-bit source, never re-quantized: the
checkpoint's own low-bit copies (recipe `store: {copy_bits: B}`, format/copies.py), or `source`, a checkpoint of
the same model storing the experts at B bits (e.g. the whole model exported at B bits with the pipeline).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moecompress.artifacts.placement import Placement
from moecompress.errors import MoecompressError
from moecompress.format.copies import PARTS, copies_file, copy_bytes, copy_experts, read_copy_group
from moecompress.format.files import MANIFEST, sha256_file, verify_files, weight_files, write_manifest
from moecompress.format.headers import read_header
from moecompress.format.sizes import DTYPE_BYTES
from moecompress.format.spec import QUANT_BITS, ExpertsSpec, FormatSpec, group_prefix, read_spec
from moecompress.runtime.edge.tokens_copies import HOME_COPIES_DIR, HOME_COPIES_FILE
from moecompress.shard.bundles import split_group_key
from moecompress.shard.home import choose_home_copies


@dataclass(frozen=True)
class HomeCopies:
    """What `--home-copies` asks for: copies at `bits`, `budget` x the mean server's expert bytes per home, read
    from `source` (a checkpoint storing the experts at `bits`; None: the sharded checkpoint's own low-bit copies)."""

    bits: int
    budget: float = 1.0
    source: str | None = None

    def __post_init__(self):
        if type(self.bits) is not int or self.bits not in QUANT_BITS:
            raise MoecompressError(f"--home-copies {self.bits!r}: allowed bits {', '.join(map(str, QUANT_BITS))}")
        if not isinstance(self.budget, (int, float)) or not math.isfinite(self.budget) or self.budget < 0:
            raise MoecompressError(f"--home-copies-budget {self.budget!r}: a number >= 0 (x the mean server's "
                                   "expert bytes; 1.0 = one server's)")


@dataclass(frozen=True)
class CopySource:
    directory: Path
    spec: FormatSpec
    bits: int
    from_copies: bool  # the checkpoint's expert_copies.safetensors; else its main groups at `bits`
    expert_bytes: np.ndarray  # [L, E] stored bytes of each expert's copy (0: not stored at `bits`)


def copy_source(checkpoint: Path, options: HomeCopies) -> CopySource:
    """Where the copies' tensors come from, checked against the sharded checkpoint (same experts modules)."""
    spec = read_spec(checkpoint)
    paths = list(spec.experts)
    if options.source is None:
        if spec.copy_bits != options.bits:
            have = f"its low-bit copies are at {spec.copy_bits} bits" if spec.copy_bits else "it has no low-bit copies"
            raise MoecompressError(f"--home-copies {options.bits}: {checkpoint} cannot give {options.bits}-bit copies "
                                   f"({have}); quantize with `store: {{copy_bits: {options.bits}}}` in the recipe, or "
                                   f"pass --home-copies-from a checkpoint of this model at {options.bits} bits")
        nbytes = np.zeros((len(paths), max(es.num_experts for es in spec.experts.values())), dtype=np.int64)
        for (path, e), b in copy_bytes(checkpoint, spec).items():
            nbytes[paths.index(path), e] += b
        return CopySource(checkpoint, spec, options.bits, True, nbytes)
    directory = Path(options.source)
    verify_files(directory)
    src = read_spec(directory)
    if list(src.experts) != paths or any(src.experts[p].num_experts != spec.experts[p].num_experts for p in paths):
        raise MoecompressError(f"--home-copies-from {directory}: not a checkpoint of the sharded model (its experts "
                               f"modules {list(src.experts)[:2]}... differ from {paths[:2]}...)")
    nbytes = np.zeros((len(paths), max(es.num_experts for es in src.experts.values())), dtype=np.int64)
    for name in weight_files(directory):
        for key, h in read_header(directory / name).items():
            group = split_group_key(key, src)
            if group is not None and group[2] == options.bits:
                ids = src.experts[group[0]].groups[group[1]][options.bits]
                nbytes[paths.index(group[0]), list(ids)] += math.prod(h.shape) * DTYPE_BYTES[h.dtype] // len(ids)
    for layer, path in enumerate(paths):  # an expert is a candidate only when every projection is at `bits`
        groups = src.experts[path].groups.values()
        at_bits = set.intersection(*(set(g.get(options.bits, ())) for g in groups))
        nbytes[layer, [e for e in range(nbytes.shape[1]) if e not in at_bits]] = 0
    if not nbytes.any():
        raise MoecompressError(f"--home-copies {options.bits}: {directory} stores no expert at {options.bits} bits "
                               f"in every projection; export the model at {options.bits} bits, or pick its bits")
    return CopySource(directory, src, options.bits, False, nbytes)


def server_expert_bytes(placement: Placement) -> np.ndarray:
    """[servers] the bytes of the experts each server holds (replicas included)."""
    per_server = np.zeros(len(placement.memory_bytes))
    for layer, row in enumerate(placement.assignment):
        for e, servers in enumerate(row):
            for n in servers:
                per_server[n] += placement.expert_bytes[layer][e]
    return per_server


def choose_for_homes(placement: Placement, mass, source: CopySource, budget: float) -> dict[int, list[list[int]]]:
    """{home: [L][expert ids]} for every server holding the dense weights (every possible home): its copies within
    `budget` x the mean server's expert bytes, by calibration routing mass (`mass` [L, E]) per copy byte."""
    m = np.where(source.expert_bytes > 0, np.asarray(mass, dtype=np.float64), 0.0)  # no copy: no candidate
    nbytes = int(budget * server_expert_bytes(placement).mean())
    return {h: choose_home_copies(placement, m, source.expert_bytes, nbytes, home=h) for h in placement.dense_servers}


def copies_tensors(source: CopySource, experts: list[list[int]]) -> dict[str, torch.Tensor]:
    """The copies bundle's tensors: per experts module with copies, each projection's group at `bits` holding the
    rows of `experts` (id order), and the module's markers (format/spec.py)."""
    from safetensors import safe_open

    paths, out = list(source.spec.experts), {}
    chosen = {path: sorted(ids) for path, ids in zip(paths, experts) if ids}
    for name in weight_files(source.directory):
        with safe_open(str(source.directory / name), "pt") as f:
            for key in f.keys():
                path = next((p for p in chosen if key.startswith(p + ".")), None)
                if path is None:
                    continue
                group = split_group_key(key, source.spec)
                if group is None:
                    out[key] = f.get_tensor(key)  # the module's marker
                elif group[2] == source.bits and not source.from_copies:
                    rows = list(source.spec.experts[path].groups[group[1]][source.bits])
                    out[key] = f.get_tensor(key)[[rows.index(e) for e in chosen[path]]].contiguous()
    if source.from_copies:
        with safe_open(str(copies_file(source.directory)), "pt") as f:
            for path, ids in chosen.items():
                for proj in source.spec.experts[path].groups:
                    rows = list(copy_experts(source.spec, path, proj))
                    keep = [rows.index(e) for e in ids]
                    for part, t in read_copy_group(f, path, proj, source.bits).items():
                        out[f"{group_prefix(path, proj, source.bits)}.{part}"] = t[keep].contiguous()
    return out


def write_home_copies(bundle: Path, source: CopySource, experts: list[list[int]], home: int) -> dict[str, str]:
    """Write bundle/home-copies/ (the copies bundle of `home`); returns {path in the bundle: sha256} of its files."""
    from safetensors.torch import save_file

    spec, paths = source.spec, list(source.spec.experts)
    out = bundle / HOME_COPIES_DIR
    out.mkdir()
    tensors = copies_tensors(source, experts)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    held = {path: ExpertsSpec(num_experts=spec.experts[path].num_experts,
                              groups={proj: {source.bits: tuple(sorted(ids))} for proj in spec.experts[path].groups})
            for path, ids in zip(paths, experts) if ids}
    sub = FormatSpec(group_size=spec.group_size, symmetric=spec.symmetric, experts=held)
    config = json.loads((source.directory / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": sub.to_dict()}, indent=2))
    nbytes = sum(t.numel() * t.element_size() for key, t in tensors.items() if key.rsplit(".", 1)[-1] in PARTS)
    (out / HOME_COPIES_FILE).write_text(json.dumps({"home": home, "bits": source.bits, "bytes": int(nbytes),
                                                    "experts": [sorted(ids) for ids in experts]}))
    manifest = write_manifest(out, {"format": "moecompress", "home_copies": home})
    files = {f"{HOME_COPIES_DIR}/{n}": v["sha256"] for n, v in manifest["files"].items()}
    files[f"{HOME_COPIES_DIR}/{MANIFEST}"] = sha256_file(out / MANIFEST)
    return files
