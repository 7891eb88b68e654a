"""Loading our C++ modules (runtime/kernels/extension.py): a finished build is imported without torch's build
machinery; anything else (no file, a build under way, a file that does not load) goes through torch's build."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moecompress.runtime.kernels import cpu_lowbit, extension
from moecompress.runtime.kernels.build_lock import PID_FILE, TORCH_LOCK


@pytest.mark.parametrize("own_root", [False, True])
def test_build_directory_is_torchs(own_root, tmp_path, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    if own_root:
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    else:
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    name = f"moecompress_probe_{os.getpid()}"
    try:
        assert extension.build_directory(name) == Path(_get_build_directory(name, verbose=False))
    finally:
        if not own_root:  # torch creates the directory
            Path(_get_build_directory(name, verbose=False)).rmdir()


def test_the_name_changes_with_sources_flags_and_selection(tmp_path):
    src = tmp_path / "a.cpp"
    src.write_text("int f() { return 1; }")
    name = extension.extension_name("m", [src], ["-O3"], "x86_64", "2.13")
    assert name == extension.extension_name("m", [src], ["-O3"], "x86_64", "2.13")
    assert name.startswith("m_") and len(name) == len("m_") + 12
    others = {extension.extension_name("m", [src], ["-O2"], "x86_64", "2.13"),
              extension.extension_name("m", [src], ["-O3"], "aarch64", "2.13")}
    src.write_text("int f() { return 2; }")
    others.add(extension.extension_name("m", [src], ["-O3"], "x86_64", "2.13"))
    assert name not in others and len(others) == 3


def test_no_file_a_build_under_way_or_a_broken_file_is_not_imported(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = "moecompress_probe_broken"
    assert extension.built_module(name) is None  # nothing built
    directory = extension.build_directory(name)
    directory.mkdir()
    (directory / f"{name}{extension.SUFFIX}").write_bytes(b"not a shared object")
    assert extension.built_module(name) is None  # fails to load: None, never an exception
    for lock in (PID_FILE, TORCH_LOCK):
        (directory / lock).write_text("1")
        assert extension.built_module(name) is None
        (directory / lock).unlink()


@pytest.mark.skipif(not cpu_lowbit.available(), reason="the low-bit C++ kernels are not built")
def test_a_built_module_loads_without_torchs_build_machinery():
    """In a fresh process, the kernels load from their build (built above) and setuptools & co. are never imported
    (session 27: 91 modules, 3.6 MB of RSS on every load)."""
    assert extension.built_module(cpu_lowbit.build_name()) is not None
    code = ("import sys, moecompress.runtime.kernels.cpu_lowbit as c\n"
            "assert c.available()\n"
            "print(sorted(m for m in ('torch.utils.cpp_extension', 'setuptools', 'distutils') if m in sys.modules))\n")
    env = {k: v for k, v in os.environ.items() if k != "MOECOMPRESS_NO_CPP"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
