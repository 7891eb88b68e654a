"""Every input error is one `error:` line and a non-zero exit; resumes notice changed inputs; nothing half-written
looks complete (issue 15)."""
from __future__ import annotations

import errno
import gzip
import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from moecompress.cli import main
from moecompress.errors import MoecompressError
from moecompress.pipeline import quantize
from moecompress.recipe import recipe_from_dict
from helpers import make_job_inputs




@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = make_job_inputs(tmp_path_factory.mktemp("inputs"), 8, 300)
    return tmp


def _recipe(inputs: Path, out: Path, **over) -> dict:
    r = {"model": str(inputs / "model"), "output": str(out), "dtype": "float32",
         "calibration": {"dataset": str(inputs / "data.jsonl.gz"), "samples": 4, "seq_len": 32, "batch_size": 4},
         "allocation": {"budget": {"avg_bits": 3.5}, "candidates": [2, 4, 8]},
         "quantize": {"method": "rtn", "group_size": 32}}
    for k, v in over.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "%|" not in ln]  # tqdm bars
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _recipe_file(tmp_path: Path, data) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# -- resume and leftovers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changed", ["model", "dataset"])
def test_resume_refuses_changed_input(inputs, tmp_path, changed):
    local = tmp_path / "in"
    shutil.copytree(inputs, local)
    recipe = recipe_from_dict(_recipe(local, tmp_path / "run"))
    quantize(recipe, stop_after="calibrate", progress=False)
    if changed == "model":
        cfg = json.loads((local / "model" / "config.json").read_text())
        cfg["rms_norm_eps"] = 1e-5
        (local / "model" / "config.json").write_text(json.dumps(cfg))
    else:
        with gzip.open(local / "data.jsonl.gz", "at") as f:
            f.write(json.dumps({"domain": "a", "text": "one more document"}) + "\n")
    with pytest.raises(MoecompressError, match=f"input {changed} .* has changed since this run started.*to start over, "
                                               "delete"):
        quantize(recipe, progress=False)


def test_stale_partials_cleaned_and_failed_stage_leaves_nothing(inputs, tmp_path, monkeypatch):
    from moecompress.pipeline import steps

    run = tmp_path / "run"
    recipe = recipe_from_dict(_recipe(inputs, run))
    run.mkdir()
    leftovers = [run / ".calibration.partial", run / "..checkpoint.partial.partial-999999-x", run / ".checkpoint.partial"]
    for d in leftovers:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")

    def fails(ctx, tmp):
        (tmp / "half.json").write_text("{")
        raise MoecompressError("stage failed")

    monkeypatch.setitem(steps.STEPS, "calibrate", fails)
    with pytest.raises(MoecompressError, match="stage failed"):
        quantize(recipe, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["recipe.lock.yaml"]


def test_corrupted_finished_stage_detected_on_resume(inputs, tmp_path):
    recipe = recipe_from_dict(_recipe(inputs, tmp_path / "run"))
    out = quantize(recipe, stop_after="calibrate", progress=False)
    stats = out / "calibration" / "summary.json"
    stats.write_text(stats.read_text().replace("0", "1", 1))
    with pytest.raises(MoecompressError, match="summary.json"):
        quantize(recipe, progress=False)


def test_calibrate_out_is_atomic(inputs, tmp_path, monkeypatch):
    import moecompress.calibrate.command as command

    def boom(*a, **k):
        raise KeyboardInterrupt  # a kill after the statistics are written

    monkeypatch.setattr(command, "save_plots", boom)
    with pytest.raises(KeyboardInterrupt):
        command.run_calibrate_command(str(inputs / "model"), str(inputs / "data.jsonl.gz"), samples=4, seq_len=32,
                                      out=tmp_path / "c", progress=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "notcalib").mkdir()
    (tmp_path / "notcalib" / "precious.txt").write_text("x")
    with pytest.raises(MoecompressError, match="not a calibration output"):
        command.run_calibrate_command(str(inputs / "model"), str(inputs / "data.jsonl.gz"), samples=4, seq_len=32,
                                      out=tmp_path / "notcalib", progress=False)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_disk_full_is_one_line_and_leaves_nothing_complete(inputs, tmp_path, monkeypatch, capsys, code):
    from moecompress.artifacts.calibration_stats import CalibrationStats

    def full(self, directory):
        (Path(directory) / "stats.safetensors").write_bytes(b"half")
        raise OSError(code, "No space left on device" if code == errno.ENOSPC else "File too large",
                      str(Path(directory) / "stats.safetensors"))

    monkeypatch.setattr(CalibrationStats, "save", full)
    words = "No space" if code == errno.ENOSPC else "too large"
    path = _recipe_file(tmp_path, _recipe(inputs, tmp_path / "run"))
    assert words in _cli_error(capsys, ["quantize", "--recipe", path, "--quiet"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["recipe.lock.yaml"]
    assert words in _cli_error(capsys, ["calibrate", "--model", str(inputs / "model"), "--dataset",
                                        str(inputs / "data.jsonl.gz"), "--samples", "4", "--seq-len", "32",
                                        "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists() and not [p for p in tmp_path.iterdir() if ".partial" in p.name]


# -- input errors: one line each -----------------------------------------------------------------------------------
def test_nan_weight_named_before_calibration(inputs, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(inputs / "model", model)
    tensors = load_file(model / "model.safetensors")
    name = next(k for k in sorted(tensors) if k.endswith("down_proj") or k.endswith("o_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    path = _recipe_file(tmp_path, _recipe(inputs, tmp_path / "run", model=str(model)))
    line = _cli_error(capsys, ["quantize", "--recipe", path, "--quiet"])
    assert name in line and "NaN" in line
    assert not (tmp_path / "run" / "calibration").exists()
    line = _cli_error(capsys, ["calibrate", "--model", str(model), "--dataset", str(inputs / "data.jsonl.gz"),
                               "--samples", "4", "--seq-len", "32", "--out", str(tmp_path / "c")])
    assert name in line


def test_bad_inputs_each_one_error_line(inputs, tmp_path, capsys):
    data = str(inputs / "data.jsonl.gz")
    cal = ["calibrate", "--model", str(inputs / "model"), "--samples", "4", "--out", str(tmp_path / "c")]
    assert "max_position_embeddings" in _cli_error(capsys, cal + ["--dataset", data, "--seq-len", "100000"])
    assert "seq_len must be at least 2" in _cli_error(capsys, cal + ["--dataset", data, "--seq-len", "1"])
    (tmp_path / "bin.jsonl.gz").write_bytes(bytes(range(256)) * 4)
    assert "not gzip" in _cli_error(capsys, cal + ["--dataset", str(tmp_path / "bin.jsonl.gz"), "--seq-len", "8"])
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00garbage" * 50)
    assert "not UTF-8" in _cli_error(capsys, cal + ["--dataset", str(tmp_path / "bin.txt"), "--seq-len", "8"])
    missing = str(tmp_path / "no" / "such" / "model")
    assert "does not exist" in _cli_error(capsys, ["calibrate", "--model", missing, "--dataset", data,
                                                   "--out", str(tmp_path / "c")])
    assert "does not exist" in _cli_error(capsys, ["quantize", "--recipe",
                                                   _recipe_file(tmp_path, _recipe(inputs, tmp_path / "r",
                                                                                  model=missing))])
    assert "not a directory" in _cli_error(capsys, ["shard", "--model", missing, "--stats", missing, "--servers", "2x1GB",
                                                 "--out", str(tmp_path / "b")])
    for scalar in (5, [1, 2], "model"):
        assert "expected a mapping" in _cli_error(capsys, ["quantize", "--recipe", _recipe_file(tmp_path, scalar)])
    big = _recipe(inputs, tmp_path / "r", allocation={"budget": {"avg_bits": 100}})
    assert "more than bf16" in _cli_error(capsys, ["quantize", "--recipe", _recipe_file(tmp_path, big)])
    long = _recipe(inputs, tmp_path / "r", calibration={"seq_len": 100000})
    assert "max_position_embeddings" in _cli_error(capsys, ["quantize", "--recipe", _recipe_file(tmp_path, long)])
    blocked = tmp_path / "file"
    blocked.write_text("x")
    unwritable = _recipe(inputs, blocked / "run")
    assert "error:" in _cli_error(capsys, ["quantize", "--recipe", _recipe_file(tmp_path, unwritable)])


def test_config_not_json_is_one_line(inputs, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(inputs / "model", model)
    (model / "config.json").write_bytes(b"\x00\x01 not json")
    line = _cli_error(capsys, ["quantize", "--recipe", _recipe_file(tmp_path, _recipe(inputs, tmp_path / "r",
                                                                                      model=str(model)))])
    assert "config.json" in line and "not valid JSON" in line
    line = _cli_error(capsys, ["calibrate", "--model", str(model), "--dataset", str(inputs / "data.jsonl.gz"),
                               "--out", str(tmp_path / "c"), "--seq-len", "8"])
    assert "config.json" in line


def test_budget_that_changes_nothing_warns(inputs, tmp_path):
    with pytest.warns(UserWarning, match="the budget changes nothing"):
        recipe_from_dict(_recipe(inputs, tmp_path / "r", allocation={"budget": {"avg_bits": 8}}))
