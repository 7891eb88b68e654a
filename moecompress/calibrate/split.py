"""A held-back split of the calibration text: documents the calibration (Hessians, GPTQ) never sees, on which the
sensitivity stage measures its costs.

Without it, the measured sensitivity methods run the last `sensitivity.holdout` share of the calibration sequences:
text the Hessians -- and so GPTQ -- were fitted on, which flatters exactly the quantizer whose damage is measured.

The rule (deterministic for a seed), per domain (documents without a domain form one group):
- identical documents are one unit, so a text never lands on both sides;
- the units are shuffled with `random.Random(f"{seed}:held_back:{domain}")` and taken into the held-back split until
  it holds at least `share` of the domain's characters (a domain with a single unit stays whole on the fit side);
- long lines (>= evaluate.overlap.MIN_CHARS characters) of the held-back documents that also occur in a fit document
  (licence headers, man-page boilerplate) are removed from the held-back text, as the evaluation text's overlap is.
Of the `samples` calibration sequences, `held` come from the held-back documents and the rest from the fit
documents (each by dataset.sequences_from_documents). The quantize stage's GPTQ uses all of them (the same amount
of text as without a held-back split); the sensitivity stage simulates its candidates with Hessians of the fit
sequences alone and measures them on the held-back ones, text those Hessians never saw.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from moecompress.calibrate.dataset import (UNKNOWN_DOMAIN, CalibrationData, DatasetSpec, read_documents,
                                           sequences_from_documents)
from moecompress.errors import MoecompressError
from moecompress.evaluate.overlap import Document, drop_overlap


@dataclass(frozen=True)
class DocumentSplit:
    fit: list[Document]  # the calibration documents proper
    held_back: list[Document]  # disjoint from `fit`: no identical document, no shared long line


def split_documents(docs: list[Document], share: float, seed: int = 0) -> DocumentSplit:
    """Documents -> (fit, held back), about `share` of every domain's characters held back (module docstring)."""
    if not 0 < share < 1:
        raise MoecompressError(f"calibration.held_back must be in (0, 1) (the share of the calibration text kept "
                               f"out for the sensitivity stage), got {share}")
    by_domain: dict[str, dict[str, list[Document]]] = {}
    for text, dom in docs:
        by_domain.setdefault(dom if dom is not None else UNKNOWN_DOMAIN, {}).setdefault(text, []).append((text, dom))
    held_texts: set[str] = set()
    for name in sorted(by_domain):
        units = sorted(by_domain[name])  # unique texts, in a fixed order before the seeded shuffle
        if len(units) < 2:
            continue
        random.Random(f"{seed}:held_back:{name}").shuffle(units)
        want, got = share * sum(len(t) * len(by_domain[name][t]) for t in units), 0
        for text in units[:-1]:  # at least one unit stays on the fit side
            if got >= want:
                break
            held_texts.add(text)
            got += len(text) * len(by_domain[name][text])
    fit = [d for d in docs if d[0] not in held_texts]
    held = drop_overlap([t for t, _ in fit], [d for d in docs if d[0] in held_texts])
    if not held:
        raise MoecompressError(f"calibration.held_back {share}: the calibration text has too few documents to hold "
                               "any back (a domain needs at least two distinct documents); set held_back to 0")
    return DocumentSplit(fit=fit, held_back=held)


def held_back_data(dataset: DatasetSpec | str, tokenizer, samples: int, held_samples: int, seq_len: int,
                   share: float, seed: int = 0, progress: bool = False) -> tuple[CalibrationData, CalibrationData]:
    """(samples - held_samples sequences from the fit documents, held_samples from the held-back documents)."""
    if not 0 < held_samples < samples:
        raise MoecompressError(f"{held_samples} held-back sequences of {samples} calibration sequences: give more "
                               "calibration.samples or a smaller sensitivity.holdout")
    spec = dataset if isinstance(dataset, DatasetSpec) else DatasetSpec.parse(dataset)
    split = split_documents(read_documents(spec), share, seed)
    fit = sequences_from_documents(split.fit, tokenizer, samples - held_samples, seq_len, seed,
                                   f"{spec} (fit split)", progress)
    held = sequences_from_documents(split.held_back, tokenizer, held_samples, seq_len, seed,
                                    f"{spec} (held-back split, {share:g})", progress)
    return fit, held


def joined(a: CalibrationData, b: CalibrationData) -> CalibrationData:
    """a's sequences then b's, their domains merged (sorted union of the names)."""
    if a.seq_len != b.seq_len:
        raise MoecompressError(f"sequences of {a.seq_len} and {b.seq_len} tokens cannot be joined")
    if (a.domain_ids is None) != (b.domain_ids is None):
        raise MoecompressError("only data with domains can be joined to data with domains")
    ids, mask = torch.cat([a.input_ids, b.input_ids]), torch.cat([a.attention_mask, b.attention_mask])
    if a.domain_ids is None:
        return CalibrationData(ids, mask, description=f"{a.description} + {b.description}")
    names = tuple(sorted(set(a.domains) | set(b.domains)))
    remap = [torch.tensor([names.index(n) for n in d.domains], dtype=torch.int64) for d in (a, b)]
    dom = torch.cat([remap[0][a.domain_ids], remap[1][b.domain_ids]])
    return CalibrationData(ids, mask, dom, names, f"{a.description} + {b.description}")


def held_samples(samples: int, holdout: float) -> int:
    """How many held-back sequences the sensitivity runs: the share `holdout` of the calibration sequences, as
    many as it ran from the calibration sequences themselves (sensitivity.holdout)."""
    return max(1, math.ceil(round(holdout * samples, 6)))
