"""Prefetch for MoE layer l+1 while layer l computes: predictors (PREDICTORS, a plain dict) and the reading thread.

A predictor ranks layer l+1's experts from what layer l knows when its experts module is called:
- `paths`: the activation-path statistics shipped with the checkpoint, P(j at l+1 | i at l), weighted by layer l's
  routing weights: score_j = sum over the call's (token, i) pairs of w * paths[l][i, j].
- `router`: layer l+1's own router applied to layer l's (normalised) hidden state: the summed softmax.
- `both`: the sum of the two scores (each normalised to sum 1).
With `router`, a second prediction once layer l's experts have computed (StoreConfig.prefetch_refine): layer l+1's
router on the residual stream after layer l's MoE block (RouterPredictor.residual_scores; the stream comes from a
hook on the block's RMSNorm), read during layer l+1's attention; it adds what the first one missed.
A prediction is only a hint: the forward computes whatever was routed, fetching what is missing, so a wrong
prediction costs time, never changes results.

Only the prediction ranks that proved precise are read ahead (RankPrecision: a read not used costs a whole read, and
on untrained routing 80 % of them were not used). Two threads read the predicted experts (best first, two reads in
flight) into the cache while the forward computes; a request is dropped as soon as the layer it is for starts (the
forward reads what it still misses itself). It never waits for room: when only pinned or busy slots could make room,
the rest of the request is dropped.
"""
from __future__ import annotations

import threading
from collections import deque

import torch

from moecompress.errors import MoecompressError


class PathsPredictor:
    def __init__(self, paths: torch.Tensor):
        self.paths = paths.float()  # [L-1, E, E]
        self._on: dict = {}  # device -> the paths there (copied once: no copy, hence no host wait, per call)

    def scores(self, layer: int, hidden, top_k_index, top_k_weights) -> torch.Tensor | None:
        if layer >= self.paths.shape[0]:
            return None
        device = top_k_index.device
        if device not in self._on:
            self._on[device] = self.paths.to(device)
        p = self._on[device][layer][top_k_index.reshape(-1)]  # [S, E]
        s = (top_k_weights.reshape(-1, 1).float() * p).sum(0)
        return s / s.sum().clamp(min=1e-30)


class RouterPredictor:
    def __init__(self, routers: list[torch.Tensor | None], norms: list[torch.Tensor | None] | None = None,
                 eps: list[float | None] | None = None):
        self.routers = routers  # per MoE layer: router weight [E, H] (None where unknown)
        self.norms = [None if n is None else n.float() for n in (norms or [None] * len(routers))]
        self.eps = eps or [None] * len(routers)
        # per MoE layer: the RMSNorm weight [H] in front of its MoE block. Layer l's hidden state is normalised with
        # layer l's weight; layer l+1's router reads the (nearly the same) residual stream under layer l+1's: the
        # ratio of the two weights maps one onto the other.
        self.scale = [None] * len(routers)
        for layer in range(len(routers) - 1):
            if norms and norms[layer] is not None and norms[layer + 1] is not None:
                a, b = self.norms[layer], self.norms[layer + 1]
                self.scale[layer + 1] = torch.where(a.abs() > 1e-6, b / a, torch.zeros_like(b))

    def to(self, device) -> RouterPredictor:
        """Its norm weights and rescales moved to `device` (once: a CUDA graph capture cannot copy them from host
        memory at each call, graph_predict.py)."""
        self.norms = [None if t is None else t.to(device) for t in self.norms]
        self.scale = [None if t is None else t.to(device) for t in self.scale]
        return self

    def scores(self, layer: int, hidden, top_k_index, top_k_weights) -> torch.Tensor | None:
        if layer + 1 >= len(self.routers) or self.routers[layer + 1] is None:
            return None
        w = self.routers[layer + 1]
        scale = self.scale[layer + 1]
        x = hidden if scale is None else hidden.float() * scale.to(hidden.device)
        probs = torch.softmax(x.to(w.dtype) @ w.t(), dim=-1, dtype=torch.float32)  # [T, E]
        return probs.sum(0) / probs.shape[0]

    def residual_scores(self, layer: int, residual: torch.Tensor) -> torch.Tensor | None:
        """Layer l+1's router on the residual stream after layer l's MoE block ([T, H]: the stream entering layer l's
        block plus its output), under layer l+1's RMSNorm: the input layer l+1's router will see, less layer l+1's
        attention. The second, later prediction (store.ExpertStore: after layer l's experts computed)."""
        nxt = layer + 1
        if nxt >= len(self.routers) or self.routers[nxt] is None or self.norms[nxt] is None or self.eps[nxt] is None:
            return None
        x = residual.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps[nxt]) * self.norms[nxt].to(x.device)
        w = self.routers[nxt]
        probs = torch.softmax(x.to(w.dtype) @ w.t(), dim=-1, dtype=torch.float32)  # [T, E]
        return probs.sum(0) / probs.shape[0]


class BothPredictor:
    def __init__(self, paths: PathsPredictor, router: RouterPredictor):
        self.parts = (paths, router)

    def scores(self, layer, hidden, top_k_index, top_k_weights):
        got = [p.scores(layer, hidden, top_k_index, top_k_weights) for p in self.parts]
        got = [s for s in got if s is not None]
        return sum(got) if got else None


def _paths(stats, routers, norms=None, eps=None):
    if stats is None:
        raise MoecompressError("prefetch from paths needs the checkpoint's expert statistics (expert_stats.safetensors), "
                               "which this checkpoint lacks; use prefetch='router' or re-export with statistics")
    return PathsPredictor(stats.paths)


def _router(stats, routers, norms=None, eps=None):
    if all(r is None for r in routers):
        raise MoecompressError("prefetch 'router' needs each MoE layer's router weight ([experts, hidden]) beside "
                               "its experts module (as `gate` or `router`); none was found")
    return RouterPredictor(routers, norms, eps)


def _both(stats, routers, norms=None, eps=None):
    return BothPredictor(_paths(stats, routers), _router(stats, routers, norms, eps))


PREDICTORS = {"paths": _paths, "router": _router, "both": _both}  # name -> builder(stats, routers, norms, eps)


def make_predictor(name: str, stats, routers: list, norms: list | None = None, eps: list | None = None):
    if name not in PREDICTORS:
        raise MoecompressError(f"unknown prefetch predictor {name!r}; allowed: {', '.join(PREDICTORS)}")
    return PREDICTORS[name](stats, routers, norms, eps)


class RankPrecision:
    """How often the expert a predictor ranks r-th for layer l+1 is routed at layer l+1's next call: an exponential
    average per (layer, rank), starting at 1 (every rank is read ahead until it proves wrong). A read ahead that is
    not used costs a whole read (CPU and bandwidth on the box that computes) and may evict an expert still in use, so
    the store reads ahead only the ranks whose precision is at least `min_precision`. The predictions are made and
    checked whether or not they were read, so a rank whose precision recovers is read ahead again. Deterministic:
    it depends on the routing only, not on which reads arrived in time."""

    def __init__(self, min_precision: float, rate: float = 0.125):
        self.min_precision, self.rate = min_precision, rate
        self.precision: dict[tuple[int, int], float] = {}  # (layer, rank) -> exponential average of "was routed"
        self.pending: dict[int, list[int]] = {}  # layer -> its last prediction (ranked), not yet checked

    def predicted(self, layer: int, ranked: list[int]) -> list[int]:
        """Record a prediction for `layer` (best first); -> the experts worth reading ahead."""
        self.pending[layer] = ranked
        return [e for r, e in enumerate(ranked) if self.precision.get((layer, r), 1.0) >= self.min_precision]

    def routed(self, layer: int, experts: set[int]) -> None:
        """Layer `layer`'s call routed `experts`: check its pending prediction."""
        ranked = self.pending.pop(layer, None)
        for r, e in enumerate(ranked or ()):
            p = self.precision.get((layer, r), 1.0)
            self.precision[(layer, r)] = p + self.rate * (float(e in experts) - p)


class Prefetcher:
    """Background threads reading requested experts into an ExpertCache, best first, `threads` reads in flight."""

    def __init__(self, cache, threads: int = 2):
        self.cache = cache
        self.requests: deque = deque()  # (call number, layer, expert id), best first
        self.call = 0  # number of the current layer call (the forward increments it at each layer)
        self._closed = False
        self.threads = [threading.Thread(target=self._run, name="moecompress-prefetch", daemon=True)
                         for _ in range(threads)]
        for t in self.threads:
            t.start()

    def begin_call(self) -> None:
        with self.cache.cond:
            self.call += 1
            self.requests.clear()  # requests for this layer that never started: the forward reads what it misses

    def request(self, layer: int, experts: list[int]) -> None:
        with self.cache.cond:
            self.requests.extend((self.call, layer, e) for e in experts)
            self.cache.cond.notify_all()

    def _run(self) -> None:
        cond = self.cache.cond
        while True:
            with cond:
                while not self.requests and not self._closed:
                    cond.wait()
                if self._closed:
                    return
                call, layer, e = self.requests.popleft()
                if self.call > call:  # layer `layer` has started: the forward reads what it misses
                    continue
            if not self.cache.fill((layer, e), prefetched=True, wait=False):
                with cond:  # no room without evicting pinned or busy slots: drop the rest of this request
                    while self.requests and self.requests[0][0] == call:
                        self.requests.popleft()

    def close(self) -> None:
        with self.cache.cond:
            self._closed = True
            self.cache.cond.notify_all()
        for t in self.threads:
            t.join(timeout=10)
