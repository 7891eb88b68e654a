"""The expert store's configuration (StoreConfig) and the defaults chosen on the reference models."""
from __future__ import annotations

from dataclasses import dataclass

from moecompress.errors import MoecompressError
from moecompress.runtime.store.policies import EVICTION_POLICIES
from moecompress.runtime.store.prefetch import PREDICTORS

TIERS = ("file", "pinned")


@dataclass(frozen=True)
class StoreConfig:
    budget: int  # bytes of fast memory for experts: resident slots + reads in flight + low-bit copies
    policy: str = "lru"  # eviction: policies.EVICTION_POLICIES
    pin_share: float = 0.0  # share of the slots pinned at load by routing mass per byte (needs statistics)
    prefetch: str | None = None  # predictor: prefetch.PREDICTORS; None = no prefetch
    prefetch_width: int | None = None  # experts read ahead per layer call (None: the call's top-k)
    copy_threshold: float | None = None  # a miss routed below this weight runs on the low-bit copy (None: never;
    # above 1: every miss)
    # with copies: a miss computed by its copy also reads the full expert in the background for its next use, and a
    # miss whose read is in flight (a prefetch not done yet) is computed by its copy instead of waited for (HOBBIT)
    copy_fetch: bool = False
    # copy_threshold in units of the token's mean top-k routing weight (1 / top_k with renormalised weights), so one
    # value serves models with and without renormalisation and any top-k
    copy_relative: bool = False
    # a use under the threshold runs on its copy whether or not the full expert is resident or being read, and the
    # pinned experts (fixed at load) have no copies (dropped at attach): which uses run on copies then depends on the
    # routing alone, so outputs (Δppl) do not depend on read timing or load
    copy_deterministic: bool = False
    copies_in_budget: bool = True  # the resident low-bit copies count inside `budget` (else they come on top)
    domain: str | None = None  # pin by this domain's mass (the statistics' domains)
    tier: str = "file"  # "file": safetensors read bypassing the page cache; "pinned": pinned CPU memory -> GPU
    direct_io: bool = True  # O_DIRECT reads (else plain reads + posix_fadvise DONTNEED)
    read_threads: int = 4  # demand reads in flight at once
    overlap: bool = True  # on a miss compute the resident experts while the missing ones are read (else: wait, then
    # compute)
    # read ahead only experts the predictor scores at least this many times the uniform score 1 / experts (0: no
    # floor; relative, so one value serves 16 and 128 experts)
    prefetch_floor: float = 0.0
    # read ahead only the prediction ranks routed at least this often at the layer's next call (prefetch.RankPrecision)
    prefetch_min_precision: float = 0.0
    # router prefetch: after layer l's experts computed, predict layer l+1 again from the residual stream (layer l's
    # input stream + its output, under layer l+1's norm) and read what the first prediction missed
    prefetch_refine: bool = False
    # tier "pinned": experts in preallocated device slots that the CUDA layer kernels index (slots.py, slot_path.py):
    # decode calls in one batched launch per projection, no host sync, bit-equal to the resident layer (H200: 1.44-1.46x
    # the resident time per token at a 50 % budget with LRU / pin + LRU, against 3.46x on the per-expert path that
    # False keeps: eval/results/store_gpu.md)
    gpu_slots: bool = True
    # gpu_slots: each decode layer call as one CUDA graph replay (slot_graphs.py: captured per layer, shape and host
    # pass) instead of ~12 launches and copies from the decode thread; same outputs bit for bit (H200, 50 %, LRU and
    # pin + LRU: 1.11-1.19x the resident time per token against 1.30-1.41x with eager launches:
    # eval/results/store_gpu_s26.md)
    gpu_graphs: bool = True
    # gpu_graphs with prefetch="router": layer l+1's router prediction (and the refined one) computed inside layer l's
    # graph, its ranked ids written with the call's record; the bookkeeping thread enqueues the copies
    # (graph_predict.py). False: the scores run on the decode thread (~350 µs per layer call on the H200's host)
    graph_prediction: bool = True

    def __post_init__(self):
        if type(self.budget) is not int or self.budget < 0:
            raise MoecompressError(f"expert budget must be a whole number of bytes, got {self.budget!r}")
        if self.policy not in EVICTION_POLICIES:
            raise MoecompressError(f"unknown eviction policy {self.policy!r}; allowed: {', '.join(EVICTION_POLICIES)}")
        if self.prefetch is not None and self.prefetch not in PREDICTORS:
            raise MoecompressError(f"unknown prefetch predictor {self.prefetch!r}; allowed: {', '.join(PREDICTORS)}")
        if not 0.0 <= self.pin_share <= 1.0:
            raise MoecompressError(f"pin_share must be in 0..1, got {self.pin_share}")
        if self.tier not in TIERS:
            raise MoecompressError(f"unknown store tier {self.tier!r}; allowed: {', '.join(TIERS)}")
        if self.prefetch_floor < 0:
            raise MoecompressError(f"prefetch_floor (a multiple of the uniform score) must be >= 0, got "
                                   f"{self.prefetch_floor}")
        if not 0.0 <= self.prefetch_min_precision <= 1.0:
            raise MoecompressError(f"prefetch_min_precision must be in 0..1, got {self.prefetch_min_precision}")
        if self.copy_threshold is not None and self.copy_threshold < 0:
            raise MoecompressError(f"copy_threshold (a routing weight) must be >= 0 or None, got {self.copy_threshold}")
        if self.copy_relative and self.copy_threshold is None:
            raise MoecompressError("copy_relative sets copy_threshold's unit: give copy_threshold too")
        if self.copy_deterministic and self.copy_threshold is None:
            raise MoecompressError("copy_deterministic decides which uses run on the low-bit copies: give "
                                   "copy_threshold too")
        if self.copy_fetch and self.copy_threshold is None:
            raise MoecompressError("copy_fetch computes misses with the low-bit copies: give copy_threshold too "
                                   "(a routing weight; above 1: every miss)")
        if self.prefetch_width is not None and self.prefetch_width < 1:
            raise MoecompressError(f"prefetch_width must be at least 1, got {self.prefetch_width}")


def default_config(budget: int, has_stats: bool = True, copy_bits: int | None = None,
                   tier: str = "file") -> StoreConfig:
    """The defaults chosen on both reference models (eval/results/store.md); pinning only with statistics; with the
    checkpoint's (or bundle's) low-bit copies of `copy_bits`, misses under that width's DEFAULT_COPY_THRESHOLD run on
    them (DEFAULT_COPIES; the copies inside the budget). tier "pinned" (the GPU tier): GPU_DEFAULTS."""
    copies = {} if copy_bits is None else {**DEFAULT_COPIES, "copy_threshold": DEFAULT_COPY_THRESHOLD[copy_bits]}
    defaults = GPU_DEFAULTS if tier == "pinned" else DEFAULTS
    return StoreConfig(budget=int(budget), tier=tier, **defaults, pin_share=DEFAULT_PIN_SHARE if has_stats else 0.0,
                       **copies)


# Chosen by steady-state CPU time and bytes read on the 30B-dims model and hit rate on refmoe-qwen3 / refmoe-olmoe
# (eval/results/store_time.md, store_default50.md): reading every prediction cost 1.6x the resident CPU per token on
# untrained routing (20 % of the reads used); ranks below 0.5 precision are not read ahead; the second prediction
# from the residual stream lifts refmoe-qwen3's hit rate from 0.88-0.89 to 0.90-0.91.
DEFAULTS = {"policy": "lru", "prefetch": "router", "prefetch_refine": True, "prefetch_min_precision": 0.5}
DEFAULT_PIN_SHARE = 0.5
# The GPU tier (slot table, each layer call a graph replay): pin 0.5 (with statistics) + LRU + router prefetch +
# refine + precision >= 0.5, the prediction made inside each layer's graph (graph_predict.py). H200, 30B dims, 50 %
# (eval/results/store_gpu_s27.md): 1.27-1.30x the resident time per token (LRU 1.14-1.18x, the decode-thread
# prediction 1.46-1.57x in the same call); hit rate refmoe-qwen3 0.928 / refmoe-olmoe 0.981 (LRU 0.717 / 0.901): the
# one setting measured to meet both 50 % goals. At 25 % it is slower than LRU on the random-routing 30B-dims model
# (1.83x vs 1.31x) and far better on the trained ones (hit 0.838 / 0.890 vs 0.516 / 0.624).
GPU_DEFAULTS = {"policy": "lru", "prefetch": "router", "prefetch_refine": True, "prefetch_min_precision": 0.5,
                "gpu_slots": True, "gpu_graphs": True, "graph_prediction": True}
# Chosen on calibration text (eval/results/store_copies.md; bench_store.py --copies): per copy width, the largest
# relative threshold (x the token's mean top-k weight; 1000: every miss) whose Δppl stayed within 0.4 % on both
# reference models at a 50 % budget (RTN copies, 4-bit main experts); 4- and 8-bit copies: every miss (not measured).
# On evaluation text the 3-bit choice cost +0.8 % (refmoe-qwen3) / +1.2 % (refmoe-olmoe): calibration text of this
# size does not predict it (see the README).
DEFAULT_COPIES = {"copy_relative": True, "copy_fetch": True}
DEFAULT_COPY_THRESHOLD = {2: 0.25, 3: 1000.0, 4: 1000.0, 8: 1000.0}
