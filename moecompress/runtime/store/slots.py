"""The GPU tier's slot table: preallocated device slots per (projection, bit-width) and, per MoE layer, an index
expert -> slot position, so that the CUDA layer kernels (runtime/cuda: the pair path) compute whatever is resident in
one batched launch per projection, with no host sync.

- `HostExperts`: every expert of every layer, stacked as the loaded model held them (one PackedGroup per layer,
  projection and bit-width), in pinned CPU memory: the slow tier. The GPU reads it directly (pinned memory is mapped
  into the device's address space), so the same kernels compute an expert from host memory too.
- `SlotTable`: per (projection, bits, in, out) one PackedGroup of `capacity` slots on the device (the fast tier;
  capacity = what the budget holds), a free list, and per layer a resident flag [W] and slot positions [P, W] on the
  device (W = experts + 1, padded to 4). `read_expert` takes free slots, copies the expert's rows into them on a side
  stream, then writes its positions and sets its flag (the same stream: the flag is set once the rows are there);
  `evict` clears the flag on the compute stream and records an event that the next copy into those slots waits for
  (so no kernel enqueued before still reads them).
- `lookups(layer)`: per layer call, the flags are copied once (a snapshot: the side stream may set a flag meanwhile),
  and from the snapshot two lookups per projection: the device one (resident experts -> their slot positions, the
  others dropped) and the host one (the others -> their position in HostExperts, resident ones dropped). Each pair of
  the call is computed by exactly one of the two launches (store.gpu_layer), from the same packed bytes with the same
  kernel: the sum equals the fully resident layer bit for bit, whatever is resident, read or evicted meanwhile.

Index logic (positions, snapshots, partitions) is plain torch and runs on any device (tests run it on the CPU).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from moecompress.errors import MoecompressError
from moecompress.runtime.experts.packed_group import PackedGroup

PACKED = ("qweight", "scales", "zeros")
# the lookups' dtype: that of the resident layer's (ProjGroups._lookup_tensor), so the pair path's kernels compiled
# for the resident layer serve the slot table's plans too (Triton specialises on pointer dtypes)
LUT_DTYPE = torch.int64


POSITION_ALIGN = 16  # Triton specialises integer arguments on divisibility by 16 (and on == 1)


def _span(pool: PackedGroup) -> int:
    """Positions a device pool claims in a layer's lookups: its capacity rounded up to POSITION_ALIGN (at least one)."""
    return max(1, -(-len(pool.experts) // POSITION_ALIGN)) * POSITION_ALIGN


def _width(num_experts: int) -> int:
    """Entries of a lookup: experts + the dropped entry, padded to 4 (16-byte aligned rows)."""
    return -(-(num_experts + 1) // 4) * 4


def _stacked(group: PackedGroup, device, pin: bool) -> PackedGroup:
    """A copy of `group` (same experts and slots) with its tensors on `device` (pinned when on the CPU and pin)."""
    g = PackedGroup(group.experts, group.bits, group.in_features, group.out_features, group.group_size,
                    group.symmetric, False, torch.bfloat16, device="meta")
    tensors = group.state_dict()  # the format's packing (a CPU group converted for its int4 kernel gives it back)
    for name in list(g._buffers):
        t = tensors[name].to(device)
        g._buffers[name] = t.pin_memory() if pin and t.device.type == "cpu" else t
    return g


def slot_table_supported(modules: dict) -> bool:
    """Whether the slot table takes these experts modules: packed 2/3/4/8-bit groups without bias (the pair path's)."""
    return all(isinstance(g, PackedGroup) is False or (g.bits in (2, 3, 4, 8) and "bias" not in g._buffers)
               for m in modules.values() for g in m.modules()) and all(
        not getattr(m, "has_bias", False) for m in modules.values())


@dataclass(frozen=True)
class PoolKey:
    proj: str
    bits: int
    in_features: int
    out_features: int


class HostExperts:
    """Every layer's loaded groups (before attach drops them), copied to (pinned) host memory, in the layer's own
    position order: groups[layer][proj] = [(group, first position)], lookup[layer][proj] = expert -> position."""

    def __init__(self, modules: dict, pin: bool = True):
        self.groups: dict[int, dict[str, list]] = {}
        self.lookup: dict[int, dict[str, list[int]]] = {}
        for layer, module in modules.items():
            self.groups[layer], self.lookup[layer] = {}, {}
            for proj in module.proj_names:
                pg, pos, out = getattr(module, proj), 0, []
                for group in pg.children():
                    if group.bits == 16 or "bias" in group._buffers:
                        raise MoecompressError("the GPU slot table takes packed 2/3/4/8-bit experts without bias; "
                                               "use StoreConfig(gpu_slots=False)")
                    if group.experts:
                        out.append((_stacked(group, "cpu", pin), pos))
                    pos += len(group.experts)
                self.groups[layer][proj] = out
                self.lookup[layer][proj] = list(pg._lookup)
        self.nbytes = sum(t.numel() * t.element_size() for by in self.groups.values() for gs in by.values()
                          for g, _ in gs for t in g.buffers())

    def where(self, layer: int, proj: str, expert: int) -> tuple[PackedGroup, int]:
        """(host group, row) of an expert's projection."""
        pos = self.lookup[layer][proj][expert]
        for group, pos0 in self.groups[layer][proj]:
            if pos0 <= pos < pos0 + len(group.experts):
                return group, pos - pos0
        raise MoecompressError(f"expert {expert} of MoE layer {layer} is not held here")


class SlotTable:
    def __init__(self, host: HostExperts, nbytes: dict, capacity_bytes: int, device, num_experts: dict[int, int]):
        """nbytes: (layer, expert) -> resident bytes (all projections); capacity_bytes: what the slots may hold;
        num_experts: layer -> experts of the model's layer (the routing's ids)."""
        self.host, self.device = host, torch.device(device)
        self.num_experts = num_experts
        members: dict[PoolKey, list[int]] = {}  # pool -> resident bytes of the experts that would use it
        self.keys: dict[tuple[int, str], dict[int, PoolKey]] = {}  # (layer, proj) -> bits -> pool
        for layer, by_proj in host.groups.items():
            for proj, groups in by_proj.items():
                for group, _ in groups:
                    key = PoolKey(proj, group.bits, group.in_features, group.out_features)
                    self.keys.setdefault((layer, proj), {})[group.bits] = key
                    members.setdefault(key, []).extend(nbytes[(layer, e)] for e in group.experts
                                                       if (layer, e) in nbytes)
        self.pools: dict[PoolKey, PackedGroup] = {}
        self.free: dict[PoolKey, list[int]] = {}
        self.free_after: dict[tuple[PoolKey, int], object] = {}  # slot -> event its next copy waits for
        for key, sizes in members.items():
            capacity = min(len(sizes), max(capacity_bytes, 0) // max(min(sizes), 1))
            template = host.groups[next(l for (l, p), b in self.keys.items() if p == key.proj and
                                        b.get(key.bits) == key)][key.proj]
            first = next(g for g, _ in template if g.bits == key.bits)
            self.pools[key] = PackedGroup(tuple(range(capacity)), key.bits, key.in_features, key.out_features,
                                          first.group_size, first.symmetric, False, torch.bfloat16, device=self.device)
            self.free[key] = list(range(capacity - 1, -1, -1))
        self.device_bytes = sum(t.numel() * t.element_size() for p in self.pools.values() for t in p.buffers())
        # per layer: resident flags [W] (bool), slot positions [P, W] (LUT_DTYPE), snapshots and the two lookups
        self.resident, self.positions, self.snap, self.lut_device, self.lut_host, self.host_lut = {}, {}, {}, {}, {}, {}
        self.drop_device, self.drop_host = {}, {}
        for layer, by_proj in host.groups.items():
            w, projs = _width(num_experts[layer]), list(by_proj)
            self.resident[layer] = torch.zeros(w, dtype=torch.bool, device=self.device)
            self.snap[layer] = torch.zeros(w, dtype=torch.bool, device=self.device)
            self.positions[layer] = torch.zeros(len(projs), w, dtype=LUT_DTYPE, device=self.device)
            self.lut_device[layer] = torch.zeros(len(projs), w, dtype=LUT_DTYPE, device=self.device)
            self.lut_host[layer] = torch.zeros(len(projs), w, dtype=LUT_DTYPE, device=self.device)
            lut = [host.lookup[layer][p] + [host.lookup[layer][p][-1]] * (w - len(host.lookup[layer][p]))
                   for p in projs]
            self.host_lut[layer] = torch.tensor(lut, dtype=LUT_DTYPE, device=self.device)
            self.drop_host[layer] = torch.tensor([[lut[i][-1]] for i in range(len(projs))], dtype=LUT_DTYPE,
                                                 device=self.device)
            self.drop_device[layer] = torch.tensor([[self._size(layer, p)] for p in projs], dtype=LUT_DTYPE,
                                                   device=self.device)
        self.taken: dict[tuple[int, int], dict[str, tuple[PoolKey, int]]] = {}  # expert -> its slots
        self.unmaps = dict.fromkeys(host.groups, 0)  # per layer: evictions so far (a full snapshot stays full until one)
        self.lock = threading.Lock()  # enqueue of a layer call's snapshot + launches vs an eviction's flag write
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.compute = torch.cuda.current_stream(self.device) if self.cuda else None
        self.bytes_read, self._copy_events, self._busy = 0, [], 0.0
        self.ready: dict[tuple[int, int], object] = {}  # expert -> event: its rows are in its slots
        self.evicted: dict[tuple[int, int], object] = {}  # expert -> event after its eviction (its next read waits)
        self._source_cache: dict[tuple[int, int], list] = {}  # expert -> where its rows are and go (_sources)

    # -- positions ---------------------------------------------------------------------------------------------------
    def device_groups(self, layer: int, proj: str) -> list[tuple[PackedGroup, int]]:
        """The pools a layer's projection computes from, bits in order, with their first positions (each pool spans
        `_span` positions: its capacity rounded up to POSITION_ALIGN)."""
        out, pos = [], 0
        for bits in sorted(self.keys[(layer, proj)]):
            pool = self.pools[self.keys[(layer, proj)][bits]]
            out.append((pool, pos))
            pos += _span(pool)
        return out

    def kernel_groups(self, layer: int, proj: str) -> list[tuple[SimpleNamespace, int]]:
        """device_groups as the pair path's plans take them: each pool claims its whole span of positions (the
        positions past its capacity never appear in a lookup), so every group bound the kernels get is a multiple of
        POSITION_ALIGN, whatever the budget: the same Triton specialisation at every budget (and, for a model of one
        width and a multiple of 16 experts, the resident layer's own compiled kernels)."""
        return [(SimpleNamespace(bits=g.bits, experts=range(_span(g)), symmetric=g.symmetric, group_size=g.group_size,
                                 in_features=g.in_features, out_features=g.out_features, qweight=g.qweight,
                                 scales=g.scales, zeros=g._buffers.get("zeros")), pos0)
                for g, pos0 in self.device_groups(layer, proj)]

    def _size(self, layer: int, proj: str) -> int:
        """The drop position of a projection's device lookup: past every pool's span."""
        return sum(_span(g) for g, _ in self.device_groups(layer, proj))

    def _sources(self, key) -> list[tuple[int, str, PackedGroup, int, PoolKey, int]]:
        """Per projection of expert `key`: (index, proj, host group, row, pool, the pool's first position), cached
        (static: a read looks it up instead of scanning the groups again)."""
        out = self._source_cache.get(key)
        if out is None:
            layer, e = key
            out = []
            for i, proj in enumerate(self.host.groups[layer]):
                group, row = self.host.where(layer, proj, e)
                pool_key = self.keys[(layer, proj)][group.bits]
                pos0 = next(p0 for g, p0 in self.device_groups(layer, proj) if g is self.pools[pool_key])
                out.append((i, proj, group, row, pool_key, pos0))
            self._source_cache[key] = out
        return out

    # -- filling and evicting ----------------------------------------------------------------------------------------
    def read_expert(self, key) -> dict:
        """Copy expert `key` into free slots (side stream on CUDA) -> {(proj, name): its slot rows [1, ...]}; its
        flag is set on the device once the rows are there (the same stream)."""
        layer, e = key
        sources = self._sources(key)
        with self.lock:
            taken = {}
            for _, proj, _, _, pool_key, _ in sources:
                if not self.free[pool_key]:
                    for k, s in taken.values():
                        self.free[k].append(s)
                    raise MoecompressError(f"the GPU slot table has no free slot for {pool_key} (capacity "
                                           f"{len(self.pools[pool_key].experts)}); this is a bug in the budget")
                taken[proj] = (pool_key, self.free[pool_key].pop())
            self.taken[key] = taken
            # read again after an eviction: the side stream sets its flag only after the compute stream has cleared
            # it (else the late clear would leave a resident expert flagged missing: counted as a miss at every use)
            evicted = self.evicted.pop(key, None)
        out, nbytes = {}, 0
        stream = torch.cuda.stream(self.side) if self.cuda else _Null()
        with stream:
            start = done = None
            if self.cuda:
                for event in [self.free_after.pop(t, None) for t in taken.values()] + [evicted]:
                    if event is not None:
                        self.side.wait_event(event)
                start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self.side)
            for i, proj, group, row, pool_key, pos0 in sources:
                slot = taken[proj][1]
                pool = self.pools[pool_key]
                for name in PACKED:
                    src = group._buffers.get(name)
                    if src is None:
                        continue
                    dst = pool._buffers[name][slot:slot + 1]
                    dst.copy_(src[row:row + 1], non_blocking=True)
                    out[(proj, name)] = dst
                    nbytes += src[0].numel() * src.element_size()
                self.positions[layer][i, e:e + 1].fill_(pos0 + slot)
            self.resident[layer][e:e + 1].fill_(True)
            if self.cuda:
                done.record(self.side)
                self.ready[key] = done
        with self.lock:
            self.bytes_read += nbytes
            if start is not None:
                self._copy_events.append((start, done))
        return out

    def evict(self, key) -> None:
        """Expert `key` leaves its slots: its flag cleared on the compute stream; the slots' next copy waits until
        everything enqueued before has run."""
        layer, e = key
        with self.lock:
            taken = self.taken.pop(key)
            ready = self.ready.pop(key, None)
            self.unmaps[layer] += 1
            stream = torch.cuda.stream(self.compute) if self.cuda else _Null()
            with stream:
                if ready is not None:  # its flag may still be set by its copy: clear it after that (a GPU-side wait)
                    self.compute.wait_event(ready)
                self.resident[layer][e:e + 1].fill_(False)
                event = None
                if self.cuda:
                    event = torch.cuda.Event()
                    event.record(self.compute)
            for pool_key, slot in taken.values():
                if event is not None:
                    self.free_after[(pool_key, slot)] = event
                self.free[pool_key].append(slot)
            if event is not None:
                self.evicted[key] = event

    def wait_ready(self, key) -> None:
        """The current stream waits until expert `key`'s rows are in its slots (the per-expert path's hits)."""
        event = self.ready.get(key)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    @property
    def busy_s(self) -> float:
        """Seconds the side stream spent copying (waits for the copies enqueued so far)."""
        with self.lock:
            events, self._copy_events = self._copy_events, []
        for start, done in events:
            done.synchronize()
            self._busy += start.elapsed_time(done) / 1000
        return self._busy

    # -- a layer call's lookups --------------------------------------------------------------------------------------
    def lookups(self, layer: int) -> None:
        """Snapshot the flags, then both lookups from it (on the current stream; call with `lock` held)."""
        snap = self.snap[layer]
        snap.copy_(self.resident[layer])
        torch.where(snap[None], self.positions[layer], self.drop_device[layer], out=self.lut_device[layer])
        torch.where(snap[None], self.drop_host[layer], self.host_lut[layer], out=self.lut_host[layer])


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
