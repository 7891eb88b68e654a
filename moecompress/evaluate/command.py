"""`moecompress eval --model M --dataset D [--reference R] [--out DIR]`: evaluate one model, print the table, and
with --out merge it into DIR/results.json, results.md and pareto.png (so several runs build one comparison)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from moecompress.calibrate.options import DTYPES
from moecompress.errors import MoecompressError
from moecompress.evaluate.plot import plot_pareto
from moecompress.evaluate.report import RESULTS_JSON, format_table, merge_results, read_results, write_results
from moecompress.evaluate.result import EvalResult
from moecompress.evaluate.run import evaluate_checkpoint

PARETO_PNG = "pareto.png"


def run_calibration_dataset(model) -> str | None:
    """The calibration dataset named by the recipe lock of the run that wrote checkpoint `model`, if it exists."""
    manifest = Path(str(model)) / "moecompress.json"
    try:
        lock = manifest.parent / json.loads(manifest.read_text())["recipe"]
        dataset = yaml.safe_load(lock.read_text())["calibration"]["dataset"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None
    if not isinstance(dataset, str):
        return None
    return dataset if dataset.startswith("builtin:") or Path(dataset).is_file() else None


def run_eval_command(model: str, dataset: str, samples: int = 64, seq_len: int = 512, reference: str | None = None,
                     out: str | Path | None = None, seed: int = 0, batch_size: int = 4, method: str | None = None,
                     family: str | None = None, device: str | None = None, dtype: str | None = None,
                     progress: bool = True, calibration: str | None = None, keep_overlap: bool = False) -> EvalResult:
    """Evaluate `model` (moecompress checkpoint, HF directory, hub id or builtin: name) on `dataset`.

    device defaults to cuda when available, else cpu; dtype to bfloat16 on cuda, float32 on cpu.
    calibration: the calibration text, whose overlap with `dataset` is reported and dropped from the evaluation text
    unless `keep_overlap`; defaults to the calibration dataset of the run that made a moecompress checkpoint (its
    recipe.lock.yaml), when that file can be found.
    """
    calibration = calibration or run_calibration_dataset(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise MoecompressError(f"dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    for name, v in (("samples", samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise MoecompressError(f"{name} must be a positive integer, got {v!r}")
    result = evaluate_checkpoint(model, dataset, reference=reference, samples=samples, seq_len=seq_len, seed=seed,
                                 batch_size=batch_size, method=method, family=family, dtype=DTYPES[dtype],
                                 device=device, progress=progress, calibration=calibration,
                                 keep_overlap=keep_overlap)
    if result.overlap is not None:
        print(result.overlap.describe())
    if out is None:
        print(format_table([result]))
        return result
    out = Path(out)
    previous = read_results(out) if (out / RESULTS_JSON).is_file() else []
    results = merge_results(previous, [result])
    js, md = write_results(results, out)
    plot_pareto(results, out / PARETO_PNG)
    print(format_table(results))
    print(f"\nwrote {js}, {md}, {out / PARETO_PNG}")
    return result
