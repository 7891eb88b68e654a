"""What placement reads about routing: a per-token trace to replay, and the counts that summarise it.

RoutingStats holds exactly what the optimiser needs; the calibration pass records these counts, and
`RoutingStats.from_trace` derives them from a trace (tests, benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moecompress.errors import MoecompressError

_CHUNK = 65536  # tokens counted at once


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """The top-k choice of T tokens at every MoE layer."""

    experts: np.ndarray  # [T, L, k] int64, expert ids
    weights: np.ndarray  # [T, L, k] float32, routing weights (as the model combines them)
    num_experts: int

    def __post_init__(self):
        e, w = np.asarray(self.experts), np.asarray(self.weights)
        if e.ndim != 3 or e.shape != w.shape:
            raise MoecompressError(
                f"trace experts and weights must both be [tokens, layers, k], got {e.shape} and {w.shape}"
            )
        if e.size and (e.min() < 0 or e.max() >= self.num_experts):
            raise MoecompressError(f"trace expert ids must be in 0..{self.num_experts - 1}")
        object.__setattr__(self, "experts", e.astype(np.int64, copy=False))
        object.__setattr__(self, "weights", w.astype(np.float32, copy=False))

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]


@dataclass(frozen=True, eq=False)
class RoutingStats:
    """Routing counts over `num_tokens` calibration tokens, per MoE layer.

    coact[l, i, j] (i != j): tokens choosing both i and j at layer l; symmetric, diagonal ignored.
    paths[l, i, j]: tokens choosing i at layer l and j at layer l + 1.
    """

    tokens: np.ndarray  # [L, E] tokens routed to each expert
    coact: np.ndarray  # [L, E, E]
    paths: np.ndarray  # [L-1, E, E]
    num_tokens: int
    top_k: int

    def __post_init__(self):
        t, c, p = (np.asarray(a, dtype=np.float64) for a in (self.tokens, self.coact, self.paths))
        L, E = t.shape if t.ndim == 2 else (0, 0)
        if t.ndim != 2 or c.shape != (L, E, E) or p.shape != (max(L - 1, 0), E, E):
            raise MoecompressError(
                f"routing stats must be tokens [L, E], coact [L, E, E], paths [L-1, E, E]; got {t.shape}, "
                f"{c.shape}, {p.shape}"
            )
        if self.num_tokens < 1 or not 1 <= self.top_k <= E:
            raise MoecompressError(f"routing stats need num_tokens >= 1 and 1 <= top_k <= {E}")
        c = (c + c.transpose(0, 2, 1)) / 2  # tolerate a triangular count
        c[:, np.arange(E), np.arange(E)] = 0
        for name, a in (("tokens", t), ("coact", c), ("paths", p)):
            object.__setattr__(self, name, a)

    @property
    def num_layers(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_experts(self) -> int:
        return self.tokens.shape[1]

    @classmethod
    def from_trace(cls, trace: RoutingTrace) -> "RoutingStats":
        T, L, k = trace.experts.shape
        E = trace.num_experts
        tokens = np.zeros((L, E))
        coact = np.zeros((L, E, E))
        paths = np.zeros((max(L - 1, 0), E, E))
        for start in range(0, T, _CHUNK):
            chunk = trace.experts[start : start + _CHUNK]  # [t, L, k]
            for layer in range(L):
                tokens[layer] += np.bincount(chunk[:, layer].ravel(), minlength=E)
                coact[layer] += _pair_counts(chunk[:, layer], chunk[:, layer], E)
                if layer + 1 < L:
                    paths[layer] += _pair_counts(chunk[:, layer], chunk[:, layer + 1], E)
        return cls(tokens=tokens, coact=coact, paths=paths, num_tokens=T, top_k=k)


def _pair_counts(a: np.ndarray, b: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, E] tokens choosing i in a and j in b, for a, b [t, k] expert ids of the same tokens."""
    pairs = (a[:, :, None] * num_experts + b[:, None, :]).ravel()  # [t * k * k]
    return np.bincount(pairs, minlength=num_experts * num_experts).reshape(num_experts, num_experts)
