"""A kernel build that survives a killed build: our own pid lock around torch's cpp_extension build.

torch's `load()` guards its build directory with a plain `lock` file and waits forever while it exists; a process
killed mid-build leaves it behind, and every later load hangs. Builds of our kernels take `build_guard` first: a
lock file holding the builder's pid, taken over when that process is gone. Whoever holds it knows no build of ours
is running, so a torch `lock` found then was left by a killed build and is removed. A live builder is waited for
up to `wait_s`, then TimeoutError (the caller falls back to the torch-ops paths with a warning).
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PID_FILE = "moecompress.build.pid"
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory
FRESH_S = 10.0  # a pid file younger than this may still be being written


def _holder(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_take(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


@contextmanager
def build_guard(directory: str | Path, wait_s: float = 900.0, poll_s: float = 0.5) -> Iterator[None]:
    """Hold the build lock of `directory` (see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pid_file = directory / PID_FILE
    deadline = time.monotonic() + wait_s
    while not _try_take(pid_file):
        holder = _holder(pid_file)
        try:
            age = time.time() - pid_file.stat().st_mtime
        except FileNotFoundError:
            continue
        if (holder is None and age > FRESH_S) or (holder is not None and holder != os.getpid() and not _alive(holder)):
            pid_file.unlink(missing_ok=True)  # the builder was killed: take over
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {holder} has held the kernel build lock {pid_file} for over {wait_s:.0f} s")
        time.sleep(poll_s)
    try:
        stale = directory / TORCH_LOCK
        if stale.exists():
            warnings.warn(f"moecompress: removing the kernel build lock {stale} left by a killed build")
            stale.unlink(missing_ok=True)
        yield
    finally:
        pid_file.unlink(missing_ok=True)
