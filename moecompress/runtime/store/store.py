"""ExpertStore: the experts of a loaded model computed from a budgeted cache (cache.py) over a slow tier (tiers.py),
with pinning, prefetch (prefetch.py) and optional low-bit copies. Each PackedExperts module calls `forward` through
its `expert_store` hook (a `LayerView`); routing, gate and activation stay the model's own.

Three computes, the same as the fully resident PackedExperts would take for the call where it can: decode steps that
the resident layer runs as cpu_moe's fused C++ call run that call over the slots (fused_path.py), decode steps on the
GPU tier's slot table the CUDA pair path's kernels (slot_path.py, below). Everything else (prefill, float32 without
int8 activations, the GPU tier without the slot table) runs one expert at a time with the per-group kernels, the demand reads overlapping the hits'
compute (on CUDA a token's experts are summed in k order: no atomics, the same outputs at every budget; the resident
layer there takes the fused CUDA kernels, so bf16 outputs differ from it by rounding).

GPU tier with the slot table (StoreConfig(tier="pinned", gpu_slots=True)): decode calls that the resident layer would
run on the CUDA pair path take slot_path.py (the same kernels over device slots + the pinned host copy, bit for bit,
no host sync). Other calls there (prefill, copies, overlap=False) take the per-expert path over the same slots.

Low-bit copies (optional, resident): a miss routed below `copy_threshold` (a routing weight, or with copy_relative
a multiple of the token's mean top-k weight) is computed by its copy. With copy_fetch (HOBBIT) its full expert is
also read in the background for the next use, and a miss whose read is still in flight is not waited for; without
it nothing is read for it (the next use misses again), and a read in flight is waited for. With copy_deterministic
every use under the threshold runs on its copy, resident or not, and pinned experts keep no copies: which uses run on
copies then depends on the routing alone (Δppl reproducible, independent of read timing and load).

Exactness: every routed expert is computed from its own packed rows with the same kernels, row order and summation
order as the fully resident PackedExperts, so with exact settings (no `copy_threshold`) outputs equal the fully
resident model's bit for bit, whatever the budget, policy or prediction. One condition on the per-expert path, from
the CPU kernels' threading: the prefill tile kernel splits an expert into 128-row strips run in parallel, each strip's at::mm then
single-threaded; a call with a single strip runs inline and its at::mm may use several threads (another summation
order). Experts are computed one at a time here, so a projection with at most 128 outputs (toy shapes only; every
real MoE has more) can differ in the last float32 bits unless torch runs one thread.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from moecompress.runtime.store.cache import ExpertCache
from moecompress.runtime.store.config import (DEFAULT_COPIES, DEFAULT_COPY_THRESHOLD, DEFAULT_PIN_SHARE,  # noqa: F401
                                              DEFAULTS, TIERS, StoreConfig, default_config)  # (re-exported)
from moecompress.runtime.store.fused_path import FusedPath
from moecompress.runtime.store.gpu_layer import SlotLayers
from moecompress.runtime.store.prefetch import Prefetcher, RankPrecision
from moecompress.runtime.store.slot_path import SlotPath


class ExpertStore:
    def __init__(self, cache: ExpertCache, config: StoreConfig, predictor=None, copies: dict | None = None):
        """copies: layer -> proj -> PackedGroup holding every expert's low-bit copy (slot e = expert e)."""
        self.cache, self.config, self.predictor = cache, config, predictor
        self.copies = copies or {}
        self.prefetcher = Prefetcher(cache) if predictor is not None else None
        self.precision = RankPrecision(config.prefetch_min_precision) if predictor is not None else None
        self.refine_precision = RankPrecision(config.prefetch_min_precision)  # of the second prediction
        self.residuals: dict[int, torch.Tensor] = {}  # MoE layer -> the stream entering its block (attach's hooks)
        self.hooks: list = []  # handles of those hooks (removed by close)
        # demand reads of one layer call run in parallel, beside the compute of its resident experts
        self._readers = ThreadPoolExecutor(max_workers=config.read_threads, thread_name_prefix="moecompress-read")
        self._baseline = cache.tier.bytes_read
        self._busy_baseline = getattr(cache.tier, "busy_s", None) or 0.0
        self._calls = 0  # layer calls so far
        self.fused = FusedPath(self)  # the CPU's fused decode call over the slots (fused_path.py)
        self.first_layer = min(layer for layer, _ in cache.layout.nbytes)  # tokens are counted there
        table = getattr(cache.tier, "slots", None)  # the GPU slot table (attach.py), or None
        self.slot_path = SlotPath(self, SlotLayers(table)) if table is not None else None

    # -- the experts module's compute -------------------------------------------------------------------------------
    def forward(self, layer: int, module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """PackedExperts.forward with the experts taken from the cache: the fused decode call where the fully
        resident layer would take it (store/fused.py), else one expert (all projections) at a time."""
        if layer == self.first_layer:
            self.cache.counters.tokens += top_k_index.shape[0]
        path = self.slot_path
        if path is not None and path.takes(layer, module, hidden, top_k_index):
            try:
                return path.forward(layer, module, hidden, top_k_index, top_k_weights)
            except Exception as exc:  # noqa: BLE001
                if path.ran:
                    raise
                # the slot path failed at its first call (kernels or pinned-memory access on this machine): the
                # per-expert path over the same slots computes instead; counters() reports why
                path.error = f"{type(exc).__name__}: {exc}"
        self.cache.begin_call(layer)
        if self.prefetcher is not None:
            self.prefetcher.begin_call()
            routed = set(top_k_index.reshape(-1).tolist())
            self.precision.routed(layer, routed)
            self.refine_precision.routed(layer, routed)
            self._predict(layer, hidden, top_k_index, top_k_weights)
        out = self._compute(layer, module, hidden, top_k_index, top_k_weights)
        residual = self.residuals.pop(layer, None)
        if residual is not None and self.prefetcher is not None:
            self._refine(layer, residual.reshape(-1, residual.shape[-1]) + out.to(residual.dtype), top_k_index.shape[1])
        return out

    def _compute(self, layer: int, module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = top_k_index.shape
        settings = self.fused.settings(layer, module, hidden)
        if settings is not None:
            return self.fused.forward(layer, module, settings, hidden, top_k_index, top_k_weights)
        flat = top_k_index.reshape(-1)  # [S], S = T * K
        flat_w = top_k_weights.reshape(-1)
        first_name, down_name = module.proj_names
        first, down = getattr(module, first_name), getattr(module, down_name)
        order, counts = first.route(flat)  # [R] computed pairs sorted by first's positions
        positions = first.positions()
        threshold = self.config.copy_threshold
        copies = self.copies.get(layer)
        plan, row = [], 0  # (expert, its pair indices), in position order
        for pos, c in enumerate(counts):
            if c:
                plan.append((positions[pos], order[row:row + c]))
                row += c
        copy_w = self._copy_weights(top_k_weights).reshape(-1)
        may_copy = [copies is not None and threshold is not None and e in copies[first_name].slot
                    and float(copy_w[rows].max()) < threshold for e, rows in plan]
        kinds = self.cache.classify([((layer, e), sub) for (e, _), sub in zip(plan, may_copy)],
                                    copy_inflight=self.config.copy_fetch,
                                    copy_always=self.config.copy_deterministic)
        self._calls += 1
        futures = self._submit_reads(layer, [e for e, _ in plan], kinds)  # read while the hits compute
        if not self.config.overlap:  # every miss read first, then the compute (the A/B of bench_store.py --tier gpu)
            self._wait_reads(layer, [e for e, _ in plan], kinds, futures)
        pieces = [None] * len(plan)
        for i in sorted(range(len(plan)), key=lambda i: kinds[i] == "miss"):  # hits and copies first
            e, rows = plan[i]
            x = hidden[rows // top_k]
            if kinds[i] == "copy":  # the resident low-bit copy computes it
                pieces[i] = self._expert(module, x, copies[first_name], copies[down_name],
                                         copies[first_name].slot[e], len(rows))
                continue
            slot = self.cache.slots[(layer, e)] if kinds[i] == "hit" else self.cache.wait_for((layer, e))
            ready = getattr(self.cache.tier, "wait_ready", None)
            if ready is not None:  # the GPU slot table: the compute stream waits for the slot's copy, if any
                ready((layer, e))
            try:
                pieces[i] = self._expert(module, x, slot.groups[first_name], slot.groups[down_name], 0, len(rows))
            finally:
                self.cache.release((layer, e))
        self.cache.end_layer(layer)
        if not pieces:
            return torch.zeros_like(hidden)
        y = torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # [R, H] in `order`
        if not module._same_order:  # the fully resident module sums in down's position order: so do we
            down_order, _ = down.route(flat)
            row_of_pair = torch.empty_like(flat)
            row_of_pair[order] = torch.arange(order.shape[0], device=flat.device)
            y, order = y[row_of_pair[down_order]], down_order
        weights = flat_w[order]
        y = y.float() * weights.float().unsqueeze(-1)
        if y.is_cuda:  # index_add_ adds with atomics there (any order): sum each token's pairs in k order instead
            return _sum_in_k_order(y, order, num_tokens, top_k).to(hidden.dtype)
        out = torch.zeros(num_tokens, y.shape[-1], dtype=torch.float32, device=y.device).index_add_(0, order // top_k, y)
        return out.to(hidden.dtype)

    def _copy_weights(self, top_k_weights: torch.Tensor) -> torch.Tensor:
        """[T, K] routing weights in copy_threshold's unit (float32): as routed, or over the token's mean."""
        w = top_k_weights.float()
        return w / w.mean(-1, keepdim=True).clamp(min=1e-30) if self.config.copy_relative else w

    def _submit_reads(self, layer: int, experts: list[int], kinds: list[str]) -> list:
        """Misses to the reader threads (this call waits for them; -> their futures); with copy_fetch, the experts
        computed by their copies too, for their next use (nobody waits for those; dropped when only pinned or busy
        slots could make room)."""
        futures = []
        for e, kind in zip(experts, kinds):
            if kind == "miss":
                futures.append(self._readers.submit(self._read_ahead, self._calls, (layer, e)))
        if self.config.copy_fetch:
            for e, kind in zip(experts, kinds):
                if kind == "copy":
                    self._readers.submit(self._fetch_copied, (layer, e))
        return futures

    def _wait_reads(self, layer: int, experts: list[int], kinds: list[str], futures: list) -> None:
        """overlap=False on the per-expert path: wait until every miss of the call is read, then compute. Only where
        the call's experts fit in the unpinned room together (else a read would wait for room that the call's own
        experts hold: the call then computes as with the overlap). The wait counts as stall time."""
        nbytes = self.cache.layout.nbytes
        if sum(nbytes[(layer, e)] for e in experts) > self.cache.room():
            return
        start = time.perf_counter()
        for f in futures:
            f.result()
        with self.cache.cond:
            self.cache.counters.stall_s += time.perf_counter() - start

    def _fetch_copied(self, key) -> None:
        self.cache.fill(key, wait=False, after_copy=True)

    def _read_ahead(self, call: int, key) -> None:
        if call == self._calls:  # a read still queued when its layer call is over is dropped
            self.cache.fill(key)

    @staticmethod
    def _expert(module, x: torch.Tensor, first, down, slot: int, rows: int) -> torch.Tensor:
        counts = [0] * len(first.experts)
        counts[slot] = rows
        h = first.linear_sorted(x, counts)
        h = module._gate_fn(module, h) if module.has_gate else module.act_fn(h)
        y = down.linear_sorted(h, counts)
        return module.post_expert_norm(y) if module.has_post_expert_norm else y

    def _predict(self, layer: int, hidden, top_k_index, top_k_weights) -> None:
        scores = self.predictor.scores(layer, hidden, top_k_index, top_k_weights)
        self._request(layer, scores, top_k_index.shape[1])

    def _request(self, layer: int, scores, top_k: int) -> None:
        """Read ahead layer l+1's experts ranked by `scores` (the first prediction) that passed the precision gate."""
        if scores is None or layer + 1 >= len(self.cache.layout.shapes):
            return
        width = min(self.config.prefetch_width or top_k, scores.shape[0])
        top = torch.topk(scores.float().cpu(), width)
        self._request_ranked(layer, top.indices.tolist(), top.values.tolist(), float(scores.sum()) / scores.shape[0],
                             self.precision)

    def _refine(self, layer: int, residual: torch.Tensor, top_k: int) -> None:
        """The second prediction for layer l+1, once layer l's output is known (config.prefetch_refine)."""
        self._request_refined(layer, self.predictor.residual_scores(layer, residual), top_k)

    def _request_refined(self, layer: int, scores, top_k: int) -> None:
        if scores is None:
            return
        width = min(self.config.prefetch_width or top_k, scores.shape[0])
        self._request_ranked(layer, torch.topk(scores, width).indices.tolist(), None, None, self.refine_precision)

    def _request_ranked(self, layer: int, ranked: list[int], values: list[float] | None, mean: float | None,
                        precision: RankPrecision, inline: bool = False) -> None:
        """Read ahead layer l+1's experts `ranked` (best first; `values` their scores, `mean` the mean score over
        all experts: the unit of prefetch_floor; None: no floor) that pass the floor and `precision`'s gate. inline
        (the GPU tier's bookkeeping thread): fill from this thread (the slot table's copies are asynchronous),
        stopping at the first that finds no room; else hand them to the prefetch threads."""
        if layer + 1 >= len(self.cache.layout.shapes):
            return
        if self.config.prefetch_floor > 0 and values is not None:
            floor = self.config.prefetch_floor * mean
            ranked = [e for e, v in zip(ranked, values) if v >= floor]
        held = self.cache.layout.shapes[layer + 1]
        ranked = [e for e in precision.predicted(layer + 1, ranked) if e in held]
        if not ranked:
            return
        if not inline:
            self.prefetcher.request(layer + 1, ranked)
            return
        for e in ranked:
            if not self.cache.fill((layer + 1, e), prefetched=True, wait=False):
                break

    # -- counters and life cycle ------------------------------------------------------------------------------------
    def counters(self) -> dict:
        if self.slot_path is not None:
            self.slot_path.drain()
        c = self.cache.counters
        c.bytes_fetched = self.cache.tier.bytes_read - self._baseline
        busy = getattr(self.cache.tier, "busy_s", None)  # the GPU tier: seconds its side stream spent copying
        c.tier_busy_s = None if busy is None else busy - self._busy_baseline
        return {**c.summary(), "budget": self.cache.budget, "min_budget": self.cache.min_budget,
                "peak_bytes": self.cache.peak, "copy_bytes": self.cache.copy_bytes,
                "copies_in_budget": self.config.copies_in_budget, "background_cpu_s": self.background_cpu_s(),
                "slot_device_bytes": None if self.slot_path is None else self.slot_path.table.device_bytes,
                "slot_error": None if self.slot_path is None else self.slot_path.error,
                "graph_error": None if self.slot_path is None else self.slot_path.graph_error,
                "graph_waits": None if self.slot_path is None else sum(
                    g.waits for g in getattr(self.slot_path.layers, "graphs", {}).values())}

    def background_cpu_s(self) -> float:
        """CPU seconds the store's own threads (demand readers, prefetchers, the slot path's bookkeeping) have used so
        far: with the compute thread's time.thread_time(), the store's whole CPU cost, independent of the machine's
        load."""
        threads = list(getattr(self._readers, "_threads", ()))
        threads += self.prefetcher.threads if self.prefetcher is not None else []
        total = 0.0
        for t in threads:
            if t.ident is not None and t.is_alive() and hasattr(time, "pthread_getcpuclockid"):
                try:
                    total += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
                except OSError:  # the thread ended between the check and the call
                    pass
        book = None if self.slot_path is None else self.slot_path.book
        return total + (book.cpu_s if book is not None else 0.0)

    def reset_counters(self) -> None:
        """Zero the per-run counters (pinned bytes and bytes at load stay)."""
        if self.slot_path is not None:
            self.slot_path.drain()
        with self.cache.cond:
            old = self.cache.counters
            self.cache.counters = type(old)(pinned_bytes=old.pinned_bytes, bytes_at_load=old.bytes_at_load)
            self._baseline = self.cache.tier.bytes_read
            self._busy_baseline = getattr(self.cache.tier, "busy_s", None) or 0.0

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        if self.slot_path is not None:
            self.slot_path.close()
        self._readers.shutdown(wait=True)
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        close = getattr(self.cache.tier, "close", None)
        if close:
            close()


def _sum_in_k_order(y: torch.Tensor, order: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """y [R, H] float32 weighted rows of pairs `order` (t * K + k) -> [T, H]: per token out = 0, then += row k for
    k = 0..K-1 (pairs not computed add nothing). Deterministic on CUDA, so the store's GPU outputs do not depend on
    the budget, the policy or the run."""
    rows = torch.zeros(num_tokens * top_k, y.shape[-1], dtype=torch.float32, device=y.device)
    rows[order] = y
    rows = rows.view(num_tokens, top_k, -1)
    out = torch.zeros(num_tokens, y.shape[-1], dtype=torch.float32, device=y.device)
    for k in range(top_k):
        out = out + rows[:, k]
    return out


class LayerView:
    """What a PackedExperts module holds as its `expert_store`: the store and its MoE ordinal."""

    def __init__(self, store: ExpertStore, layer: int):
        self.store, self.layer = store, layer

    def forward(self, module, hidden, top_k_index, top_k_weights):
        return self.store.forward(self.layer, module, hidden, top_k_index, top_k_weights)
