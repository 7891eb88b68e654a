"""Calibration text -> N token sequences of length L, deterministic for a seed.

Sources (`DatasetSpec.parse`):
- a local `.txt` file: one document per paragraph (paragraphs are separated by one or more blank lines); no domain;
- a local `.jsonl` / `.jsonl.gz` file: one JSON object per line with `text` and optionally `domain`;
- `hf:<name>[:<config>[:<split>[:<column>]]]`: a Hugging Face `datasets` dataset (needs the hub or its cache;
  split defaults to "train", column to "text"; a `domain` column is used when present).

Sampling and packing: documents are grouped by domain (documents without one go to "unknown" when others have a
domain). Within a domain, documents are shuffled with `random.Random(f"{seed}:{domain}")`, tokenized with the
model's tokenizer (no special tokens) and concatenated, separated by the EOS token when the tokenizer has one; the
stream is cut into consecutive windows of L tokens (so a sequence may start or end mid-document, never mixes
domains). Sequences are taken round-robin over the domains (sorted by name) until N are collected, so every domain
gets an equal share while it has text; a domain that runs out contributes its last partial window right-padded
(attention_mask 0) and then drops out. Only as many documents as needed are tokenized.
"""
from __future__ import annotations

import gzip
import json
import zlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moecompress.errors import MoecompressError

UNKNOWN_DOMAIN = "unknown"


@dataclass(frozen=True)
class DatasetSpec:
    source: str  # local path, or a Hugging Face dataset name (with hub=True)
    hub: bool = False
    config: str | None = None
    split: str = "train"
    column: str = "text"

    @classmethod
    def parse(cls, text: str | Path) -> "DatasetSpec":
        s = str(text)
        if s.startswith("hf:"):
            parts = s[3:].split(":")
            if not parts[0] or len(parts) > 4:
                raise MoecompressError(f"bad dataset {s!r}; expected hf:<name>[:<config>[:<split>[:<column>]]]")
            parts += [""] * (4 - len(parts))
            return cls(parts[0], hub=True, config=parts[1] or None, split=parts[2] or "train",
                       column=parts[3] or "text")
        p = Path(s)
        if not p.is_file():
            raise MoecompressError(f"dataset {s!r} is not a file; give a .txt, .jsonl or .jsonl.gz file, "
                                   "or hf:<name>[:<config>[:<split>[:<column>]]] for a Hugging Face dataset")
        if not (s.endswith(".txt") or s.endswith(".jsonl") or s.endswith(".jsonl.gz")):
            raise MoecompressError(f"dataset {s!r}: unsupported extension; use .txt, .jsonl or .jsonl.gz")
        return cls(s)

    def __str__(self) -> str:
        if not self.hub:
            return self.source
        return ":".join(["hf", self.source, self.config or "", self.split, self.column])


@dataclass(frozen=True, eq=False)
class CalibrationData:
    """Tokenized calibration sequences, ready for the model."""

    input_ids: torch.Tensor  # [N, L] int64
    attention_mask: torch.Tensor  # [N, L] int64, 1 = token, 0 = padding
    domain_ids: torch.Tensor | None = None  # [N] int64 index into `domains`, None when the data has no domains
    domains: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self):
        if self.input_ids.dim() != 2 or self.attention_mask.shape != self.input_ids.shape:
            raise MoecompressError(f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                                   f"{tuple(self.attention_mask.shape)} must both be [N, L]")
        if (self.domain_ids is None) != (not self.domains):
            raise MoecompressError("domain_ids and domains must be given together")

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        for s in range(0, self.num_sequences, batch_size):
            dom = None if self.domain_ids is None else self.domain_ids[s:s + batch_size]
            yield self.input_ids[s:s + batch_size], self.attention_mask[s:s + batch_size], dom


def read_documents(spec: DatasetSpec) -> list[tuple[str, str | None]]:
    """(text, domain or None) of every non-empty document, in source order."""
    if spec.hub:
        return _hub_documents(spec)
    try:
        return _local_documents(spec.source)
    except (UnicodeDecodeError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        kind = "gzip-compressed UTF-8 text" if spec.source.endswith(".gz") else "UTF-8 text"
        raise MoecompressError(f"dataset {spec.source}: not {kind} ({type(exc).__name__}: {str(exc)[:100]}); "
                               "give a .txt, .jsonl or .jsonl.gz file") from None


def _local_documents(path: str) -> list[tuple[str, str | None]]:
    if path.endswith(".txt"):
        text = Path(path).read_text(encoding="utf-8")
        return [(p.strip(), None) for p in re.split(r"\n\s*\n", text) if p.strip()]
    opener = gzip.open if path.endswith(".gz") else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoecompressError(f"{path}:{n}: not a JSON line ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise MoecompressError(f"{path}:{n}: each line needs a string field 'text'")
            if row["text"].strip():
                dom = row.get("domain")
                docs.append((row["text"], None if dom is None else str(dom)))
    return docs


def _hub_documents(spec: DatasetSpec) -> list[tuple[str, str | None]]:  # pragma: no cover - needs the hub
    try:
        import datasets
    except ImportError:
        raise MoecompressError("hf: datasets need the `datasets` package (pip install datasets)") from None
    ds = datasets.load_dataset(spec.source, spec.config, split=spec.split)
    if spec.column not in ds.column_names:
        raise MoecompressError(f"{spec}: no column {spec.column!r}; columns: {', '.join(ds.column_names)}")
    has_domain = "domain" in ds.column_names
    return [(row[spec.column], str(row["domain"]) if has_domain and row["domain"] is not None else None)
            for row in ds if isinstance(row[spec.column], str) and row[spec.column].strip()]


def _windows(docs: list[str], tokenizer, seq_len: int, rng: random.Random) -> Iterator[list[int]]:
    """Consecutive seq_len-token windows of the shuffled, EOS-separated documents; the last one may be short."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    eos = getattr(tokenizer, "eos_token_id", None)
    buf: list[int] = []
    for i in order:
        ids = tokenizer(docs[i], add_special_tokens=False, verbose=False)["input_ids"]
        if buf and eos is not None:
            buf.append(eos)
        buf.extend(ids)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]
    if buf:
        yield buf


def build_calibration_data(dataset: DatasetSpec | str | Path, tokenizer, samples: int, seq_len: int,
                           seed: int = 0, progress: bool = False) -> CalibrationData:
    """`samples` sequences of `seq_len` tokens from `dataset` (see the module docstring for the rule)."""
    spec = dataset if isinstance(dataset, DatasetSpec) else DatasetSpec.parse(dataset)
    if samples < 1 or seq_len < 1:
        raise MoecompressError(f"samples and seq_len must be positive, got {samples} and {seq_len}")
    if tokenizer is None:
        raise MoecompressError("a tokenizer is needed to build calibration data from text")
    return sequences_from_documents(read_documents(spec), tokenizer, samples, seq_len, seed, str(spec), progress)


def sequences_from_documents(docs: list[tuple[str, str | None]], tokenizer, samples: int, seq_len: int,
                             seed: int = 0, description: str = "", progress: bool = False) -> CalibrationData:
    """`samples` sequences of `seq_len` tokens from (text, domain or None) documents, by the module's rule."""
    from tqdm.auto import tqdm

    spec = description or "documents"
    if not docs:
        raise MoecompressError(f"dataset {spec} has no non-empty document")
    has_domains = any(d is not None for _, d in docs)
    by_domain: dict[str, list[str]] = {}
    for text, dom in docs:
        by_domain.setdefault(dom if dom is not None else UNKNOWN_DOMAIN, []).append(text)
    names = sorted(by_domain)
    streams = {n: _windows(by_domain[n], tokenizer, seq_len, random.Random(f"{seed}:{n}")) for n in names}
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else \
        (getattr(tokenizer, "eos_token_id", None) or 0)
    ids, mask, dom_ids = [], [], []
    active = list(names)
    bar = tqdm(total=samples, desc="tokenize", unit="seq", disable=not progress)
    while len(ids) < samples and active:
        for n in list(active):
            if len(ids) == samples:
                break
            window = next(streams[n], None)
            if window is None or len(window) < seq_len:
                active.remove(n)
            if window is None:
                continue
            short = seq_len - len(window)
            ids.append(window + [pad] * short)
            mask.append([1] * len(window) + [0] * short)
            dom_ids.append(names.index(n))
            bar.update(1)
    bar.close()
    if len(ids) < samples:
        raise MoecompressError(f"dataset {spec} yields only {len(ids)} sequences of {seq_len} tokens, "
                               f"{samples} requested; lower --samples or --seq-len, or give more text")
    return CalibrationData(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        attention_mask=torch.tensor(mask, dtype=torch.int64),
        domain_ids=torch.tensor(dom_ids, dtype=torch.int64) if has_domains else None,
        domains=tuple(names) if has_domains else (),
        description=spec,
    )
