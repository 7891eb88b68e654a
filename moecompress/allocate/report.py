"""What an allocation achieved, as a JSON-ready dict to store next to the BitPlan."""
from __future__ import annotations

from collections import defaultdict

from moecompress.allocate.allocation import Allocation
from moecompress.format.sizes import BF16_BYTES


def _avg_bits(pairs) -> dict:
    """avg_bits: nominal (mean bits per weight, metadata not counted); stored_bits: stored bytes (scales and
    zero-points included) x 8 per weight; of (item, bits) pairs."""
    numel = sum(it.numel for it, _ in pairs)
    nbytes = sum(it.bytes[it.bits.index(b)] for it, b in pairs)
    return {
        "numel": numel,
        "bytes": nbytes,
        "avg_bits": sum(it.numel * b for it, b in pairs) / numel,
        "stored_bits": nbytes * 8 / numel,
    }


def allocation_report(allocation: Allocation) -> dict:
    """Histogram of bits, predicted damage, bits per weight two ways, bytes against bf16, mean bits per MoE layer.

    `avg_bits` (nominal) and `stored_bits` (metadata included), overall, and `avg_bits` per layer, are over the
    routed-expert items (`by_kind` has them per kind); `bytes`, `bf16_bytes` and the histogram cover every item.
    `uniform` gives, for each bit-width every item can take, the damage and bytes of putting every item there: the
    baselines the allocation should beat at equal bytes. `copy_bytes` are the experts' low-bit copies (not in
    `bytes`, `avg_bits` or `stored_bits`); `total_bytes` = bytes + copy_bytes <= budget_bytes.
    """
    pairs = list(zip(allocation.items, allocation.bits))
    everything = _avg_bits(pairs)
    bf16 = everything["numel"] * BF16_BYTES
    hist = defaultdict(lambda: {"items": 0, "numel": 0})
    per_layer = defaultdict(list)
    by_kind = defaultdict(list)
    for it, b in pairs:
        hist[b]["items"] += 1
        hist[b]["numel"] += it.numel
        by_kind[it.kind].append((it, b))
        if it.kind == "expert":
            per_layer[it.layer].append((it, b))
    common = set.intersection(*(set(it.bits) for it in allocation.items))
    return {
        "solver": allocation.solver,
        "damage": allocation.damage,
        "lower_bound": allocation.lower_bound,
        "gap": allocation.gap,
        "budget_bytes": allocation.budget_bytes,
        "bytes": allocation.bytes,
        "copy_bytes": allocation.copy_bytes,
        "total_bytes": allocation.bytes + allocation.copy_bytes,
        "bf16_bytes": bf16,
        "fraction_of_bf16": allocation.bytes / bf16,
        **{k: v for k, v in _avg_bits(by_kind.get("expert") or pairs).items() if k in ("avg_bits", "stored_bits")},
        "histogram": {
            b: {"items": h["items"], "weight_share": h["numel"] / everything["numel"]} for b, h in sorted(hist.items())
        },
        "per_layer_avg_bits": {layer: _avg_bits(p)["avg_bits"] for layer, p in sorted(per_layer.items())},
        "by_kind": {kind: _avg_bits(p) for kind, p in sorted(by_kind.items())},
        "uniform": {
            b: {
                "damage": sum(it.damage[it.bits.index(b)] for it in allocation.items),
                "bytes": sum(it.bytes[it.bits.index(b)] for it in allocation.items),
            }
            for b in sorted(common)
        },
    }
