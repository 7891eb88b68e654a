"""recipe.lock.yaml: the resolved recipe plus package versions and hashes of its inputs.

The lock file is itself a recipe: `moecompress quantize --recipe run/recipe.lock.yaml` re-runs the same job and
fails if an input (model files, dataset file) no longer has the recorded hash. Resuming a run directory compares the
recipe and the inputs' hashes with its lock file too, so a changed model or dataset never reuses old stages.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path

import yaml

from moecompress.errors import MoecompressError
from moecompress.format.files import MODEL_SUFFIXES
from moecompress.recipe import Recipe, dump_recipe, recipe_from_dict, to_dict

PACKAGES = ("moecompress", "torch", "transformers", "safetensors", "scipy", "numpy")
LOCK_FILE = "recipe.lock.yaml"


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def input_hash(path: str) -> str | None:
    """sha256 over a local file, or over every file of a model directory a loader reads (config, weights,
    tokenizer); None for hub ids."""
    p = Path(path)
    if p.is_file():
        return _sha256_files([p])
    if p.is_dir():
        files = [f for f in p.iterdir() if f.suffix in MODEL_SUFFIXES and f.is_file() and not f.name.startswith(".")]
        return _sha256_files(files)
    return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def make_lock(recipe: Recipe, model_path: str, dataset_path: str) -> dict:
    return {"versions": versions(),
            "inputs": {"model": {"spec": recipe.model, "resolved": model_path, "sha256": input_hash(model_path)},
                       "dataset": {"spec": recipe.calibration.dataset, "resolved": dataset_path,
                                   "sha256": input_hash(dataset_path)}}}


def check_lock(recipe: Recipe, lock: dict) -> None:
    """A recipe that carries a lock must see the same inputs."""
    for name in ("model", "dataset"):
        rec = lock.get("inputs", {}).get(name, {})
        if rec.get("sha256") and input_hash(rec["resolved"]) != rec["sha256"]:
            raise MoecompressError(f"lock file: input {name} ({rec['resolved']}) has changed since the locked run "
                                   f"(sha256 differs); restore it or drop the `lock:` section to accept the change")


def check_resume(out: Path, previous: Recipe, recipe: Recipe, model_path: str, dataset_path: str) -> None:
    """Resuming `out` needs the recipe and the input files its finished stages were computed from."""
    start_over = (f"to start over, delete {out} (or choose another --out); to resume, restore the inputs and recipe "
                  f"of {out / LOCK_FILE}")
    if job_identity(previous) != job_identity(recipe):
        raise MoecompressError(f"{out} holds a run of a different recipe (see {out / LOCK_FILE}); {start_over}")
    now = {"model": model_path, "dataset": dataset_path}
    for name, rec in (previous.lock or {}).get("inputs", {}).items():
        if name not in now or not isinstance(rec, dict) or not rec.get("sha256"):
            continue
        current = input_hash(now[name])
        if current != rec["sha256"]:
            raise MoecompressError(f"{out}: input {name} ({now[name]}) has changed since this run started (sha256 "
                                   f"{rec['sha256'][:12]}... recorded, {str(current)[:12]}... now), so its finished "
                                   f"stages no longer apply; {start_over}")


def job_identity(recipe: Recipe) -> dict:
    """What must match for a run directory to be resumed: the recipe without output and lock."""
    d = to_dict(dataclasses.replace(recipe, lock=None))
    d.pop("output")
    d.pop("lock")
    return d


def write_lock(out: Path, recipe: Recipe, lock: dict) -> None:
    """Written whole or not at all (a temporary file renamed into place)."""
    tmp = out / f".{LOCK_FILE}.partial-{os.getpid()}"
    tmp.write_text(dump_recipe(dataclasses.replace(recipe, output=str(out), lock=lock)))
    os.replace(tmp, out / LOCK_FILE)


def read_lock(out: Path) -> Recipe | None:
    path = out / LOCK_FILE
    if not path.exists():
        return None
    try:
        return recipe_from_dict(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise MoecompressError(f"{path} is damaged ({type(exc).__name__}); delete {out} to start over") from None
