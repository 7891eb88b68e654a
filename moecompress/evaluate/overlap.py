"""Overlap between calibration and evaluation text, and evaluation text without it. Pure functions over strings.

Evaluating on text that calibration (or scale tuning) also saw flatters anything fitted on the calibration text.
Two kinds of overlap are counted: evaluation documents identical to a calibration document, and long lines (at
least `min_chars` characters once stripped of surrounding whitespace) of the evaluation text that occur verbatim as
a line of the calibration text -- boilerplate such as licence headers and man-page sections, which repeats across
documents. Short lines ("}", "return 0;", blank lines) are left alone: they carry little and are everywhere.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from moecompress.errors import MoecompressError

MIN_CHARS = 40  # a line this long (stripped) that occurs verbatim in both texts counts as overlap

Document = tuple[str, "str | None"]  # (text, domain or None), as calibrate.dataset.read_documents returns


@dataclass(frozen=True)
class TextOverlap:
    """What of the evaluation text also occurs in the calibration text."""

    documents: int  # evaluation documents
    identical_documents: int  # of them, identical to a calibration document
    long_lines: int  # evaluation lines of >= min_chars characters (stripped)
    overlapping_lines: int  # of them, occurring verbatim as a line of the calibration text
    chars: int  # characters of the evaluation text
    overlapping_chars: int  # characters removed by dropping the overlap (identical documents and overlapping lines)
    min_chars: int
    dropped: bool  # whether the evaluation text used had the overlap removed

    @property
    def line_share(self) -> float:
        return self.overlapping_lines / self.long_lines if self.long_lines else 0.0

    def describe(self) -> str:
        what = "dropped from the evaluation text" if self.dropped else "KEPT in the evaluation text"
        return (f"calibration/evaluation overlap: {self.identical_documents} of {self.documents} documents identical, "
                f"{self.overlapping_lines} of {self.long_lines} lines of >= {self.min_chars} chars occur verbatim in "
                f"the calibration text ({self.overlapping_chars} of {self.chars} chars): {what}")


def _long_lines(texts: Iterable[str], min_chars: int) -> set[str]:
    return {s for t in texts for s in (line.strip() for line in t.splitlines()) if len(s) >= min_chars}


def _check(min_chars: int) -> None:
    if not isinstance(min_chars, int) or min_chars < 1:
        raise MoecompressError(f"min_chars must be a positive integer, got {min_chars!r}")


def text_overlap(calibration: Iterable[str], evaluation: Iterable[str], min_chars: int = MIN_CHARS,
                 dropped: bool = False) -> TextOverlap:
    """Count the overlap of the `evaluation` documents with the `calibration` documents (see the module docstring)."""
    _check(min_chars)
    calibration, evaluation = list(calibration), list(evaluation)
    whole, lines = set(calibration), _long_lines(calibration, min_chars)
    identical = long = overlapping = removed = 0
    for text in evaluation:
        if text in whole:
            identical += 1
            removed += len(text)
        for line in text.splitlines():
            s = line.strip()
            if len(s) >= min_chars:
                long += 1
                if s in lines:
                    overlapping += 1
                    if text not in whole:
                        removed += len(line)
    return TextOverlap(documents=len(evaluation), identical_documents=identical, long_lines=long,
                       overlapping_lines=overlapping, chars=sum(len(t) for t in evaluation),
                       overlapping_chars=removed, min_chars=min_chars, dropped=dropped)


def drop_overlap(calibration: Iterable[str], evaluation: list[Document],
                 min_chars: int = MIN_CHARS) -> list[Document]:
    """The evaluation documents without the overlap: identical documents left out, overlapping long lines removed
    (the other lines keep their order); documents left with no non-blank text are left out too."""
    _check(min_chars)
    calibration = list(calibration)
    whole, lines = set(calibration), _long_lines(calibration, min_chars)
    out = []
    for text, domain in evaluation:
        if text in whole:
            continue
        kept = "\n".join(line for line in text.splitlines() if line.strip() not in lines or
                         len(line.strip()) < min_chars)
        if kept.strip():
            out.append((kept, domain))
    return out
