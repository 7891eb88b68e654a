"""Eviction policies of the expert cache, selected by name (EVICTION_POLICIES, a plain dict).

A policy sees the cache's unpinned, unused entries and names the one to evict. Keys are (layer, expert).

- `lru`: least recently used.
- `lfu`: fewest uses since it was loaded (ties: least recently used).
- `popularity`: lowest routing-weight mass per byte from the checkpoint's statistics (pinning's value), scaled by
  how often it was used here ((uses + 1) x mass / bytes; ties: least recently used). Without statistics: LFU.
- `demand`: load on demand, no cache beyond the running layer: every unpinned entry of a layer is dropped when the
  layer's call ends (`keep_after_layer = False`); inside the call, LRU.
"""
from __future__ import annotations

from collections import OrderedDict


class LRU:
    keep_after_layer = True

    def __init__(self, value: dict | None = None):
        self.value = value or {}  # (layer, expert) -> routing mass per byte (statistics), for `popularity`
        self.recency: OrderedDict = OrderedDict()  # key -> None, least recent first
        self.uses: dict = {}

    def on_insert(self, key) -> None:
        self.recency[key] = None
        self.recency.move_to_end(key)
        self.uses[key] = 0

    def on_use(self, key) -> None:
        self.recency.move_to_end(key)
        self.uses[key] = self.uses.get(key, 0) + 1

    def on_evict(self, key) -> None:
        self.recency.pop(key, None)
        self.uses.pop(key, None)

    def victim(self, evictable) -> tuple | None:
        """The key to evict among `evictable` (a set), or None when it is empty."""
        for key in self.recency:
            if key in evictable:
                return key
        return None


class LFU(LRU):
    def score(self, key) -> float:
        return self.uses.get(key, 0)

    def victim(self, evictable) -> tuple | None:
        best, best_score = None, None
        for key in self.recency:  # least recent first: ties go to the least recently used
            if key in evictable:
                s = self.score(key)
                if best_score is None or s < best_score:
                    best, best_score = key, s
        return best


class Popularity(LFU):
    def score(self, key) -> float:
        if not self.value:
            return super().score(key)
        return (self.uses.get(key, 0) + 1) * self.value.get(key, 0.0)


class Demand(LRU):
    keep_after_layer = False


EVICTION_POLICIES = {"lru": LRU, "lfu": LFU, "popularity": Popularity, "demand": Demand}
