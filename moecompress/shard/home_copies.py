"""`moecompress shard --home-copies BITS`: low-bit copies of remote experts for every home, in the home's bundle.

Every server holding the dense weights can be a home (`deploy(homes=...)`); each gets, in server-K/home-copies/ (the
copies bundle: runtime/edge/tokens_copies.py; the bundle format of format/spec.py, its own manifest, its files
pinned by placement.json), low-bit copies of experts it does not hold: those with the most calibration routing mass
per copy byte within `budget` x the mean server's expert bytes (shard.home.choose_home_copies). The token policy
`localize:copies=true` computes on them. Their tensors are sliced from a low-bit source, never re-quantized: the
checkpoint's own low-bit copies (recipe `store: {copy_bits: B}`, format/copies.py), or `source`, a checkpoint of
the same model storing the experts at B bits (e.g. the whole model exported at B bits with the pipeline).
Mixed-bit copies (`--home-copies-high H`): within the same budget, the hottest remote experts (routing mass per byte)
at H bits on a share of it (`--home-copies-high-share`, default 0.5), chosen first, then the rest at B bits; the one
copies bundle holds both widths (a mixed checkpoint), home_copies.json lists which experts are at H ("high").
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
from moecompress.shard.home import choose_home_copies, choose_mixed_home_copies


DEFAULT_HIGH_SHARE = 0.5  # --home-copies-high-share: the session-26 bench's best share on both reference models


@dataclass(frozen=True)
class HomeCopies:
    """What `--home-copies` asks for: copies at `bits`, `budget` x the mean server's expert bytes per home, read
    from `source` (a checkpoint storing the experts at `bits`; None: the sharded checkpoint's own low-bit copies)."""

    bits: int
    budget: float = 1.0
    source: str | None = None
    high_bits: int | None = None  # mixed-bit copies: the hottest at high_bits on high_share of the budget
    high_share: float | None = None  # None: DEFAULT_HIGH_SHARE
    high_source: str | None = None  # None: the sharded checkpoint (its copies at high_bits, else its experts)

    def __post_init__(self):
        if type(self.bits) is not int or self.bits not in QUANT_BITS:
            raise MoecompressError(f"--home-copies {self.bits!r}: allowed bits {', '.join(map(str, QUANT_BITS))}")
        if not isinstance(self.budget, (int, float)) or not math.isfinite(self.budget) or self.budget < 0:
            raise MoecompressError(f"--home-copies-budget {self.budget!r}: a number >= 0 (x the mean server's "
                                   "expert bytes; 1.0 = one server's)")
        if self.high_bits is None:
            if self.high_share is not None or self.high_source is not None:
                flag = "--home-copies-high-share" if self.high_share is not None else "--home-copies-high-from"
                raise MoecompressError(f"{flag} is for mixed-bit copies: add --home-copies-high BITS")
            return
        if type(self.high_bits) is not int or self.high_bits not in QUANT_BITS or self.high_bits <= self.bits:
            raise MoecompressError(f"--home-copies-high {self.high_bits!r}: bits above --home-copies {self.bits} "
                                   f"(allowed {', '.join(map(str, QUANT_BITS))})")
        share = self.high_share
        if share is not None and (not isinstance(share, (int, float)) or not math.isfinite(share)
                                  or not 0 <= share <= 1):
            raise MoecompressError(f"--home-copies-high-share {share!r}: a number in [0, 1] (the share of the "
                                   "budget spent on the high-bit copies)")

    @property
    def share(self) -> float:
        return DEFAULT_HIGH_SHARE if self.high_share is None else float(self.high_share)


@dataclass(frozen=True)
class CopySource:
    directory: Path
    spec: FormatSpec
    bits: int
    from_copies: bool  # the checkpoint's expert_copies.safetensors; else its main groups at `bits`
    expert_bytes: np.ndarray  # [L, E] stored bytes of each expert's copy (0: not stored at `bits`)


def copy_source(checkpoint: Path, options: HomeCopies) -> CopySource:
    """Where the copies' tensors come from, checked against the sharded checkpoint (same experts modules)."""
    return source_at(checkpoint, options.bits, options.source, "--home-copies", "--home-copies-from", main=False)


def high_copy_source(checkpoint: Path, options: HomeCopies) -> CopySource:
    """Where the high-bit copies come from: --home-copies-high-from, else the sharded checkpoint's own low-bit copies
    when they are at those bits, else the experts it stores at those bits (e.g. an 8-bit model: its own tensors)."""
    return source_at(checkpoint, options.high_bits, options.high_source, "--home-copies-high",
                     "--home-copies-high-from", main=True)


def source_at(checkpoint: Path, bits: int, source: str | None, flag: str, from_flag: str, main: bool) -> CopySource:
    """The copies at `bits` from `source` (a checkpoint of the same model), else from `checkpoint`'s own low-bit
    copies, else (`main`) from the experts `checkpoint` stores at `bits`."""
    spec = read_spec(checkpoint)
    paths = list(spec.experts)
    if source is None:
        if spec.copy_bits != bits and main:
            have = f" (its low-bit copies are at {spec.copy_bits} bits)" if spec.copy_bits else ""
            return main_groups_source(checkpoint, spec, bits, f"{flag} {bits}: {checkpoint} stores no expert at "
                                      f"{bits} bits in every projection{have}; pass {from_flag} a checkpoint of this "
                                      f"model at {bits} bits")
        if spec.copy_bits != bits:
            have = f"its low-bit copies are at {spec.copy_bits} bits" if spec.copy_bits else "it has no low-bit copies"
            raise MoecompressError(f"{flag} {bits}: {checkpoint} cannot give {bits}-bit copies "
                                   f"({have}); quantize with `store: {{copy_bits: {bits}}}` in the recipe, or "
                                   f"pass {from_flag} a checkpoint of this model at {bits} bits")
        nbytes = np.zeros((len(paths), max(es.num_experts for es in spec.experts.values())), dtype=np.int64)
        for (path, e), b in copy_bytes(checkpoint, spec).items():
            nbytes[paths.index(path), e] += b
        return CopySource(checkpoint, spec, bits, True, nbytes)
    directory = Path(source)
    verify_files(directory)
    src = read_spec(directory)
    if list(src.experts) != paths or any(src.experts[p].num_experts != spec.experts[p].num_experts for p in paths):
        raise MoecompressError(f"{from_flag} {directory}: not a checkpoint of the sharded model (its experts "
                               f"modules {list(src.experts)[:2]}... differ from {paths[:2]}...)")
    return main_groups_source(directory, src, bits, f"{flag} {bits}: {directory} stores no expert at {bits} bits in "
                              f"every projection; export the model at {bits} bits, or pick its bits")


def main_groups_source(directory: Path, src: FormatSpec, bits: int, error: str) -> CopySource:
    """The experts `directory` stores at `bits` in every projection (its main groups) as a copies source; `error`
    when there is none."""
    paths = list(src.experts)
    nbytes = np.zeros((len(paths), max(es.num_experts for es in src.experts.values())), dtype=np.int64)
    for name in weight_files(directory):
        for key, h in read_header(directory / name).items():
            group = split_group_key(key, src)
            if group is not None and group[2] == bits:
                ids = src.experts[group[0]].groups[group[1]][bits]
                nbytes[paths.index(group[0]), list(ids)] += math.prod(h.shape) * DTYPE_BYTES[h.dtype] // len(ids)
    for layer, path in enumerate(paths):  # an expert is a candidate only when every projection is at `bits`
        groups = src.experts[path].groups.values()
        at_bits = set.intersection(*(set(g.get(bits, ())) for g in groups))
        nbytes[layer, [e for e in range(nbytes.shape[1]) if e not in at_bits]] = 0
    if not nbytes.any():
        raise MoecompressError(error)
    return CopySource(directory, src, bits, False, nbytes)


def server_expert_bytes(placement: Placement) -> np.ndarray:
    """[servers] the bytes of the experts each server holds (replicas included)."""
    per_server = np.zeros(len(placement.memory_bytes))
    for layer, row in enumerate(placement.assignment):
        for e, servers in enumerate(row):
            for n in servers:
                per_server[n] += placement.expert_bytes[layer][e]
    return per_server


def choose_for_homes(placement: Placement, mass, source: CopySource, budget: float, high: CopySource | None = None,
                     share: float = 0.0) -> dict[int, list[tuple[CopySource, list[list[int]]]]]:
    """{home: [(source, [L][expert ids])]} for every server holding the dense weights (every possible home): its
    copies within `budget` x the mean server's expert bytes, by calibration routing mass (`mass` [L, E]) per copy
    byte. With `high`: first the `high` copies within `share` x that budget, then `source`'s in what is left (the
    experts chosen at high bits are not candidates again); the high part first."""
    nbytes = int(budget * server_expert_bytes(placement).mean())
    if high is not None:
        return {h: list(zip((high, source), choose_mixed_home_copies(placement, mass, high.expert_bytes,
                                                                      source.expert_bytes, nbytes, share, home=h)))
                for h in placement.dense_servers}
    m = np.where(source.expert_bytes > 0, np.asarray(mass, dtype=np.float64), 0.0)  # no copy: no candidate
    return {h: [(source, choose_home_copies(placement, m, source.expert_bytes, nbytes, home=h))]
            for h in placement.dense_servers}


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


def write_home_copies(bundle: Path, parts: list[tuple[CopySource, list[list[int]]]], home: int) -> dict[str, str]:
    """Write bundle/home-copies/ (the copies bundle of `home`) from `parts` [(source, [L][ids])] (one part, or the
    high-bit part then the low-bit one: one bundle holding both widths); returns {path in the bundle: sha256} of its
    files."""
    from safetensors.torch import save_file

    low = parts[-1][0]
    for src, _ in parts[:-1]:
        if (src.spec.group_size, src.spec.symmetric) != (low.spec.group_size, low.spec.symmetric):
            raise MoecompressError(f"--home-copies-high-from {src.directory}: group size {src.spec.group_size} "
                                   f"(symmetric {src.spec.symmetric}) differs from the {low.bits}-bit copies' "
                                   f"{low.spec.group_size} ({low.spec.symmetric}); one copies bundle holds one")
    spec, paths = low.spec, list(low.spec.experts)
    out = bundle / HOME_COPIES_DIR
    out.mkdir()
    tensors = {}
    for src, experts in parts:
        tensors.update(copies_tensors(src, experts))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    held = {}
    for layer, path in enumerate(paths):
        widths = {src.bits: tuple(sorted(experts[layer])) for src, experts in parts if experts[layer]}
        if widths:
            held[path] = ExpertsSpec(num_experts=spec.experts[path].num_experts,
                                     groups={proj: dict(widths) for proj in spec.experts[path].groups})
    sub = FormatSpec(group_size=spec.group_size, symmetric=spec.symmetric, experts=held)
    config = json.loads((low.directory / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": sub.to_dict()}, indent=2))
    nbytes = sum(t.numel() * t.element_size() for key, t in tensors.items() if key.rsplit(".", 1)[-1] in PARTS)
    union = [sorted(e for _, experts in parts for e in experts[layer]) for layer in range(len(paths))]
    desc = {"home": home, "bits": low.bits, "bytes": int(nbytes), "experts": union}
    if len(parts) > 1:  # mixed-bit: which of `experts` are at the high bits (the others at `bits`)
        desc["high"] = {"bits": parts[0][0].bits, "experts": [sorted(ids) for ids in parts[0][1]]}
    (out / HOME_COPIES_FILE).write_text(json.dumps(desc))
    manifest = write_manifest(out, {"format": "moecompress", "home_copies": home})
    files = {f"{HOME_COPIES_DIR}/{n}": v["sha256"] for n, v in manifest["files"].items()}
    files[f"{HOME_COPIES_DIR}/{MANIFEST}"] = sha256_file(out / MANIFEST)
    return files
