"""The fast tier: a per-expert slot table under a byte budget, filled from a slow tier and evicted by a policy.

A slot holds one expert of one MoE layer: one single-expert PackedGroup per projection (the format's packed rows, so
the kernels compute it exactly as in the fully resident model). Keys are (layer, expert), layer = MoE ordinal.

Budget (bytes): resident slots + reads in flight (space is reserved before a read starts) + the resident low-bit
copies never exceed it. A forward call holds `working_set` experts at once (all their projections): one on the
per-expert path, one token's top-k on the fused decode path (store/fused.py), so the smallest workable budget is the
largest such set of any layer plus the low-bit copies; pinned slots are chosen so that this room stays.

Thread safety: one condition variable guards the table; reads run outside it (the prefetch thread's and the forward's
reads overlap with computation). An expert being computed or read is never evicted.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from moecompress.errors import MoecompressError
from moecompress.runtime.experts.packed_group import PackedGroup
from moecompress.runtime.store.counters import StoreCounters
from moecompress.runtime.store.policies import EVICTION_POLICIES


@dataclass(frozen=True)
class ProjShape:
    """What a single-expert PackedGroup of one projection needs besides its tensors."""

    bits: int
    in_features: int
    out_features: int
    has_bias: bool
    dtype: torch.dtype


@dataclass
class Slot:
    groups: Mapping[str, PackedGroup]  # proj -> single-expert group
    nbytes: int
    pinned: bool = False
    prefetched: bool = False  # read by the prefetcher and not used yet
    in_use: int = 0
    buffers: list = field(default_factory=list)  # the row buffers its tensors view (given back to the tier on eviction)


class LazyGroups(Mapping):
    """A slot's proj -> PackedGroup, built at the first lookup (the GPU slot table's reads: most are never computed
    one expert at a time, and building the groups cost the bookkeeping thread more than the read itself)."""

    def __init__(self, build):
        self._build, self._groups, self._lock = build, None, threading.Lock()

    def _get(self) -> dict:
        if self._groups is None:
            with self._lock:
                if self._groups is None:
                    self._groups = self._build()
        return self._groups

    def __getitem__(self, proj: str) -> PackedGroup:
        return self._get()[proj]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


@dataclass
class StoreLayout:
    """Per layer: expert -> proj -> ProjShape, and the resident bytes of each expert (all projections)."""

    shapes: list[dict[int, dict[str, ProjShape]]]
    nbytes: dict[tuple[int, int], int]
    group_size: int
    symmetric: bool
    compute_dtype: torch.dtype
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class ExpertCache:
    def __init__(self, layout: StoreLayout, tier, budget: int, policy: str = "lru", value: dict | None = None,
                 reserved_bytes: int = 0, copy_note: str = "", working_set: int = 1):
        """tier.read_expert(key) -> {(proj, name): tensor}; reserved_bytes: resident beside the slots (low-bit copies);
        working_set: experts one call computes together (1, or the top-k of the fused decode call)."""
        if policy not in EVICTION_POLICIES:
            raise MoecompressError(f"unknown eviction policy {policy!r}; allowed: {', '.join(EVICTION_POLICIES)}")
        self.layout, self.tier = layout, tier
        self.budget = int(budget)
        self.capacity = self.budget - reserved_bytes  # bytes the slots may use
        self.working_set = working_set
        key, largest, layer, self.working_bytes = _largest_set(layout.nbytes, working_set)
        self.min_budget = self.working_bytes + reserved_bytes
        if self.budget < self.min_budget:
            what = (f"the largest expert (MoE layer {key[0]}, expert {key[1]}: {largest} bytes, all projections)"
                    if working_set == 1 else
                    f"one token's {working_set} routed experts, computed together by the fused decode call (the "
                    f"{working_set} largest of MoE layer {layer}: {self.working_bytes} bytes, all projections)")
            raise MoecompressError(
                f"expert budget {self.budget} bytes is below the smallest workable budget {self.min_budget} bytes: "
                f"{what} must fit{copy_note}; give an expert budget of at least {self.min_budget} bytes")
        self.policy = EVICTION_POLICIES[policy](value)
        self.slots: dict[tuple[int, int], Slot] = {}
        self.inflight: set[tuple[int, int]] = set()
        self.used = 0  # bytes of the slots
        self.reserved = 0  # bytes of reads in flight
        self.peak = 0  # highest used + reserved + reserved_bytes seen
        self.extra = reserved_bytes
        self.copy_bytes = reserved_bytes  # resident low-bit copies (attach_store sets it when they are outside)
        self.cond = threading.Condition()
        self.counters = StoreCounters()

    # -- table operations (call with self.cond held) ----------------------------------------------------------------
    def _evict(self, key) -> None:
        slot = self.slots.pop(key)
        self.used -= slot.nbytes
        self.policy.on_evict(key)
        self.counters.evictions += 1
        evict = getattr(self.tier, "evict", None)
        if evict is not None:  # the GPU slot table: the expert's slots are free (once the compute queued passes)
            evict(key)
        recycle = getattr(self.tier, "recycle", None)
        if recycle is not None and slot.buffers:  # not in use (never evicted then): its buffers serve the next reads
            buffers, slot.buffers, slot.groups = slot.buffers, [], {}
            recycle(buffers, self.capacity - self.used)  # slots + kept buffers within the budget; the reads
            # being reserved (counted in `reserved`) take theirs from these

    def _reserve(self, nbytes: int, wait: bool, key=None) -> bool | None:
        """Make room for nbytes and reserve it; False (wait=False) when only pinned or busy slots could go; None when
        `key` became resident or in flight (read by another thread) while this one waited for room."""
        while self.used + self.reserved + nbytes > self.capacity:
            if key is not None and (key in self.slots or key in self.inflight):
                return None
            evictable = {k for k, s in self.slots.items() if not s.pinned and s.in_use == 0}
            victim = self.policy.victim(evictable)
            if victim is not None:
                self._evict(victim)
                continue
            if not wait:
                return False
            if not self.reserved and not any(s.in_use for s in self.slots.values()):
                raise MoecompressError(f"expert cache of {self.capacity} bytes cannot make room for {nbytes} bytes "
                                       f"(pinned: {self.counters.pinned_bytes} bytes)")
            self.cond.wait()  # a read in flight or a slot in use elsewhere will free its share
        self.reserved += nbytes
        self.peak = max(self.peak, self.used + self.reserved + self.extra)
        return True

    def _insert(self, key, slot: Slot) -> None:
        self.reserved -= slot.nbytes
        self.used += slot.nbytes
        self.slots[key] = slot
        self.policy.on_insert(key)
        self.inflight.discard(key)
        self.peak = max(self.peak, self.used + self.reserved + self.extra)
        self.cond.notify_all()

    # -- reading ----------------------------------------------------------------------------------------------------
    def _build(self, key) -> Slot:
        layer, e = key
        tensors = self.tier.read_expert(key)
        if getattr(self.tier, "slots", None) is not None:  # the GPU slot table: views of its pools; the groups only
            # when the per-expert path computes the expert (the slot path's launches read the pools themselves)
            return Slot(LazyGroups(lambda: self._groups(key, tensors)), self.layout.nbytes[key])
        buffers = {}  # storage address -> the whole buffer a row was read into (tiers.py: one per row)
        for t in tensors.values():
            if t.device.type == "cpu" and t._base is not None:
                storage = t.untyped_storage()
                buffers[storage.data_ptr()] = torch.empty(0, dtype=torch.uint8).set_(storage)
        return Slot(self._groups(key, tensors), self.layout.nbytes[key], buffers=list(buffers.values()))

    def _groups(self, key, tensors: dict) -> dict[str, PackedGroup]:
        """proj -> the single-expert PackedGroup over an expert's read tensors {(proj, name): tensor}."""
        layer, e = key
        groups = {}
        for proj, shape in self.layout.shapes[layer][e].items():
            g = PackedGroup((e,), shape.bits, shape.in_features, shape.out_features, self.layout.group_size,
                            self.layout.symmetric, shape.has_bias, shape.dtype, device="meta")
            for name in list(g._buffers):
                t = tensors.get((proj, name))
                if t is None:
                    raise MoecompressError(f"expert {e} of MoE layer {layer}: tensor {proj}.{name} missing in the file")
                g._buffers[name] = t.to(self.layout.device)
            g.prepare(self.layout.compute_dtype)
            groups[proj] = g
        return groups

    def fill(self, key, *, pinned: bool = False, prefetched: bool = False, wait: bool = True,
             after_copy: bool = False) -> bool:
        """Read `key` into a slot (no-op if resident or in flight); False when no room could be made (wait=False).
        after_copy: read because its low-bit copy computed a miss (counted as a copy fetch)."""
        with self.cond:
            if key in self.slots or key in self.inflight:
                return True
            reserved = self._reserve(self.layout.nbytes[key], wait, key)
            if not reserved:
                return reserved is None  # None: another thread read it while this one waited for room
            if key in self.slots or key in self.inflight:  # read by another thread during the last wait
                self.reserved -= self.layout.nbytes[key]
                self.cond.notify_all()
                return True
            self.inflight.add(key)
        try:
            slot = self._build(key)
        except BaseException:
            with self.cond:
                self.reserved -= self.layout.nbytes[key]
                self.inflight.discard(key)
                self.cond.notify_all()
            raise
        slot.pinned, slot.prefetched = pinned, prefetched
        with self.cond:
            self._insert(key, slot)
            if prefetched:
                self.counters.prefetches += 1
            if pinned:
                self.counters.pinned_bytes += slot.nbytes
            self.counters.copy_fetches += after_copy
        return True

    def begin_call(self, layer: int) -> None:
        """A forward call of MoE layer `layer` starts (the policy counts the layers' calls)."""
        with self.cond:
            self.policy.on_call(layer)

    def classify(self, requests: list[tuple[tuple[int, int], bool]], copy_inflight: bool = False,
                 copy_always: bool = False) -> list[str]:
        """For one layer call's experts [(key, may_substitute)]: "hit" (resident: marked in use now, so nothing
        evicts it before it is computed; release it after), "copy" (not resident and may be substituted: the low-bit
        copy computes it; also when its read is in flight if copy_inflight; with copy_always whenever it may be
        substituted, resident or not: the choice then depends on the requests alone) or "miss" (to be read:
        `wait_for` it).
        Counted here."""
        kinds = []
        with self.cond:
            for key, substitute in requests:
                slot = self.slots.get(key)
                if substitute and copy_always:
                    self.counters.substitutions += 1
                    kinds.append("copy")
                elif slot is not None:
                    self.counters.hits += 1
                    self._use(key, slot, late=False)
                    kinds.append("hit")
                elif substitute and (copy_inflight or key not in self.inflight):
                    self.counters.substitutions += 1
                    kinds.append("copy")
                else:
                    self.counters.misses += 1
                    kinds.append("miss")
        return kinds

    def account(self, layer: int, hits: list[int], misses: list[int]) -> None:
        """A layer call computed elsewhere (the GPU slot table, store/deferred.py): `hits` were resident when it ran,
        `misses` were not (computed from the slow tier). Counted, and the hits used (the policy's order)."""
        with self.cond:
            self.counters.hits += len(hits)
            self.counters.misses += len(misses)
            for e in hits:
                slot = self.slots.get((layer, e))
                if slot is not None:  # (evicted since it ran: nothing to update)
                    self._use((layer, e), slot, late=False)
                    slot.in_use -= 1
            self.cond.notify_all()

    def wait_for(self, key) -> Slot:
        """A missed expert's slot, marked in use: waits for its read in flight (the prefetcher's or a reader's), or
        reads it here; the wait is stall time."""
        start = time.perf_counter()
        while True:
            with self.cond:
                while key in self.inflight:
                    self.cond.wait()
                slot = self.slots.get(key)
                if slot is not None:
                    self.counters.stall_s += time.perf_counter() - start
                    return self._use(key, slot, late=True)
            self.fill(key)

    def _use(self, key, slot: Slot, late: bool) -> Slot:
        slot.in_use += 1
        self.policy.on_use(key)
        if slot.prefetched:
            slot.prefetched = False
            self.counters.useful_prefetches += 1
            self.counters.late_prefetches += late
        return slot

    def release(self, key) -> None:
        with self.cond:
            self.slots[key].in_use -= 1
            self.cond.notify_all()

    def end_layer(self, layer: int) -> None:
        """A layer's call is over: policies that keep nothing beyond the running layer drop its unpinned slots."""
        if self.policy.keep_after_layer:
            return
        with self.cond:
            for key in [k for k, s in self.slots.items() if k[0] == layer and not s.pinned and not s.in_use]:
                self._evict(key)
            self.cond.notify_all()

    def pin(self, value: dict, share: float) -> None:
        """Pin experts by value per byte (highest first) up to `share` of the slots' capacity, leaving room for the
        working set (what a call's misses need); read now, counted as bytes at load."""
        room = self.capacity - self.working_bytes
        limit, total = min(share * self.capacity, room), 0
        before = self.tier.bytes_read
        for key in sorted(value, key=lambda k: (-value[k], k)):
            nb = self.layout.nbytes[key]
            if total + nb > limit:
                continue
            total += nb
            self.fill(key, pinned=True)
        self.counters.bytes_at_load += self.tier.bytes_read - before

    def give_back_copies(self, nbytes: int) -> None:
        """Resident low-bit copies of `nbytes` were dropped (attach_store: the pinned experts' copies): their bytes go
        to the slots when the copies counted inside the budget."""
        with self.cond:
            self.copy_bytes -= nbytes
            if self.extra:
                self.extra -= nbytes
                self.capacity += nbytes
            self.cond.notify_all()

    def resident(self) -> set[tuple[int, int]]:
        with self.cond:
            return set(self.slots)

    def room(self) -> int:
        """Bytes the unpinned slots may use (what one call's experts must fit in)."""
        with self.cond:
            return self.capacity - self.counters.pinned_bytes


def _largest_set(nbytes: dict[tuple[int, int], int], size: int) -> tuple[tuple[int, int], int, int, int]:
    """(key of the largest expert, its bytes, the layer with the largest sum of `size` experts' bytes, that sum)."""
    key, largest = max(nbytes.items(), key=lambda kv: kv[1])
    per_layer: dict[int, list[int]] = {}
    for (layer, _), nb in nbytes.items():
        per_layer.setdefault(layer, []).append(nb)
    sums = {layer: sum(sorted(v, reverse=True)[:size]) for layer, v in per_layer.items()}
    worst = max(sums, key=lambda layer: (sums[layer], -layer))
    return key, largest, worst, sums[worst]
