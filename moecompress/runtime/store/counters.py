"""Counters of the expert store. A *use* is one expert of one layer needed by one forward call (in decoding, one
token): a hit when it is resident at that moment, a miss when it had to be read (or waited for), a substitution when
its low-bit copy computed it instead. Bytes fetched count what the slow tier transferred after load (demand and
prefetch reads; pinning at load is counted apart)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class StoreCounters:
    tokens: int = 0  # tokens through the store's first MoE layer
    hits: int = 0
    misses: int = 0
    substitutions: int = 0  # misses computed with the resident low-bit copy
    copy_fetches: int = 0  # full experts read after their copy computed a miss (StoreConfig.copy_fetch)
    prefetches: int = 0  # experts the prefetcher read
    useful_prefetches: int = 0  # of those, used before being evicted (also when the use had to wait for the read)
    late_prefetches: int = 0  # useful prefetches whose read had not finished when the expert was needed
    evictions: int = 0
    bytes_fetched: int = 0
    stall_s: float = 0.0  # time forward calls waited for the slow tier
    pinned_bytes: int = 0
    bytes_at_load: int = 0  # read to pin at load
    tier_busy_s: float | None = None  # GPU tier: time its side stream spent copying (CUDA events); None on the file tier

    @property
    def uses(self) -> int:
        return self.hits + self.misses + self.substitutions

    def summary(self) -> dict:
        uses = max(self.uses, 1)
        return {**asdict(self), "uses": self.uses,
                "hit_rate": self.hits / uses,
                "served_rate": (self.hits + self.substitutions) / uses,  # served from fast memory, exact or low-bit
                "bytes_per_token": self.bytes_fetched / max(self.tokens, 1),
                "prefetch_accuracy": self.useful_prefetches / self.prefetches if self.prefetches else None,
                "stall_s_per_token": self.stall_s / max(self.tokens, 1)}
