"""The held-back split of the calibration text (calibrate/split.py): the sensitivity's text and the calibration's
text never overlap -- no shared document, no shared long line, no shared token sequence."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from moecompress.calibrate.split import held_back_data, held_samples, joined, split_documents
from moecompress.errors import MoecompressError
from moecompress.evaluate.overlap import MIN_CHARS
from moecompress.pipeline import steps
from moecompress.recipe import recipe_from_dict

BOILERPLATE = "Copyright (c) the authors; all rights reserved, see LICENSE for details."  # a long line everywhere


class WordTokenizer:
    """One id per distinct whitespace word (ids from 3), EOS 2, pad 0."""

    eos_token_id, pad_token_id = 2, 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [self.vocab.setdefault(w, 3 + len(self.vocab)) for w in text.split()]}


def _docs() -> list[tuple[str, str | None]]:
    """Three domains of documents of unequal length, each word unique to its document, a boilerplate line in most,
    and one document present twice."""
    docs = []
    for d, n in (("code", 12), ("news", 7), ("wiki", 20)):
        for i in range(n):
            words = " ".join(f"{d}{i}w{k}" for k in range(40 + 13 * (i % 5)))
            docs.append((f"{BOILERPLATE}\n{words}" if i % 3 else words, d))
    docs.append(docs[3])  # an identical copy: both copies must land on one side
    return docs


def test_split_is_disjoint_and_holds_back_the_share():
    docs = _docs()
    split = split_documents(docs, 0.25, seed=0)
    fit_texts = {t for t, _ in split.fit}
    held_texts = [t for t, _ in split.held_back]
    assert held_texts and not fit_texts & set(held_texts)
    fit_lines = {ln.strip() for t in fit_texts for ln in t.splitlines() if len(ln.strip()) >= MIN_CHARS}
    assert BOILERPLATE in fit_lines
    assert not any(ln.strip() in fit_lines for t in held_texts for ln in t.splitlines() if len(ln.strip()) >= MIN_CHARS)
    fit_words = {w for t in fit_texts for w in t.split()}
    assert not fit_words & {w for t in held_texts for w in t.split()}  # not one word (= document) on both sides
    # every domain holds back at least its share of the characters, and keeps at least one document
    for dom in ("code", "news", "wiki"):
        total = sum(len(t) for t, d in docs if d == dom)
        held = sum(len(t) for t, d in docs if d == dom and t not in fit_texts)
        assert 0.25 * total <= held < total
    # the identical copies stay together; every fit document is kept whole and in source order
    assert (docs[3][0] in fit_texts) == (docs[-1][0] in fit_texts)
    assert split.fit == [d for d in docs if d[0] in fit_texts]
    # deterministic for a seed, different for another
    assert split_documents(docs, 0.25, seed=0) == split
    assert split_documents(docs, 0.25, seed=1).fit != split.fit


def test_split_refuses_bad_shares_and_single_documents():
    with pytest.raises(MoecompressError, match="held_back"):
        split_documents(_docs(), 0.0)
    with pytest.raises(MoecompressError, match="held_back"):
        split_documents(_docs(), 1.0)
    with pytest.raises(MoecompressError, match="too few documents"):
        split_documents([("only one document here", "a")], 0.3)


def _corpus(path: Path) -> Path:
    with gzip.open(path, "wt") as f:
        for text, dom in _docs():
            f.write(json.dumps({"text": text, "domain": dom}) + "\n")
    return path


def test_fit_and_held_back_sequences_share_no_token(tmp_path):
    tok = WordTokenizer()
    fit, held = held_back_data(_corpus(tmp_path / "c.jsonl.gz"), tok, samples=10, held_samples=4, seq_len=16,
                               share=0.25)
    assert fit.input_ids.shape == (6, 16) and held.input_ids.shape == (4, 16)
    special = {0, 2}
    a = {int(t) for t in fit.input_ids[fit.attention_mask > 0]} - special
    b = {int(t) for t in held.input_ids[held.attention_mask > 0]} - special
    assert a and b and not a & b
    with pytest.raises(MoecompressError, match="held-back sequences"):
        held_back_data(tmp_path / "c.jsonl.gz", tok, samples=4, held_samples=4, seq_len=16, share=0.25)


def test_joined_keeps_order_and_merges_domains():
    from moecompress.calibrate.dataset import CalibrationData

    a = CalibrationData(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64),
                        torch.tensor([0, 1]), ("news", "wiki"))
    b = CalibrationData(torch.full((1, 3), 2), torch.ones(1, 3, dtype=torch.int64), torch.tensor([0]), ("code",))
    j = joined(a, b)
    assert j.domains == ("code", "news", "wiki") and j.domain_ids.tolist() == [1, 2, 0]
    assert j.input_ids[:, 0].tolist() == [1, 1, 2]


def test_pipeline_calibration_data_uses_the_split(tmp_path):
    path = _corpus(tmp_path / "c.jsonl.gz")
    tok = WordTokenizer()

    def ctx(held_back: float):
        r = recipe_from_dict({"model": "m", "output": str(tmp_path / "run"),
                              "calibration": {"dataset": str(path), "samples": 10, "seq_len": 16,
                                              "held_back": held_back},
                              "sensitivity": {"method": "loss_aware", "holdout": 0.3}})
        return steps.RunContext(r, tmp_path, "m", str(path), False, lambda: None)

    split = steps.calibration_data(ctx(0.25), tok)
    assert split.held.num_sequences == math.ceil(0.3 * 10) == held_samples(10, 0.3)
    assert split.fit.num_sequences == 7 and split.all.num_sequences == 10  # GPTQ sees as many sequences as before
    assert torch.equal(split.all.input_ids, torch.cat([split.fit.input_ids, split.held.input_ids]))
    fit_tokens = {int(t) for t in split.fit.input_ids.flatten()} - {0, 2}
    assert fit_tokens and not fit_tokens & {int(t) for t in split.held.input_ids.flatten()}
    plain = steps.calibration_data(ctx(0.0), tok)
    assert plain.fit is None and plain.held is None and plain.all.num_sequences == 10
    with pytest.raises(MoecompressError, match="calibration.held_back"):
        ctx(1.0)
