"""Loading our C++ kernel modules: a finished build is imported directly, a missing one is built by torch.

torch.utils.cpp_extension.load builds a module (ninja, cached in torch's extension directory) and imports it. Merely
importing torch.utils.cpp_extension imports setuptools, distutils and packaging (91 modules): on refmoe-qwen3 that
was 3.6 MB of process memory (a third of a 4-bit checkpoint's 9.6 MB) and part of every load, for a module that was
built once long ago. `load_extension` imports the built file itself when it is there and no build is under way
(no build lock, ours or torch's, in its directory); otherwise, or when that import fails, it builds through
torch under `build_lock.build_guard`, as before. A build's name (`extension_name`) hashes its sources, flags and
whatever else selects the build (torch version, CPU), so a file found under that name was built from exactly these:
torch's own load rebuilds when they change (ninja compares the commands), and a new name does the same here.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from moecompress.runtime.kernels.build_lock import PID_FILE, TORCH_LOCK, build_guard

SUFFIX = ".pyd" if sys.platform == "win32" else ".so"  # what torch.utils.cpp_extension names a Python module


def extension_name(prefix: str, sources: list[Path], flags: list[str], *select: str) -> str:
    """prefix_<12 hex digits of sha256 over the sources' text (the headers among them too), the flags and
    `select`>."""
    text = "".join(Path(p).read_text() for p in sources)
    return f"{prefix}_{hashlib.sha256((''.join(select) + ' '.join(flags) + text).encode()).hexdigest()[:12]}"


def build_directory(name: str) -> Path:
    """Where torch.utils.cpp_extension builds module `name` (its _get_build_directory, without importing it):
    $TORCH_EXTENSIONS_DIR/name, else <torch's cache>/py<version>_<accelerator>/name."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch import _appdirs

        if torch.version.hip is not None:
            accelerator = f"rocm{torch.version.hip.replace('.', '')}"
        elif torch.version.cuda is not None:
            accelerator = f"cu{torch.version.cuda.replace('.', '')}"
        else:
            accelerator = "cpu"
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions")),
                            f"{python}_{accelerator}")
    return Path(root) / name


def built_module(name: str):
    """The module `name` imported from its finished build, or None (not built, a build under way, or unloadable)."""
    directory = build_directory(name)
    path = directory / f"{name}{SUFFIX}"
    if not path.is_file() or (directory / PID_FILE).exists() or (directory / TORCH_LOCK).exists():
        return None
    try:  # as torch.utils.cpp_extension._import_module_from_library does
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError):
        return None
    return module


def load_extension(name: str, sources: list[Path], extra_cflags: list[str], extra_ldflags: list[str]):
    """The built module `name`, building it from `sources` first where needed (raises what the build raises)."""
    module = built_module(name)
    if module is not None:
        return module
    from torch.utils.cpp_extension import load

    with build_guard(build_directory(name)):  # survives a build killed earlier
        # copies: torch appends its own flags to the lists it is given (_prepare_ldflags), which would change the
        # caller's flags and so the name build_name computes after a build in this process
        return load(name=name, sources=[str(p) for p in sources], extra_cflags=list(extra_cflags),
                    extra_ldflags=list(extra_ldflags), verbose=False)
