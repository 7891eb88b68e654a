"""`moecompress verify DIR`: check a checkpoint, a run directory or a bundle set whole, without loading weights.

- checkpoint: every file against the manifest (sizes, sha256, nothing unlisted), the quantization_config strictly,
  and the safetensors headers against the meta-device model skeleton (runtime/loading/validate.py); the low-bit copies and
  the expert statistics against the format (format/copies.py, format/expert_stats.py);
- bundle set (placement.json): verify_bundles, then each server bundle's structure;
- run directory (recipe.lock.yaml): every finished stage directory against its manifest, and the checkpoint.
The first problem is a MoecompressError naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.format.bundle_set import verify_bundles
from moecompress.format.copies import check_copies
from moecompress.format.expert_stats import read_expert_stats
from moecompress.format.files import (
    MANIFEST,
    PLACEMENT_FILE,
    is_partial,
    refuse_partial,
    verify_files,
    verify_listed,
)
from moecompress.format.spec import FormatSpec
from moecompress.runtime.loading.convert import replace_modules
from moecompress.runtime.loading.load import bundle_holds, check_checkpoint
from moecompress.runtime.loading.validate import check_against_model, check_tensors, stored_tensors

LOCK_FILE = "recipe.lock.yaml"  # written by the pipeline in every run directory


@dataclass(frozen=True)
class Verified:
    kind: str  # "checkpoint" | "bundle set" | "run directory"
    directory: str
    files: int  # files checked against their sha256

    def line(self) -> str:
        return f"ok: {self.directory} is a complete {self.kind} ({self.files} files match their sha256)"


def meta_model(directory: Path):
    """The model skeleton config.json describes, on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(directory))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except MoecompressError:
        raise
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise MoecompressError(f"{directory}/config.json does not describe a model transformers can build "
                               f"({type(exc).__name__}: {str(exc)[:200]})") from None


def check_structure(directory: Path, spec: FormatSpec, partial: bool = False) -> None:
    """The stored tensors against the skeleton the spec implies (`partial`: a bundle without the dense weights)."""
    model = meta_model(directory)
    check_against_model(spec, model)
    replace_modules(model, spec, dtype=torch.float32, device="meta")
    check_tensors(model, stored_tensors(directory), str(directory), partial=partial)


def verify_checkpoint(directory: str | Path) -> Verified:
    directory = Path(directory)
    spec = check_checkpoint(directory, verify=False)  # parsed strictly; the files are checked just below, always
    verify_files(directory)
    holds = bundle_holds(directory)
    if holds != "layers":  # a pipeline stage's bundle holds some layers only: its files are checked, not its skeleton
        check_structure(directory, spec, partial=holds not in (None, "full"))
    check_copies(directory, spec)  # expert_copies.safetensors exactly as copy_bits implies
    read_expert_stats(directory)  # expert_stats.safetensors (when present) well formed
    return Verified("checkpoint", str(directory), len(verify_listed(directory, checksums=False)))


def verify_bundle_set(out: str | Path) -> Verified:
    out = Path(out)
    doc = verify_bundles(out)
    files = 0
    for server in sorted(int(s) for s in doc["files"]):
        files += verify_checkpoint(out / f"server-{server}").files
    return Verified("bundle set", str(out), files + 1)


def verify_run(run: str | Path) -> Verified:
    """Every stage directory that has finished (a manifest) verifies, and the run has its checkpoint."""
    run = Path(run)
    files = 0
    for sub in sorted(p for p in run.iterdir() if p.is_dir() and not is_partial(p)):
        if (sub / "config.json").exists():
            files += verify_checkpoint(sub).files
        elif (sub / MANIFEST).exists():
            files += len(verify_listed(sub))
    if not (run / "checkpoint").is_dir():
        raise MoecompressError(f"{run}: the run is not complete (no checkpoint/); resume it with "
                               f"`moecompress quantize --recipe {run / LOCK_FILE}`")
    return Verified("run directory", str(run), files)


def verify_path(path: str | Path) -> Verified:
    """Whatever DIR is: a bundle set, a run directory or a checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise MoecompressError(f"{path} is not a directory; give a checkpoint, a run directory or a bundle set")
    refuse_partial(path)
    if (path / PLACEMENT_FILE).exists():
        return verify_bundle_set(path)
    if (path / LOCK_FILE).exists():
        return verify_run(path)
    if (path / "config.json").exists():
        return verify_checkpoint(path)
    raise MoecompressError(f"{path} holds no config.json, {PLACEMENT_FILE} or {LOCK_FILE}: it is not a checkpoint, a "
                           "bundle set or a run directory")

