"""SIGKILL at many points of `moecompress quantize` (every stage, export included): whatever a killed run leaves,
nothing incomplete verifies or loads, and the resumed run's checkpoint is byte-identical to an uninterrupted one
(issue 15). Slow: one subprocess per kill point."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import moecompress
from moecompress.errors import MoecompressError
from moecompress.pipeline import quantize
from moecompress.recipe import recipe_from_dict
from moecompress.runtime.loading.verify import verify_checkpoint, verify_path

from helpers import make_job_inputs


# The killed process: patch one function so that its n-th call kills the process (SIGKILL, no cleanup), then run
# the CLI. `save_file` is patched before moecompress imports it; `os.replace` renames every stage into place.
DRIVER = """
import os, signal, sys
target, nth = sys.argv[1], int(sys.argv[2])
calls = [0]
def wrap(fn):
    def killer(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return killer
if target == "replace":
    os.replace = wrap(os.replace)
elif target == "save_file":
    import safetensors.torch
    safetensors.torch.save_file = wrap(safetensors.torch.save_file)
elif target == "write_text":
    import pathlib
    pathlib.Path.write_text = wrap(pathlib.Path.write_text)
from moecompress.cli import main
sys.exit(main(sys.argv[3:]))
"""
# This job calls os.replace 8 times (lock file, six stage renames, the checkpoint's atomic rename), save_file 6 times
# and Path.write_text 15 times: every point below kills the run somewhere.
POINTS = ([("replace", n) for n in range(1, 9)] + [("save_file", n) for n in range(1, 7)]
          + [("write_text", n) for n in (1, 3, 5, 7, 9, 11, 13, 15)])


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = make_job_inputs(tmp_path_factory.mktemp("kill"), 8, 300)

    def recipe(out: Path) -> dict:
        return {"model": str(tmp / "model"), "output": str(out), "dtype": "float32",
                "calibration": {"dataset": str(tmp / "data.jsonl.gz"), "samples": 4, "seq_len": 32, "batch_size": 4},
                "allocation": {"budget": {"avg_bits": 3.5}, "candidates": [2, 4, 8]},
                "quantize": {"method": "rtn", "group_size": 32}}

    reference = quantize(recipe_from_dict(recipe(tmp / "reference")), progress=False)
    return tmp, recipe, _files(reference / "checkpoint")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _loadable_dirs(run: Path):
    return [p.parent for p in run.rglob("config.json")]


@pytest.mark.slow
@pytest.mark.parametrize("target, nth", POINTS, ids=[f"{t}-{n}" for t, n in POINTS])
def test_kill_then_resume(job, tmp_path, target, nth):
    tmp, recipe, reference = job
    run = tmp_path / "run"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe(run)))
    proc = subprocess.run([sys.executable, "-c", DRIVER, target, str(nth), "quantize", "--recipe",
                           str(tmp_path / "r.yaml"), "--quiet"], capture_output=True, text=True, timeout=400)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed at this point
    # nothing a kill left verifies or loads unless it is complete and identical to the uninterrupted checkpoint
    for directory in _loadable_dirs(run):
        try:
            verify_checkpoint(directory)
        except MoecompressError:
            with pytest.raises(MoecompressError):
                moecompress.from_pretrained(directory)
            continue
        assert _files(directory) == reference, f"{directory} verifies but differs from the uninterrupted run"
    if not (run / "checkpoint").exists():
        with pytest.raises(MoecompressError):
            verify_path(run)
    quantize(recipe_from_dict(recipe(run)), progress=False)
    assert _files(run / "checkpoint") == reference
    assert not [p for p in run.iterdir() if ".partial" in p.name]
    verify_path(run)
