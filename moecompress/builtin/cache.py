"""Where the built-in model and data live: built once per machine, outside the repo, never half-written.

Cache root: $MOECOMPRESS_CACHE, else ~/.cache/moecompress. Entries are keyed by the build format and the Python
version (each release ships its own stdlib, hence its own corpus and model), e.g.
`<root>/builtin/demo-qwen3moe-b1-py3.11.7/`. An entry is built into a fresh temporary sibling directory and
renamed into place in one `os.rename`; a directory at the final path is therefore always complete. Two processes
that build at once both finish and the second rename fails harmlessly (its copy is deleted): no lock needed.
A build killed midway leaves a `.tmp-*` directory that later builds delete once it is a day old.
"""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from moecompress.builtin.corpus import write_corpus_jsonl
from moecompress.builtin.train import BuildSpec, build_model
from moecompress.errors import MoecompressError

BUILD_FORMAT = 1  # bump when the corpus, tokenizer or training recipe changes: old entries are then ignored
MODEL_PREFIX = "builtin:"
_STALE_TMP_SECONDS = 24 * 3600

# name -> build spec; the only model built in for now
BUILTIN_MODELS: dict[str, BuildSpec] = {"demo-qwen3moe": BuildSpec()}
# dataset name -> corpus split
BUILTIN_DATASETS: dict[str, str] = {"stdlib-calib": "calib", "stdlib-eval": "eval"}


def cache_root() -> Path:
    env = os.environ.get("MOECOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moecompress"


def _entry_dir(name: str) -> Path:
    return cache_root() / "builtin" / f"{name}-b{BUILD_FORMAT}-py{platform.python_version()}"


def _cached(final: Path, build: Callable[[Path], None]) -> Path:
    """`final` if it exists, else `build(tmp)` into a temporary sibling and rename it to `final`."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        build(tmp / final.name)  # the same name as the final entry: what the build writes may name itself
        try:
            os.rename(tmp / final.name, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_tmp(parent: Path) -> None:
    now = time.time()
    for p in parent.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def builtin_model_dir(name: str = "demo-qwen3moe", progress: bool = True) -> Path:
    """The directory of built-in model `name` (model, tokenizer, corpus/, build_info.json), built if missing.

    The first call on a machine trains the model on CPU for a few minutes; later calls return at once.
    """
    if name not in BUILTIN_MODELS:
        raise MoecompressError(f"unknown built-in model {name!r}; built in: {sorted(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    return _cached(_entry_dir(name), lambda out: build_model(out, spec, progress=progress))


def builtin_dataset_path(name: str) -> Path:
    """The .jsonl.gz file of built-in dataset `name` (seconds to build; needs no model)."""
    if name not in BUILTIN_DATASETS:
        raise MoecompressError(f"unknown built-in dataset {name!r}; built in: {sorted(BUILTIN_DATASETS)}")
    split = BUILTIN_DATASETS[name]

    def build(out: Path) -> None:
        out.mkdir(parents=True)
        write_corpus_jsonl(out / f"{split}.jsonl.gz", split)

    return _cached(_entry_dir(name), build) / f"{split}.jsonl.gz"


def resolve_model(spec: str) -> str:
    """`builtin:<name>` -> the local directory of that built-in model (built if missing); anything else unchanged."""
    if spec.startswith(MODEL_PREFIX):
        return str(builtin_model_dir(spec[len(MODEL_PREFIX):]))
    path = Path(spec).expanduser()
    if path.exists() and not path.is_dir():
        raise MoecompressError(f"model {spec!r} is a file; give the model's directory (config.json, safetensors)")
    if not path.exists() and (spec.startswith(("/", ".", "~")) or spec.count("/") > 1):
        raise MoecompressError(f"model {spec!r} does not exist: give a local model directory, a hub id (owner/name) "
                               "or builtin:NAME")
    return spec


def resolve_dataset(spec: str) -> str:
    """`builtin:stdlib-calib` / `builtin:stdlib-eval` -> a local .jsonl.gz path; anything else unchanged."""
    if spec.startswith(MODEL_PREFIX):
        return str(builtin_dataset_path(spec[len(MODEL_PREFIX):]))
    return spec
