"""The one module that knows the order of the stages of `moecompress quantize`.

    calibrate -> CalibrationStats -> sensitivity -> CostTable -> allocate -> BitPlan -> quantize
    -> QuantizedTensors -> tune -> QuantizedTensors (new scales; skipped when tune.steps is 0) -> export -> checkpoint

Each stage writes its result under the run directory through a temporary sibling that is renamed into place when
complete; a re-run skips the stages whose directory exists, so an interrupted run resumes where it stopped and a
killed run never leaves a checkpoint that looks complete.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from moecompress.errors import MoecompressError
from moecompress.pipeline import steps
from moecompress.pipeline.lockfile import check_lock, job_identity, make_lock, read_lock, write_lock
from moecompress.recipe import Recipe

STAGES = ("calibrate", "sensitivity", "allocate", "quantize", "tune", "export")
DIRS = {"calibrate": "calibration", "sensitivity": "sensitivity", "allocate": "allocation",
        "quantize": "quantized", "tune": "tuned", "export": "checkpoint"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def run_stage(out: Path, stage: str, produce: Callable[[Path], None]) -> tuple[Path, bool]:
    """Run `produce(tmp_dir)` unless the stage's directory exists; returns (directory, ran)."""
    final = out / DIRS[stage]
    if final.exists():
        return final, False
    tmp = out / f".{DIRS[stage]}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    produce(tmp)
    os.replace(tmp, final)
    return final, True


def prepare_run(recipe: Recipe, out: Path) -> tuple[str, str]:
    """Resolve inputs, check the lock, and refuse to resume a directory that holds another job."""
    from moecompress.builtin import resolve_dataset, resolve_model

    model_path = resolve_model(recipe.model)
    dataset_path = resolve_dataset(recipe.calibration.dataset)
    if recipe.lock:
        check_lock(recipe, recipe.lock)
    previous = read_lock(out)
    if previous is not None and job_identity(previous) != job_identity(recipe):
        raise MoecompressError(f"{out} holds a run of a different recipe (see {out}/recipe.lock.yaml); "
                               "choose another --out or delete that directory")
    out.mkdir(parents=True, exist_ok=True)
    if previous is None:
        write_lock(out, recipe, make_lock(recipe, model_path, dataset_path))
    return model_path, dataset_path


def quantize(recipe: Recipe, out: str | Path | None = None, stop_after: str | None = None,
             progress: bool = True) -> Path:
    """Run (or resume) the main job; returns the run directory. `stop_after` ends after that stage."""
    if stop_after is not None and stop_after not in STAGES:
        raise MoecompressError(f"--stop-after {stop_after!r}; allowed: {', '.join(STAGES)}")
    out = Path(out or recipe.output)
    model_path, dataset_path = prepare_run(recipe, out)

    @cache
    def load():
        return steps.load_model(model_path, recipe.revision, DTYPES[recipe.compute_dtype])

    ctx = steps.RunContext(recipe, out, model_path, dataset_path, progress, load)
    for stage in STAGES:
        directory, ran = run_stage(out, stage, lambda tmp, s=stage: steps.STEPS[s](ctx, tmp))
        if progress:
            print(f"[{stage}] {'done' if ran else 'already done, skipped'}: {directory}", flush=True)
        if stage == stop_after:
            return out
    from moecompress.pipeline.report import write_report

    text = write_report(ctx)
    if progress:
        print(text)
    return out
