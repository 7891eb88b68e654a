"""EvalResult: what `evaluate` measured on one model, as plain data that round-trips through JSON."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from moecompress.errors import MoecompressError
from moecompress.evaluate.overlap import TextOverlap


@dataclass(frozen=True)
class DomainScore:
    name: str
    tokens: int  # scored next-token predictions
    nll: float  # mean negative log-likelihood per token, nats
    kl: float | None = None  # mean KL(reference || model) per token, nats

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.tokens else float("nan")


@dataclass(frozen=True)
class ModelSize:
    """Storage of a model. avg_bits: nominal bits per routed-expert weight (what the bit plan spends; 16 for a
    plain model). stored_bits: the routed experts' stored bytes (scales and zero-points included) x 8 per weight.
    bits_per_weight: every stored byte (scales, zeros, bf16 embeddings...) over every weight."""

    bytes: int
    bf16_bytes: int  # the same weights in bf16
    avg_bits: float
    bits_per_weight: float
    source: str  # "checkpoint" (read from safetensors headers) or "parameters" (a plain model, counted as bf16)
    stored_bits: float | None = None  # None in results written before it was recorded


@dataclass(frozen=True)
class EvalResult:
    method: str  # label of the model, e.g. "rtn@4" or "bf16"
    family: str  # series in the Pareto plot, e.g. "rtn"
    dataset: str
    samples: int  # sequences evaluated
    seq_len: int
    seed: int
    tokens: int  # scored next-token predictions, all domains
    nll: float  # mean negative log-likelihood per token, nats
    domains: tuple[DomainScore, ...] = ()  # empty when the dataset has no domains
    kl: float | None = None  # mean KL(reference || model) per token, nats; None without a reference
    reference: str | None = None
    size: ModelSize | None = None
    overlap: TextOverlap | None = None  # overlap of the evaluation text with the calibration text, when checked

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.tokens else float("nan")

    def domain(self, name: str) -> DomainScore:
        for d in self.domains:
            if d.name == name:
                return d
        raise MoecompressError(f"{self.method}: no domain {name!r}; domains: {', '.join(d.name for d in self.domains)}")

    def to_dict(self) -> dict:
        """JSON-ready; adds the derived perplexities (ignored by from_dict)."""
        out = dataclasses.asdict(self)
        out["perplexity"] = self.perplexity
        out["domains"] = [{**dataclasses.asdict(d), "perplexity": d.perplexity} for d in self.domains]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "EvalResult":
        data = {k: v for k, v in data.items() if k != "perplexity"}
        _check_keys(cls, data, "result")
        domains = []
        for d in data.get("domains", ()):
            d = {k: v for k, v in d.items() if k != "perplexity"}
            _check_keys(DomainScore, d, "domain")
            domains.append(DomainScore(**d))
        size = data.get("size")
        if size is not None:
            _check_keys(ModelSize, size, "size")
            size = ModelSize(**size)
        overlap = data.get("overlap")
        if overlap is not None:
            _check_keys(TextOverlap, overlap, "overlap")
            overlap = TextOverlap(**overlap)
        return cls(**{**data, "domains": tuple(domains), "size": size, "overlap": overlap})


def _check_keys(cls, data: dict, what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise MoecompressError(f"unknown {what} field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
