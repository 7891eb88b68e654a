"""The ARM64 NEON + dotprod decode kernel (csrc/lowbit/isa_neon.cpp), under emulation.

tests/cpu_neon/harness.cpp runs it against the portable kernel and a float64 reference (bits 2/3/4/8, groups
32/64/128, symmetric and asymmetric, 1/3/5 rows; tolerance 1e-5 of sum |x_hat| |W|, float32 summation), built with
an aarch64 cross compiler and run with qemu-user. Skips where those are not installed
(`apt-get install g++-aarch64-linux-gnu qemu-user`). Speed on real ARM hardware is not measured by this test.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOWBIT = REPO / "moecompress" / "runtime" / "kernels" / "csrc" / "lowbit"
CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")


def test_neon_dotprod_kernel_matches_the_portable_kernel_and_the_reference(tmp_path):
    if not (shutil.which(CXX) and shutil.which(QEMU) and SYSROOT.is_dir()):
        pytest.skip(f"no {CXX} / {QEMU}: apt-get install g++-aarch64-linux-gnu qemu-user")
    exe = tmp_path / "harness"
    # baseline armv8-a: the kernel's own target pragma must enable dotprod
    subprocess.run([CXX, "-O2", "-std=c++17", "-march=armv8-a", f"-I{LOWBIT}", str(REPO / "tests/cpu_neon/harness.cpp"),
                    str(LOWBIT / "isa_neon.cpp"), str(LOWBIT / "isa_portable.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, timeout=300)
    run = subprocess.run([QEMU, "-L", str(SYSROOT), str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("PASSED"), run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.count("ok ") == 72  # every case ran
    dump = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(exe)], capture_output=True, text=True)
    if dump.returncode == 0:
        assert "sdot" in dump.stdout  # the dot-product instructions, not a scalar fallback
