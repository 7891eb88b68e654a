"""`moecompress calibrate`: load the model and its tokenizer, calibrate, save stats + plots, print the summary."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from moecompress.artifacts.calibration_stats import CalibrationStats
from moecompress.calibrate.options import CalibrationOptions
from moecompress.calibrate.plots import save_plots
from moecompress.calibrate.report import format_summary
from moecompress.calibrate.run import calibrate
from moecompress.errors import MoecompressError
from moecompress.format.files import atomic_dir, read_json_object


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


def require_finite_weights(model, source: str) -> None:
    """NaN or Inf in a weight poisons every statistic computed from it: refuse, naming the first such tensor."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
            bad = "NaN" if torch.isnan(t).any() else "Inf"
            raise MoecompressError(f"{source}: weight {name} contains {bad} values; the model is damaged "
                                   "(re-download or re-export it) and cannot be calibrated or quantized")


def _calibration_out(out: Path) -> None:
    """`--out` may be new or hold an earlier calibration (replaced whole); never another kind of directory."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "summary.json").exists())):
        raise MoecompressError(f"--out {out} exists and is not a calibration output; choose another directory")


def run_calibrate_command(model: str, dataset: str, samples: int = 128, seq_len: int = 512,
                          out: str | Path = "out/calibration", plots: bool = True, **opts) -> CalibrationStats:
    """Calibrate `model` (local path or hub id) on `dataset` and write `out/` (stats.safetensors, summary.json,
    PNG plots) atomically: a killed run leaves no partial `out/`. `opts` are CalibrationOptions fields
    (dtype="bfloat16", layerwise=True, dense_hessians=True, ...)."""
    known = {f.name for f in dataclasses.fields(CalibrationOptions)}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise MoecompressError(f"unknown calibration option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    out = Path(out)
    _calibration_out(out)
    options = CalibrationOptions(samples=samples, seq_len=seq_len, **opts)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _local_dir(model) if options.layerwise else model
    _check_context(path, seq_len)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if options.layerwise:
        loaded = path
    else:
        loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=options.torch_dtype).to(options.device)
        require_finite_weights(loaded, str(path))
    with atomic_dir(out, overwrite=True) as tmp:
        if "hessian_dir" not in opts:  # each layer's Hessians go to disk as soon as they are complete
            options = dataclasses.replace(options, hessian_dir=str(tmp))
        stats = calibrate(loaded, tokenizer, dataset, options)
        stats.save(tmp)
        if plots:
            save_plots(stats, tmp)
    print(format_summary(stats))
    print(f"\nwrote {out}")
    return CalibrationStats.load(out) if options.hessian_dir == str(tmp) else stats  # Hessians now read from out/


def _check_context(path, seq_len: int) -> None:
    """seq_len within the model's max_position_embeddings (local models; config.json must be JSON)."""
    config = Path(str(path)) / "config.json"
    if not Path(str(path)).is_dir():
        return
    doc = read_json_object(config, "model config")
    text = doc.get("text_config") if isinstance(doc.get("text_config"), dict) else doc
    limit = text.get("max_position_embeddings")
    if type(limit) is int and seq_len > limit:
        raise MoecompressError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {limit} ({config})")
