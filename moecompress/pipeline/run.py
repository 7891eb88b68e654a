"""The one module that knows the order of the stages of `moecompress quantize`.

    calibrate -> CalibrationStats -> sensitivity -> CostTable -> allocate -> BitPlan -> quantize
    -> QuantizedTensors -> tune -> QuantizedTensors (new scales; skipped when tune.steps is 0) -> export -> checkpoint

Each stage writes its result under the run directory through a temporary sibling (`.<dir>.partial`) that gets a
checksum manifest and is renamed into place when complete; a re-run removes the temporary directories a killed run
left, checks the finished stages against their manifests and skips them, so an interrupted run resumes where it
stopped and a killed run never leaves a checkpoint that looks complete. Resuming compares the recipe and the input
files with the lock file and refuses a change.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from functools import cache
from pathlib import Path

from moecompress.calibrate.command import require_finite_weights
from moecompress.errors import MoecompressError
from moecompress.format.files import MANIFEST, read_json_object, verify_files, verify_listed, write_manifest
from moecompress.pipeline import steps
from moecompress.pipeline.offload import LayerOffload, model_bytes, wants_offload
from moecompress.pipeline.lockfile import check_lock, check_resume, make_lock, read_lock, write_lock
from moecompress.recipe import Recipe

STAGES = ("calibrate", "sensitivity", "allocate", "quantize", "tune", "export")
DIRS = {"calibrate": "calibration", "sensitivity": "sensitivity", "allocate": "allocation",
        "quantize": "quantized", "tune": "tuned", "export": "checkpoint"}


def run_stage(out: Path, stage: str, produce: Callable[[Path], None]) -> tuple[Path, bool]:
    """Run `produce(tmp_dir)` unless the stage's directory exists (and verifies); returns (directory, ran)."""
    final = out / DIRS[stage]
    if final.exists():
        check_finished(final, stage)
        return final, False
    tmp = out / f".{DIRS[stage]}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        produce(tmp)
        if stage != "export":  # the checkpoint writes its own manifest (with config.json and weights)
            write_manifest(tmp, {"stage": stage})
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, True


def check_finished(final: Path, stage: str) -> None:
    """A finished stage's files still match its manifest (runs written before stage manifests are trusted), and so
    do those of its sub-directories that have one (calibration/fit/)."""
    if stage == "export":
        verify_files(final)
    elif (final / MANIFEST).exists():
        verify_listed(final)
        for sub in sorted(p for p in final.iterdir() if p.is_dir() and (p / MANIFEST).exists()):
            verify_listed(sub)


def clean_partials(out: Path) -> None:
    """Remove what killed runs left: `.<dir>.partial` stage directories and atomic writes inside them."""
    for p in out.iterdir() if out.is_dir() else ():
        if p.name.startswith(".") and ".partial" in p.name:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def prepare_run(recipe: Recipe, out: Path) -> tuple[str, str]:
    """Resolve inputs, check the lock, and refuse to resume a directory whose recipe or inputs changed."""
    from moecompress.builtin import resolve_dataset, resolve_model

    model_path = resolve_model(recipe.model)
    dataset_path = resolve_dataset(recipe.calibration.dataset)
    check_model_config(model_path, recipe)
    if recipe.lock:
        check_lock(recipe, recipe.lock)
    if out.exists() and not out.is_dir():
        raise MoecompressError(f"--out {out} is a file; give a directory")
    previous = read_lock(out)
    if previous is not None:
        check_resume(out, previous, recipe, model_path, dataset_path)
    elif out.is_dir() and any(p for p in out.iterdir() if p.name in DIRS.values()):
        raise MoecompressError(f"{out} holds stage directories but no recipe.lock.yaml; delete it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    clean_partials(out)
    if previous is None:
        write_lock(out, recipe, make_lock(recipe, model_path, dataset_path))
    return model_path, dataset_path


def check_model_config(model_path: str, recipe: Recipe) -> None:
    """A local model directory has a readable config.json whose context fits the recipe's sequence lengths."""
    path = Path(model_path)
    if not path.is_dir():
        return  # a hub id: transformers resolves it
    config = read_json_object(path / "config.json", "model config")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    limit = text.get("max_position_embeddings")
    if type(limit) is not int:
        return
    for key, seq_len in (("calibration.seq_len", recipe.calibration.seq_len),
                         ("eval.seq_len", recipe.eval.seq_len if recipe.eval else 0)):
        if seq_len > limit:
            raise MoecompressError(f"recipe key {key}: {seq_len} tokens exceed the model's max_position_embeddings "
                                   f"{limit} ({path / 'config.json'}); use at most {limit}")


OFFLOADED_STAGES = ("calibrate", "sensitivity", "quantize")  # the post steps run on the host under offload


def offloaded(ctx: steps.RunContext, stage: str, offloading: list):
    """The context a stage runs in: LayerOffload for the offloaded stages once the model is offloaded, else none."""
    if stage not in OFFLOADED_STAGES or ctx.recipe.offload == "none" or \
            (stage == "calibrate" and ctx.recipe.calibration.layerwise):
        return nullcontext()
    model, _, layout = ctx.load()
    return LayerOffload(model, layout, ctx.recipe.device) if offloading else nullcontext()


def quantize(recipe: Recipe, out: str | Path | None = None, stop_after: str | None = None,
             progress: bool = True) -> Path:
    """Run (or resume) the main job; returns the run directory. `stop_after` ends after that stage."""
    if stop_after is not None and stop_after not in STAGES:
        raise MoecompressError(f"--stop-after {stop_after!r}; allowed: {', '.join(STAGES)}")
    out = Path(out or recipe.output)
    steps.check_device(recipe.device)  # before anything is written
    model_path, dataset_path = prepare_run(recipe, out)

    offloading = []  # [True] once the model is loaded in host memory, one layer at a time on the device

    @cache
    def load():
        # offload "layer" / "auto": loaded in host memory first ("auto" then moves it when it fits)
        first = "cpu" if recipe.offload != "none" else recipe.device
        loaded = steps.load_model(model_path, recipe.revision, steps.DTYPES[recipe.compute_dtype], first)
        require_finite_weights(loaded[0], model_path)  # before any stage computes statistics from them
        if wants_offload(recipe.offload, recipe.device, model_bytes(loaded[0])):
            offloading.append(True)
            if progress:
                print(f"[offload] the model stays in host memory; one decoder layer at a time on {recipe.device}",
                      flush=True)
        else:
            loaded[0].to(recipe.device)
        return loaded

    def produce(tmp: Path, stage: str) -> None:
        with offloaded(ctx, stage, offloading):
            steps.STEPS[stage](ctx, tmp)

    ctx = steps.RunContext(recipe, out, model_path, dataset_path, progress, load)
    for stage in STAGES:
        directory, ran = run_stage(out, stage, lambda tmp, s=stage: produce(tmp, s))
        if progress:
            print(f"[{stage}] {'done' if ran else 'already done, skipped'}: {directory}", flush=True)
        if stage == stop_after:
            return out
    from moecompress.pipeline.report import write_report

    text = write_report(ctx)
    if progress:
        print(text)
    return out
