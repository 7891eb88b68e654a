"""Evaluation hygiene: overlap between calibration and evaluation text is counted exactly and dropped by default."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.evaluate import EvalResult, drop_overlap, evaluate, prepare_eval_data, read_results, text_overlap

LONG_A = "Copyright (C) 1991 Free Software Foundation, Inc. All rights"  # 60 chars
LONG_B = "This program is distributed in the hope that it will be useful"  # 62 chars
SHORT = "return 0;"


def test_overlap_counts_and_drop_by_hand():
    calib = [f"intro\n{LONG_A}\n  {LONG_B}  \nend", "the same document", "x = 1"]
    evaluation = [
        ("the same document", "a"),  # identical: dropped whole
        (f"{LONG_A}\nown text that is long enough to count as a long line here\n{SHORT}", "b"),  # 1 of 2 long lines
        (f"    {LONG_B}\n{SHORT}\nx = 1", "b"),  # LONG_B matches after stripping; short lines always stay
        (f"{LONG_A}\n\n{LONG_B}", "c"),  # only overlap: left out
    ]
    ov = text_overlap(calib, [t for t, _ in evaluation])
    assert ov.documents == 4 and ov.identical_documents == 1
    assert ov.long_lines == 5 and ov.overlapping_lines == 4
    assert ov.line_share == pytest.approx(0.8)
    removed = len("the same document") + len(LONG_A) + len("    " + LONG_B) + len(LONG_A) + len(LONG_B)
    assert ov.overlapping_chars == removed
    assert ov.chars == sum(len(t) for t, _ in evaluation)
    kept = drop_overlap(calib, evaluation)
    assert kept == [("own text that is long enough to count as a long line here\n" + SHORT, "b"),
                    (f"{SHORT}\nx = 1", "b")]
    assert text_overlap(calib, [t for t, _ in kept]).overlapping_lines == 0  # nothing left to drop
    # a higher threshold: LONG_A (60 chars) no longer counts, LONG_B (62) still does
    ov61 = text_overlap(calib, [t for t, _ in evaluation], min_chars=61)
    assert ov61.long_lines == 2 and ov61.overlapping_lines == 2
    with pytest.raises(MoecompressError, match="min_chars"):
        text_overlap(calib, [], min_chars=0)


class CharTokenizer:
    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}


class Uniform(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 128) + self.w)


@pytest.fixture
def texts(tmp_path):
    calib = tmp_path / "calib.jsonl"
    evalp = tmp_path / "eval.jsonl"
    calib.write_text(json.dumps({"text": f"{LONG_A}\nfoo"}) + "\n")
    evalp.write_text("\n".join(json.dumps({"text": f"{LONG_A}\nbar {i}"}) for i in range(6)) + "\n")
    return calib, evalp


def test_evaluate_drops_overlap_by_default_and_keeps_it_on_request(texts):
    calib, evalp = texts
    tok = CharTokenizer()
    data, ov = prepare_eval_data(str(evalp), tok, 2, 8, calibration=str(calib))
    assert ov.dropped and ov.overlapping_lines == 6 and ov.long_lines == 6
    # what is left: 6 documents "bar i" (5 chars), EOS-separated: 35 tokens -> 2 windows of 8
    allowed = {2, *tok("bar 012345")["input_ids"]}
    assert data.input_ids.shape == (2, 8) and set(data.input_ids.flatten().tolist()) <= allowed
    assert "without lines in" in data.description
    kept, ov_kept = prepare_eval_data(str(evalp), tok, 2, 8, calibration=str(calib), keep_overlap=True)
    assert not ov_kept.dropped and ov_kept.overlapping_lines == 6
    assert (kept.input_ids == tok(LONG_A)["input_ids"][0]).any()  # the boilerplate is in the kept text
    assert not (data.input_ids == tok(LONG_A)["input_ids"][0]).any()  # 'C' occurs nowhere else
    res = evaluate(Uniform(), tok, str(evalp), samples=2, seq_len=8, calibration=str(calib), progress=False)
    assert res.overlap == ov and res.nll == pytest.approx(math.log(128))
    assert EvalResult.from_dict(json.loads(json.dumps(res.to_dict()))) == res  # round trip with the overlap


def test_results_file_reports_overlap(texts, tmp_path):
    from moecompress.evaluate import write_results

    calib, evalp = texts
    res = evaluate(Uniform(), CharTokenizer(), str(evalp), samples=2, seq_len=8, calibration=str(calib),
                   progress=False)
    _, md = write_results([res], tmp_path)
    assert "6 of 6 lines of >= 40 chars occur verbatim" in md.read_text()
    assert read_results(tmp_path)[0].overlap == res.overlap


@pytest.mark.slow
def test_cli_eval_reports_overlap_on_reference_model(tmp_path):
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared"
    model = shared / "models/refmoe-qwen3"
    if not model.is_dir():
        pytest.skip("../shared/models/refmoe-qwen3 is absent")
    data = shared / "data/corpus"
    cmd = [sys.executable, "-m", "moecompress.cli", "eval", "--model", str(model), "--dataset",
           str(data / "eval.jsonl.gz"), "--calibration", str(data / "calib.jsonl.gz"), "--samples", "2",
           "--seq-len", "64", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "calibration/evaluation overlap: 1 of 259 documents identical, 4109 of 35770 lines" in out.stdout
    assert "dropped from the evaluation text" in out.stdout
