"""recipe.lock.yaml: the resolved recipe plus package versions and hashes of its inputs.

The lock file is itself a recipe: `moecompress quantize --recipe run/recipe.lock.yaml` re-runs the same job and
fails if an input (model files, dataset file) no longer has the recorded hash.
"""
from __future__ import annotations

import dataclasses
import hashlib
import platform
from importlib import metadata
from pathlib import Path

import yaml

from moecompress.errors import MoecompressError
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
    """sha256 over a local file, or over a model directory's config and weight files; None for hub ids."""
    p = Path(path)
    if p.is_file():
        return _sha256_files([p])
    if p.is_dir():
        files = [f for f in p.iterdir() if f.suffix in (".json", ".safetensors") and f.is_file()]
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


def job_identity(recipe: Recipe) -> dict:
    """What must match for a run directory to be resumed: the recipe without output and lock."""
    d = to_dict(dataclasses.replace(recipe, lock=None))
    d.pop("output")
    d.pop("lock")
    return d


def write_lock(out: Path, recipe: Recipe, lock: dict) -> None:
    (out / LOCK_FILE).write_text(dump_recipe(dataclasses.replace(recipe, output=str(out), lock=lock)))


def read_lock(out: Path) -> Recipe | None:
    path = out / LOCK_FILE
    return recipe_from_dict(yaml.safe_load(path.read_text())) if path.exists() else None
