"""Eviction policies of the expert cache, selected by name (EVICTION_POLICIES, a plain dict).

A policy sees the cache's unpinned, unused entries and names the one to evict. Keys are (layer, expert).

- `lru`: least recently used.
- `lfu`: fewest uses since it was loaded (ties: least recently used).
- `popularity`: lowest routing-weight mass per byte from the checkpoint's statistics (pinning's value), scaled by
  how often it was used here ((uses + 1) x mass / bytes; ties: least recently used). Without statistics: LFU.
- `demand`: load on demand, no cache beyond the running layer: every unpinned entry of a layer is dropped when the
  layer's call ends (`keep_after_layer = False`); inside the call, LRU.
- `cyclic`: LRU counted per layer, for the layers' cycle of decoding (0, 1, ..., L-1 per token). Plain LRU ranks an
  expert of layer l+1 used at the last token as older than one of layer l-1 used at this token, so while layer l runs
  it evicts the layer needed next. Here an entry's age is the number of its layer's calls since it was last used (an
  entry read ahead for a later call counts as used by it), and among equal ages the entry whose layer comes back last
  goes first (ties: least recently used).
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

    def on_call(self, layer: int) -> None:
        """A forward call of `layer` starts (before its experts are used or read)."""

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


class Cyclic(LRU):
    def __init__(self, value: dict | None = None):
        super().__init__(value)
        self.calls: dict[int, int] = {}  # layer -> its calls so far
        self.used_at: dict = {}  # key -> its layer's call count at its last use
        self.current: int | None = None  # the layer whose call runs
        self.layers = 0  # highest layer seen + 1 (the cycle's length)

    def on_call(self, layer: int) -> None:
        self.current = layer
        self.calls[layer] = self.calls.get(layer, 0) + 1
        self.layers = max(self.layers, layer + 1)

    def on_insert(self, key) -> None:
        super().on_insert(key)
        layer = key[0]
        self.layers = max(self.layers, layer + 1)
        # read for the running call (a demand read) or ahead of its layer's next call (counted as used by that one)
        self.used_at[key] = self.calls.get(layer, 0) + (layer != self.current)

    def on_use(self, key) -> None:
        super().on_use(key)
        self.used_at[key] = self.calls.get(key[0], 0)

    def on_evict(self, key) -> None:
        super().on_evict(key)
        self.used_at.pop(key, None)

    def victim(self, evictable) -> tuple | None:
        best, best_score = None, None
        for key in self.recency:  # least recent first: ties go to the least recently used
            if key in evictable:
                layer = key[0]
                age = self.calls.get(layer, 0) - self.used_at.get(key, 0)
                # layer calls until this entry's layer runs again
                back = 0 if self.current is None else (layer - self.current - 1) % self.layers + 1
                s = (age, back)
                if best_score is None or s > best_score:
                    best, best_score = key, s
        return best


EVICTION_POLICIES = {"lru": LRU, "lfu": LFU, "popularity": Popularity, "demand": Demand, "cyclic": Cyclic}
