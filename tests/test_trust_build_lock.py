"""The kernel build survives a killed build: a stale lock is detected by pid and removed (issue 15)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from moecompress.runtime.kernels.build_lock import PID_FILE, TORCH_LOCK, build_guard


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_locks_of_a_killed_build_are_removed(tmp_path):
    (tmp_path / TORCH_LOCK).write_text("")  # torch's baton, left by the killed build
    (tmp_path / PID_FILE).write_text(str(_dead_pid()))
    with pytest.warns(UserWarning, match="left by a killed build"):
        with build_guard(tmp_path, wait_s=5):
            assert not (tmp_path / TORCH_LOCK).exists()
            assert (tmp_path / PID_FILE).read_text() == str(os.getpid())
    assert not (tmp_path / PID_FILE).exists()


def test_a_live_builder_is_waited_for_then_timeout(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / PID_FILE).write_text(str(proc.pid))
        (tmp_path / TORCH_LOCK).write_text("")  # a build in progress: must not be touched
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=str(proc.pid)):
            with build_guard(tmp_path, wait_s=1, poll_s=0.1):
                pass
        assert time.monotonic() - start < 30
        assert (tmp_path / TORCH_LOCK).exists()
    finally:
        proc.kill()
        proc.wait()
    with pytest.warns(UserWarning):  # the builder is gone: its locks are taken over
        with build_guard(tmp_path, wait_s=5):
            pass


@pytest.mark.slow
def test_kernels_load_after_a_killed_build(tmp_path):
    """A torch lock left in the real build directory (as a kill mid-compile leaves it) no longer hangs the load."""
    code = ("import moecompress.runtime.kernels.cpu_kernels as k\n"
            "from moecompress.runtime.kernels.extension import build_directory\n"
            "d = build_directory(k.build_name())\n"
            "(d / 'lock').write_text('')\n"
            "print('available', k.available())\n")
    env = {k: v for k, v in os.environ.items() if k != "MOECOMPRESS_NO_CPP"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=540, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "available" in proc.stdout
