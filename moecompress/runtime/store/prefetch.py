"""Prefetch for MoE layer l+1 while layer l computes: predictors (PREDICTORS, a plain dict) and the reading thread.

A predictor ranks layer l+1's experts from what layer l knows when its experts module is called:
- `paths`: the activation-path statistics shipped with the checkpoint, P(j at l+1 | i at l), weighted by layer l's
  routing weights: score_j = sum over the call's (token, i) pairs of w * paths[l][i, j].
- `router`: layer l+1's own router applied to layer l's (normalised) hidden state: the summed softmax.
- `both`: the sum of the two scores (each normalised to sum 1).
A prediction is only a hint: the forward computes whatever was routed, fetching what is missing, so a wrong
prediction costs time, never changes results.

The thread reads the predicted experts (best first) into the cache while the forward computes; a request is dropped
as soon as the layer it is for starts (the forward reads what it still misses itself). It never waits for room: when
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
    def __init__(self, routers: list[torch.Tensor | None]):
        self.routers = routers  # per MoE layer: router weight [E, H] (None where unknown)

    def scores(self, layer: int, hidden, top_k_index, top_k_weights) -> torch.Tensor | None:
        if layer + 1 >= len(self.routers) or self.routers[layer + 1] is None:
            return None
        w = self.routers[layer + 1]
        probs = torch.softmax(hidden.to(w.dtype) @ w.t(), dim=-1, dtype=torch.float32)  # [T, E]
        return probs.sum(0) / probs.shape[0]


class BothPredictor:
    def __init__(self, paths: PathsPredictor, router: RouterPredictor):
        self.parts = (paths, router)

    def scores(self, layer, hidden, top_k_index, top_k_weights):
        got = [p.scores(layer, hidden, top_k_index, top_k_weights) for p in self.parts]
        got = [s for s in got if s is not None]
        return sum(got) if got else None


def _paths(stats, routers):
    if stats is None:
        raise MoecompressError("prefetch from paths needs the checkpoint's expert statistics (expert_stats.safetensors), "
                               "which this checkpoint lacks; use prefetch='router' or re-export with statistics")
    return PathsPredictor(stats.paths)


def _router(stats, routers):
    if all(r is None for r in routers):
        raise MoecompressError("prefetch 'router' needs each MoE layer's router weight ([experts, hidden]) beside "
                               "its experts module (as `gate` or `router`); none was found")
    return RouterPredictor(routers)


def _both(stats, routers):
    return BothPredictor(_paths(stats, routers), _router(stats, routers))


PREDICTORS = {"paths": _paths, "router": _router, "both": _both}  # name -> builder(stats, routers)


def make_predictor(name: str, stats, routers: list):
    if name not in PREDICTORS:
        raise MoecompressError(f"unknown prefetch predictor {name!r}; allowed: {', '.join(PREDICTORS)}")
    return PREDICTORS[name](stats, routers)


class Prefetcher:
    """One background thread reading requested experts into an ExpertCache."""

    def __init__(self, cache):
        self.cache = cache
        self.requests: deque = deque()  # (call number, layer, [expert ids best first])
        self.call = 0  # number of the current layer call (the forward increments it at each layer)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="moecompress-prefetch", daemon=True)
        self._thread.start()

    def begin_call(self) -> None:
        with self.cache.cond:
            self.call += 1
            self.requests.clear()  # requests for this layer that never started: the forward reads what it misses

    def request(self, layer: int, experts: list[int]) -> None:
        with self.cache.cond:
            self.requests.append((self.call, layer, experts))
            self.cache.cond.notify_all()

    def _run(self) -> None:
        cond = self.cache.cond
        while True:
            with cond:
                while not self.requests and not self._closed:
                    cond.wait()
                if self._closed:
                    return
                call, layer, experts = self.requests.popleft()
            for e in experts:
                with cond:
                    if self._closed or self.call > call:  # layer `layer` has started: stop
                        break
                if not self.cache.fill((layer, e), prefetched=True, wait=False):
                    break

    def close(self) -> None:
        with self.cache.cond:
            self._closed = True
            self.cache.cond.notify_all()
        self._thread.join(timeout=10)
