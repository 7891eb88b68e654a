"""Prefetch for MoE layer l+1 while layer l computes: predictors (PREDICTORS, a plain dict) and the reading thread.

A predictor ranks layer l+1's experts from what layer l knows when its experts module is called:
- `paths`: the activation-path statistics shipped with the checkpoint, P(j at l+1 | i at l), weighted by layer l's
  routing weights: score_j = sum over the call's (token, i) pairs of w * paths[l][i, j].
- `router`: layer l+1's own router applied to layer l's (normalised) hidden state: the summed softmax.
- `both`: the sum of the two scores (each normalised to sum 1).
A prediction is only a hint: the forward computes whatever was routed, fetching what is missing, so a wrong
prediction costs time, never changes results.

Two threads read the predicted experts (best first, two reads in flight) into the cache while the forward computes;
a request is dropped as soon as the layer it is for starts (the forward reads what it still misses itself). It never waits for room: when
only pinned or busy slots could make room, the rest of the request is dropped.
"""
from __future__ import annotations

import threading
from collections import deque

import torch

from moecompress.errors import MoecompressError


class PathsPredictor:
    def __init__(self, paths: torch.Tensor):
        self.paths = paths.float()  # [L-1, E, E]

    def scores(self, layer: int, hidden, top_k_index, top_k_weights) -> torch.Tensor | None:
        if layer >= self.paths.shape[0]:
            return None
        p = self.paths[layer].to(top_k_index.device)[top_k_index.reshape(-1)]  # [S, E]
        s = (top_k_weights.reshape(-1, 1).float() * p).sum(0)
        return s / s.sum().clamp(min=1e-30)


class RouterPredictor:
    def __init__(self, routers: list[torch.Tensor | None], norms: list[torch.Tensor | None] | None = None):
        self.routers = routers  # per MoE layer: router weight [E, H] (None where unknown)
        # per MoE layer: the RMSNorm weight [H] in front of its MoE block. Layer l's hidden state is normalised with
        # layer l's weight; layer l+1's router reads the (nearly the same) residual stream under layer l+1's: the
        # ratio of the two weights maps one onto the other.
        self.scale = [None] * len(routers)
        for layer in range(len(routers) - 1):
            if norms and norms[layer] is not None and norms[layer + 1] is not None:
                a, b = norms[layer].float(), norms[layer + 1].float()
                self.scale[layer + 1] = torch.where(a.abs() > 1e-6, b / a, torch.zeros_like(b))

    def scores(self, layer: int, hidden, top_k_index, top_k_weights) -> torch.Tensor | None:
        if layer + 1 >= len(self.routers) or self.routers[layer + 1] is None:
            return None
        w = self.routers[layer + 1]
        scale = self.scale[layer + 1]
        x = hidden if scale is None else hidden.float() * scale.to(hidden.device)
        probs = torch.softmax(x.to(w.dtype) @ w.t(), dim=-1, dtype=torch.float32)  # [T, E]
        return probs.sum(0) / probs.shape[0]


class BothPredictor:
    def __init__(self, paths: PathsPredictor, router: RouterPredictor):
        self.parts = (paths, router)

    def scores(self, layer, hidden, top_k_index, top_k_weights):
        got = [p.scores(layer, hidden, top_k_index, top_k_weights) for p in self.parts]
        got = [s for s in got if s is not None]
        return sum(got) if got else None


def _paths(stats, routers, norms=None):
    if stats is None:
        raise MoecompressError("prefetch from paths needs the checkpoint's expert statistics (expert_stats.safetensors), "
                               "which this checkpoint lacks; use prefetch='router' or re-export with statistics")
    return PathsPredictor(stats.paths)


def _router(stats, routers, norms=None):
    if all(r is None for r in routers):
        raise MoecompressError("prefetch 'router' needs each MoE layer's router weight ([experts, hidden]) beside "
                               "its experts module (as `gate` or `router`); none was found")
    return RouterPredictor(routers, norms)


def _both(stats, routers, norms=None):
    return BothPredictor(_paths(stats, routers), _router(stats, routers, norms))


PREDICTORS = {"paths": _paths, "router": _router, "both": _both}  # name -> builder(stats, routers, norms)


def make_predictor(name: str, stats, routers: list, norms: list | None = None):
    if name not in PREDICTORS:
        raise MoecompressError(f"unknown prefetch predictor {name!r}; allowed: {', '.join(PREDICTORS)}")
    return PREDICTORS[name](stats, routers, norms)


class Prefetcher:
    """Background threads reading requested experts into an ExpertCache, best first, `threads` reads in flight."""

    def __init__(self, cache, threads: int = 2):
        self.cache = cache
        self.requests: deque = deque()  # (call number, layer, expert id), best first
        self.call = 0  # number of the current layer call (the forward increments it at each layer)
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name="moecompress-prefetch", daemon=True)
                         for _ in range(threads)]
        for t in self._threads:
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
        for t in self._threads:
            t.join(timeout=10)
