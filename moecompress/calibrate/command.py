"""`moecompress calibrate`: load the model and its tokenizer, calibrate, save stats + plots, print the summary."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.calibrate.options import CalibrationOptions
from moecompress.calibrate.plots import save_plots
from moecompress.calibrate.report import format_summary
from moecompress.calibrate.run import calibrate
from moecompress.errors import MoecompressError


def _local_dir(model: str) -> Path:
    """A local checkpoint directory for `model` (a path, or a hub id fetched into the hub cache)."""
    p = Path(model)
    if p.is_dir():
        return p
    try:  # pragma: no cover - needs the hub or its cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # noqa: BLE001 - any hub failure is the same user error
        raise MoecompressError(f"model {model!r} is neither a local directory nor a reachable hub id ({e})") from None


def run_calibrate_command(model: str, dataset: str, samples: int = 128, seq_len: int = 512,
                          out: str | Path = "out/calibration", plots: bool = True, **opts) -> CalibrationStats:
    """Calibrate `model` (local path or hub id) on `dataset` and write `out/` (stats.safetensors, summary.json,
    PNG plots). `opts` are CalibrationOptions fields (dtype="bfloat16", layerwise=True, dense_hessians=True, ...)."""
    known = {f.name for f in dataclasses.fields(CalibrationOptions)}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise MoecompressError(f"unknown calibration option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    opts.setdefault("hessian_dir", str(out))  # each layer's Hessians go to disk as soon as they are complete
    options = CalibrationOptions(samples=samples, seq_len=seq_len, **opts)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _local_dir(model) if options.layerwise else model
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if options.layerwise:
        loaded = path
    else:
        loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=options.torch_dtype).to(options.device)
    stats = calibrate(loaded, tokenizer, dataset, options)
    stats.save(out)
    if plots:
        save_plots(stats, out)
    print(format_summary(stats))
    print(f"\nwrote {Path(out)}")
    return stats
