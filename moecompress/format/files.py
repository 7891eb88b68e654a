"""Checkpoint files: safetensors shards, the shard index, and the checksum manifest `moecompress.json`.

The manifest lists every weight file with its byte size and sha256, so a truncated, altered or missing file is a
clear error before any tensor is read. `config.json` alone still says how to build the model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moecompress.errors import MoecompressError

MANIFEST = "moecompress.json"
INDEX = "model.safetensors.index.json"
PLACEMENT_FILE = "placement.json"  # written by `moecompress shard` beside the server-K/ bundles


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_files(directory: Path) -> list[str]:
    """Names of the safetensors files a checkpoint directory should hold (from the index when sharded)."""
    index = directory / INDEX
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (directory / "model.safetensors").exists():
        return ["model.safetensors"]
    raise MoecompressError(f"{directory}: no model.safetensors and no {INDEX}; is this a checkpoint directory?")


def write_manifest(directory: Path, extra: dict | None = None) -> dict:
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
             for name in weight_files(directory)}
    manifest = {"files": files, **(extra or {})}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_files(directory: str | Path, checksums: bool = True) -> None:
    """Raise MoecompressError naming the first missing, truncated or altered weight file."""
    directory = Path(directory)
    names = weight_files(directory)
    for name in names:
        if not (directory / name).exists():
            raise MoecompressError(f"{directory}: weight file {name} is missing (listed in {INDEX}); copy it back or re-export")
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        return
    recorded = json.loads(manifest_path.read_text())["files"]
    for name in names:
        if name not in recorded:
            raise MoecompressError(f"{directory}: {name} is not in {MANIFEST}; the checkpoint was modified after export")
        size = (directory / name).stat().st_size
        if size != recorded[name]["bytes"]:
            raise MoecompressError(
                f"{directory}/{name} has {size} bytes, {recorded[name]['bytes']} expected: the file is truncated or altered"
            )
        if checksums and sha256_file(directory / name) != recorded[name]["sha256"]:
            raise MoecompressError(f"{directory}/{name}: sha256 does not match {MANIFEST}: the file is corrupted or altered")


def verify_bundles(out: str | Path) -> dict:
    """Check every server bundle against placement.json's sha256 list; returns placement.json's content."""
    out = Path(out)
    if not (out / PLACEMENT_FILE).exists():
        raise MoecompressError(f"{out} has no {PLACEMENT_FILE}; is it the output of `moecompress shard`?")
    doc = json.loads((out / PLACEMENT_FILE).read_text())
    for server, entries in doc["files"].items():
        bundle = out / f"server-{server}"
        if not bundle.is_dir():
            raise MoecompressError(f"bundle {bundle} is missing (placement.json lists server {server})")
        for rel, digest in entries.items():
            path = out / rel
            if not path.exists():
                raise MoecompressError(f"{path} is missing from the bundles")
            if sha256_file(path) != digest:
                raise MoecompressError(f"{path}: sha256 does not match {PLACEMENT_FILE}; the bundle was altered")
    return doc


@contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to write into; it becomes `final` only if the block completes."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise MoecompressError(f"{final} already exists; choose another output directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
