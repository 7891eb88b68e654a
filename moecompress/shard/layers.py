"""Pipeline placement: each server holds a contiguous range of decoder layers (dense weights and experts).

The pipeline execution model (moecompress/execution/routing.py): the hidden state goes stage to stage and the last
stage sends it back to the home (the first stage), which holds the embeddings, final norm and lm_head and computes
logits. A decoded token therefore costs one network hop per stage boundary plus one back to the home: as many
sequential hops as there are stages (0 with one stage). The ranges are cut to balance bytes against memory (the
largest fill ratio, bytes / memory, is minimised exactly by dynamic programming over the cut points).

Two methods:
  all_servers    - every server is a stage (the layout of llama.cpp's RPC backend, Petals, EdgeShard);
  fewest_servers - the fewest stages that fit in memory (the servers with the most memory), so the fewest hops.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moecompress.artifacts.placement import Placement, as_grid
from moecompress.errors import MoecompressError
from moecompress.shard.problem import check_expert_bytes
from moecompress.shard.spec import ServerSpec


@dataclass(frozen=True, eq=False)
class LayerSizes:
    """Stored bytes of a model by layer: what placement needs for either execution model."""

    expert_bytes: np.ndarray  # [L, E] every expert of every MoE layer
    moe_decoder_layers: tuple[int, ...]  # [L] decoder layer of each MoE layer
    layer_dense_bytes: tuple[int, ...]  # [D] non-expert bytes of each decoder layer (attention, norms, router)
    head_bytes: int  # embeddings, final norm, lm_head

    @property
    def dense_bytes(self) -> int:
        """All non-expert bytes: what the expert model's home holds."""
        return int(sum(self.layer_dense_bytes)) + int(self.head_bytes)


def place_all_servers(sizes: LayerSizes, spec: ServerSpec) -> Placement:
    return place_pipeline(sizes.expert_bytes, sizes.moe_decoder_layers, sizes.layer_dense_bytes, sizes.head_bytes,
                          spec, fewest=False)


def place_fewest_servers(sizes: LayerSizes, spec: ServerSpec) -> Placement:
    return place_pipeline(sizes.expert_bytes, sizes.moe_decoder_layers, sizes.layer_dense_bytes, sizes.head_bytes,
                          spec, fewest=True)


def place_pipeline(expert_bytes, moe_decoder_layers, layer_dense_bytes, head_bytes: int, spec: ServerSpec,
                   fewest: bool = False) -> Placement:
    """Contiguous layer ranges over the servers, bytes balanced against memory.

    expert_bytes [L, E] (MoE layers), moe_decoder_layers [L] (the decoder layer of each MoE layer),
    layer_dense_bytes [D] (non-expert bytes of each decoder layer), head_bytes: embeddings, final norm, lm_head
    (held by the first stage, the home).
    """
    dense = np.asarray(layer_dense_bytes, dtype=np.int64)
    D = len(dense)
    moe = np.asarray(moe_decoder_layers, dtype=np.int64)
    b = check_expert_bytes(expert_bytes, len(moe), np.asarray(expert_bytes).shape[1] if len(moe) else 0)
    if D < 1 or (len(moe) and (moe.min() < 0 or moe.max() >= D or (np.diff(moe) <= 0).any())):
        raise MoecompressError(f"MoE layers {moe.tolist()} must be increasing decoder layer ids in 0..{D - 1}")
    layer_bytes = dense.copy()
    np.add.at(layer_bytes, moe, b.sum(1))  # [D] everything a stage holds for that layer
    N = spec.num_servers
    by_memory = sorted(range(N), key=lambda s: (-spec.memory_bytes[s], s))
    counts = range(1, min(N, D) + 1) if fewest else [min(N, D)]
    for m in counts:
        servers = sorted(by_memory[:m])
        cuts = balanced_cuts(layer_bytes, head_bytes, [spec.memory_bytes[s] for s in servers])
        if cuts is not None:
            break
    else:
        roomy = [int(layer_bytes.sum()) + head_bytes] * min(N, D)  # everything fits: the cut of least max bytes
        need = max(stage_bytes(layer_bytes, head_bytes, balanced_cuts(layer_bytes, head_bytes, roomy)))
        raise MoecompressError(
            f"the model does not fit as a pipeline on {N} servers with {', '.join(map(str, spec.memory_bytes))} "
            f"bytes: its layers take {int(layer_bytes.sum())} bytes plus {head_bytes} for embeddings and lm_head; "
            f"the smallest memory that fits, the same on every server, is {need} bytes"
        )
    layer_servers = np.repeat(servers, np.diff([0, *cuts]))  # [D]
    held = stage_bytes(layer_bytes, head_bytes, cuts)
    server_dense = np.zeros(N, dtype=np.int64)
    for stage, (lo, hi) in enumerate(zip([0, *cuts[:-1]], cuts)):
        server_dense[servers[stage]] = dense[lo:hi].sum() + (head_bytes if stage == 0 else 0)
    assert int(sum(held)) == int(server_dense.sum() + b.sum())
    E = b.shape[1]
    return Placement(
        memory_bytes=spec.memory_bytes,
        assignment=as_grid([[[layer_servers[d]]] * E for d in moe]),
        expert_bytes=tuple(tuple(int(v) for v in row) for row in b),
        dense_bytes=int(dense.sum() + head_bytes),
        dense_servers=tuple(servers),
        method="fewest_servers" if fewest else "all_servers",
        mode="pipeline",
        home=int(servers[0]),
        layer_servers=tuple(int(s) for s in layer_servers),
        server_dense_bytes=tuple(int(v) for v in server_dense),
    )


def balanced_cuts(layer_bytes: np.ndarray, head_bytes: int, memory: list[int]) -> list[int] | None:
    """End index (exclusive) of each of len(memory) non-empty contiguous ranges minimising max(bytes / memory),
    the first range also holding `head_bytes`; None when no cut fits every range in its memory."""
    D, m = len(layer_bytes), len(memory)
    if m > D:
        return None
    prefix = np.concatenate([[0], np.cumsum(layer_bytes)])
    inf = float("inf")
    best = np.full((m + 1, D + 1), inf)  # best[j, i]: first i layers in j stages
    cut = np.zeros((m + 1, D + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for j in range(1, m + 1):
        for i in range(j, D - (m - j) + 1):
            for p in range(j - 1, i):
                if best[j - 1, p] == inf:
                    continue
                held = prefix[i] - prefix[p] + (head_bytes if j == 1 else 0)
                if held > memory[j - 1]:
                    continue
                value = max(best[j - 1, p], held / memory[j - 1])
                if value < best[j, i]:
                    best[j, i], cut[j, i] = value, p
    if best[m, D] == inf:
        return None
    ends, i = [], D
    for j in range(m, 0, -1):
        ends.append(i)
        i = cut[j, i]
    return ends[::-1]


def stage_bytes(layer_bytes: np.ndarray, head_bytes: int, cuts: list[int]) -> list[int]:
    starts = [0, *cuts[:-1]]
    return [int(layer_bytes[lo:hi].sum()) + (head_bytes if s == 0 else 0)
            for s, (lo, hi) in enumerate(zip(starts, cuts))]
