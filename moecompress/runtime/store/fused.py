"""The store's experts computed with the fused CPU decode call (runtime/experts/cpu_moe.py, csrc/lowbit/moe.cpp).

The fully resident PackedExperts runs a decode step (at most cpu_moe's token limit, on CPU) as one C++ call over its
groups when the layer qualifies (`cpu_moe.fused_layer`: every group 2/3/4/8-bit in the format's packing, a `q8_*`
decode kernel of one ISA, the default SiLU gate). The store takes the same call whenever the resident model would,
with the groups being its slots: each routed expert's single-expert group is one entry of the per-projection lists
and the map `where` [experts, 2] points expert e at (its entry, slot 0), -1 for experts not routed or not held here.
Resident low-bit copies (one group of all experts, slot e = expert e) join the lists as one more entry.

Exactness: the call computes every (token, expert) row on its own (activation quantized per row in the lane order of
the expert's bit-width, the expert's decode kernel) and sums each token's experts in k order, so which entry or slot
holds an expert does not change a bit: outputs equal the fully resident model's fused call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moecompress.runtime.kernels import cpu_lowbit, kernel_registry

from moecompress.runtime.experts import cpu_moe
from moecompress.runtime.experts.packed_group import PackedGroup

_NO_ZEROS = torch.empty(0, dtype=torch.uint8)  # symmetric groups: the call's "no zeros"


@dataclass(frozen=True)
class FusedSettings:
    isa: str  # cpu_lowbit.ISA_ID key
    group_size: int


def settings_key(dtype: torch.dtype) -> tuple:
    """What the resident decision depends on besides the layer (cpu_moe.fused_layer's cache key)."""
    return (dtype, *kernel_registry.settings())


def fused_settings(module, proj_bits: dict[str, set[int]], proj_shapes: dict[str, tuple[int, int]], group_size: int,
                   symmetric: bool, dtype: torch.dtype) -> FusedSettings | None:
    """The fused call's settings where the fully resident layer would take it (cpu_moe.build_layer's conditions, decided
    from the bit-widths each projection holds), else None. proj_shapes: proj -> (in_features, out_features)."""
    if not cpu_moe.gated_silu(module) or not cpu_lowbit.available():
        return None
    isas = set()
    for proj in module.proj_names:
        in_f, out_f = proj_shapes[proj]
        for bits in proj_bits.get(proj, ()):
            if bits == 16:
                return None
            probe = PackedGroup((), bits, in_f, out_f, group_size, symmetric, False, dtype, device="cpu")  # no bytes
            layouts = {kernel_registry.select(bits, path, probe, dtype).layout for path in kernel_registry.PATHS}
            if "int4" in layouts:  # prepare() converts such groups: the resident layer is not fused either
                return None
            isa = cpu_moe.decode_isa(probe, dtype)
            if isa is None:
                return None
            isas.add(isa)
    return FusedSettings(isas.pop(), group_size) if len(isas) == 1 else None


def layer_settings(module, layout, layer: int, copies: dict, dtype: torch.dtype) -> FusedSettings | None:
    """fused_settings for MoE layer `layer` of a StoreLayout, its resident low-bit copies (proj -> group) included."""
    bits: dict[str, set[int]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for projs in layout.shapes[layer].values():
        for proj, shape in projs.items():
            bits.setdefault(proj, set()).add(shape.bits)
            shapes[proj] = (shape.in_features, shape.out_features)
    for proj, group in copies.items():
        bits.setdefault(proj, set()).add(group.bits)
    if not shapes:
        return None
    return fused_settings(module, bits, shapes, layout.group_size, layout.symmetric, dtype)


def fused_call(settings: FusedSettings, proj_names: tuple[str, str], num_experts: int, hidden: torch.Tensor,
               top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
               table: dict[int, tuple[dict[str, PackedGroup], int]]) -> torch.Tensor:
    """table: expert -> (proj -> group holding it, its slot there), for every routed expert to compute (the others
    contribute nothing). hidden [T, H] -> [T, H] in hidden's dtype."""
    args = []
    experts = torch.tensor(list(table), dtype=torch.int64)
    for proj in proj_names:
        qs, ss, zs, bits, entry, at = [], [], [], [], {}, []
        for groups, slot in table.values():
            g = groups[proj]
            i = entry.get(id(g))
            if i is None:
                i = entry[id(g)] = len(qs)
                qs.append(g.qweight)
                ss.append(g.scales)
                zs.append(_NO_ZEROS if g.symmetric else g.zeros)
                bits.append(g.bits)
            at.append((i, slot))
        where = torch.full((num_experts, 2), -1, dtype=torch.int64)  # expert -> (entry, slot); -1: not computed
        if at:
            where[experts] = torch.tensor(at, dtype=torch.int64)
        args += [qs, ss, zs, bits, where]
    return cpu_moe.moe_decode(hidden, top_k_index, top_k_weights, args, settings.group_size, settings.isa)


def fused_rows(settings: FusedSettings, proj_names: tuple[str, str], num_experts: int, hidden: torch.Tensor,
               top_k_index: torch.Tensor, table: dict[int, tuple[dict[str, PackedGroup], int]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (token, k) pair's expert output, unweighted, for the pairs whose expert is in `table`: (rows [P, H]
    float32, pair positions [P] as t * K + k). The same C++ call with every pair as its own one-expert token of weight
    1: a row's activation quantization and kernel do not depend on the other rows, and 0 + y * 1 == y, so each row
    equals the one the full call sums."""
    T, K = top_k_index.shape
    flat = top_k_index.reshape(-1).tolist()
    pos = [i for i, e in enumerate(flat) if e in table]
    if not pos:
        return torch.empty(0, hidden.shape[1], dtype=torch.float32), torch.empty(0, dtype=torch.int64)
    pos_t = torch.tensor(pos, dtype=torch.int64)
    x = hidden.float()[pos_t // K]  # float32 in, float32 out (no rounding to hidden's dtype)
    index = top_k_index.reshape(-1, 1)[pos_t]
    rows = fused_call(settings, proj_names, num_experts, x, index, torch.ones(len(pos), 1), table)
    return rows, pos_t


def weighted_sum(parts: list[tuple[torch.Tensor, torch.Tensor]], top_k_weights: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """The C++ call's sum from rows computed apart (fused_rows): per token, out = 0, then out += y_k * w_k in k order
    over the pairs present, in float32 with a separate multiply and add (the module is built with -ffp-contract=off),
    so the result equals the one call's bit for bit. -> [T, H] in `dtype`."""
    T, K = top_k_weights.shape
    H = next(r.shape[1] for r, _ in parts)
    rows = torch.zeros(T * K, H, dtype=torch.float32)
    present = torch.zeros(T * K, dtype=torch.bool)
    for r, pos in parts:
        rows[pos] = r
        present[pos] = True
    rows, present = rows.view(T, K, H), present.view(T, K)
    w = top_k_weights.float()
    out = torch.zeros(T, H, dtype=torch.float32)
    for k in range(K):
        term = rows[:, k] * w[:, k:k + 1]
        out = torch.where(present[:, k:k + 1], out + term, out)
    return out.to(dtype)
