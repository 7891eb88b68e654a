"""Checkpoint files: safetensors shards, the shard index, and the checksum manifest `moecompress.json`.

The manifest lists every file that defines the model (config.json, weights, index, tokenizer files, generation
config, a bundle's bundle.json) with its byte size and sha256, and it is required: a directory without a valid one
is refused unless the caller opts out explicitly. Every path read from one of our files (manifest, index,
placement.json) must stay inside its directory and name a regular file. A directory whose name starts with `.` and
contains `.partial` is an unfinished write and is never accepted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from moecompress.errors import MoecompressError

MANIFEST = "moecompress.json"
INDEX = "model.safetensors.index.json"
PLACEMENT_FILE = "placement.json"  # written by `moecompress shard` beside the server-K/ bundles
# Files a loader may read: a file of these kinds in a checkpoint directory must be listed in the manifest.
MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".jinja", ".py", ".gguf",
                  ".tiktoken", ".msgpack", ".h5")
MAX_JSON_BYTES = 256 << 20
SHA256 = re.compile(r"[0-9a-f]{64}")
NO_VERIFY_ENV = "MOECOMPRESS_NO_VERIFY"  # "1": the explicit opt-out of the manifest check, for every loader
NO_VERIFY_HINT = f"pass verify=False (or set {NO_VERIFY_ENV}=1) to load it unchecked"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_partial(path: str | Path) -> bool:
    """A temporary directory of an unfinished write (`.X.partial`, `.X.partial-NNN`), or a path inside one."""
    return any(part.startswith(".") and ".partial" in part for part in Path(path).parts)


def refuse_partial(path: str | Path) -> None:
    if is_partial(Path(path).absolute()):
        raise MoecompressError(f"{path} is the temporary directory of an unfinished (killed or failed) write, not a "
                               "complete output; re-run the command that writes it")


def contained_file(directory: Path, rel, source: str) -> Path:
    """directory/rel for a relative path read from `source`: inside directory (symlinks too), a regular file."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise MoecompressError(f"{source}: file entry {rel!r} is not a plain relative path")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or rel.startswith("~"):
        raise MoecompressError(f"{source}: file entry {rel!r} leaves its directory; only paths inside it are allowed")
    path = directory / rel
    real, root = path.resolve(), directory.resolve()
    if not (real.is_relative_to(root) or _hub_blob(root, real)):
        raise MoecompressError(f"{source}: {rel} is a symlink leading outside {directory}; copy the file in instead")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MoecompressError(f"{directory}: {rel} is missing (listed in {source}); copy it back or re-export") from None
    except OSError as exc:
        raise MoecompressError(f"{directory}: cannot read {rel} ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise MoecompressError(f"{source}: {rel} is not a regular file")
    return path


def _hub_blob(root: Path, real: Path) -> bool:
    """A Hugging Face cache snapshot links its files to the repository's blobs/ folder."""
    return root.parent.name == "snapshots" and real.is_relative_to(root.parent.parent / "blobs")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from a regular file of bounded size, or MoecompressError naming the file."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise MoecompressError(f"{path}: {what} is not a regular file")
        if st.st_size > MAX_JSON_BYTES:
            raise MoecompressError(f"{path}: {what} of {st.st_size} bytes is implausibly large")
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise MoecompressError(f"{path} is missing") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise MoecompressError(f"{path}: {what} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise MoecompressError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if not isinstance(doc, dict):
        raise MoecompressError(f"{path}: {what} must be a JSON object, got {type(doc).__name__}")
    return doc


def weight_files(directory: Path) -> list[str]:
    """Names of the safetensors files a checkpoint directory should hold (from the index when sharded)."""
    directory = Path(directory)
    index = directory / INDEX
    if index.exists():
        weight_map = read_json_object(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MoecompressError(f"{index}: weight_map must be a non-empty mapping of tensor name to file")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not isinstance(name, str) or "/" in name or not name.endswith(".safetensors"):
                raise MoecompressError(f"{index}: weight file {name!r} must be a .safetensors file in the checkpoint")
            contained_file(directory, name, INDEX)
        return names
    if (directory / "model.safetensors").exists():
        return ["model.safetensors"]
    raise MoecompressError(f"{directory}: no model.safetensors and no {INDEX}; is this a checkpoint directory?")


def write_manifest(directory: Path, extra: dict | None = None) -> dict:
    """List every regular, non-hidden file of `directory` (sizes and sha256) in `directory/moecompress.json`."""
    directory = Path(directory)
    names = sorted(p.name for p in directory.iterdir()
                   if p.is_file() and not p.is_symlink() and not p.name.startswith(".") and p.name != MANIFEST)
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
             for name in names}
    manifest = {"files": files, **(extra or {})}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_manifest(directory: Path) -> dict[str, dict]:
    """The manifest's {file: {bytes, sha256}}, every field checked; MoecompressError if absent or malformed."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise MoecompressError(f"{directory}: no {MANIFEST} (the checksum manifest written by moecompress export and "
                               f"shard); the directory is incomplete or was not written by moecompress: re-export it, "
                               f"or {NO_VERIFY_HINT}")
    files = read_json_object(path, "checksum manifest").get("files")
    if not isinstance(files, dict) or not files:
        raise MoecompressError(f"{path}: `files` must be a non-empty mapping of file name to bytes and sha256")
    for name, entry in files.items():
        if (not isinstance(entry, dict) or type(entry.get("bytes")) is not int or entry["bytes"] < 0
                or not isinstance(entry.get("sha256"), str) or not SHA256.fullmatch(entry["sha256"])):
            raise MoecompressError(f"{path}: entry {name!r} needs an integer `bytes` and a 64-hex-digit `sha256`")
    return files


def verify_listed(directory: str | Path, checksums: bool = True) -> dict[str, dict]:
    """Check every file the manifest lists (inside the directory, size, sha256) and that no loadable file is unlisted."""
    directory = Path(directory)
    refuse_partial(directory)
    if not directory.is_dir():
        raise MoecompressError(f"{directory} is not a directory")
    recorded = read_manifest(directory)
    for name in sorted(recorded):
        path = contained_file(directory, name, MANIFEST)
        size = path.stat().st_size
        if size != recorded[name]["bytes"]:
            raise MoecompressError(f"{directory}/{name} has {size} bytes, {recorded[name]['bytes']} expected: "
                                   "the file is truncated or altered")
        if checksums and sha256_file(path) != recorded[name]["sha256"]:
            raise MoecompressError(f"{directory}/{name}: sha256 does not match {MANIFEST}: the file is corrupted or altered")
    for p in sorted(directory.iterdir()):
        if (p.suffix in MODEL_SUFFIXES and p.name != MANIFEST and not p.name.startswith(".")
                and p.name not in recorded and not p.is_dir()):
            raise MoecompressError(f"{directory}/{p.name} is not listed in {MANIFEST}: it was added after export; "
                                   "remove it or re-export")
    return recorded


def verify_files(directory: str | Path, checksums: bool = True) -> None:
    """Raise MoecompressError naming the first missing, truncated, altered, unlisted or misplaced checkpoint file."""
    directory = Path(directory)
    recorded = verify_listed(directory, checksums)
    for name in ["config.json", *weight_files(directory)]:
        if name not in recorded:
            raise MoecompressError(f"{directory}: {name} is not in {MANIFEST}; the checkpoint was modified after export")


@contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to write into; it becomes `final` only if the block completes.

    Leftover siblings of earlier writes whose process is gone (killed) are removed first.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise MoecompressError(f"{final} already exists; choose another output directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_partials(final: Path) -> None:
    """Remove `.<name>.partial-<pid>-*` siblings of `final` left by a process that no longer runs."""
    prefix = f".{final.name}.partial-"
    for p in final.parent.glob(f"{glob_escape(prefix)}*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0
    return True
