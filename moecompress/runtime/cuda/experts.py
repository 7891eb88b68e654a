"""The MoE layer on CUDA from packed groups, and the group-level entry of the kernel registry.

`forward(experts, hidden_states, top_k_index, top_k_weights)` computes a PackedExperts layer with no host sync:
routing tables on the device (routing.py), one kernel launch per (projection, bit-width) group, the model's own
gate between the projections, the routing weights applied in the down kernel, the top_k outputs of each token summed
in float32 in a fixed order. Shapes depend only on the number of tokens, so a whole decode step can be captured in a
CUDA graph (warm up once first: Triton compiles at the first call).

Paths: up to PAIR_TOKENS tokens per call and PAIR_MAX_MEAN_ROWS rows per expert, layers whose groups are all packed
2/3/4/8-bit (no bias, no post-expert norm) take the pair path (decode.py, run by a plan cached per layer and shape:
pairs.py): 4-5 launches per layer, all bit-widths in one launch per projection, no routing tables, the SiLU gate
fused where the model's gate is SiLU(gate) * up. Above PAIR_MAX_MEAN_ROWS rows per expert, where the pair path's
extra reads of the same expert reach PAIR_DENSE_MIN_BYTES (few large experts: launch.dense_decode), the decode path
below runs with the DECODE_DENSE tile (and the gate fused into its first projection with launch.DECODE_GATED).
Otherwise up to DECODE_ROWS tokens per call (and <= routing.SMALL_PAIRS pairs) take the decode path (one program
builds the routing tables; every hit expert is one block of rows, so its packed bytes are read once per column
tile); one token per call runs gemv_kernel there (CUDA cores; launch.GEMV_ENABLED), 2-16 tokens packed_kernel.
More tokens take the prefill path: tables by torch ops, row blocks of 16-256, packed_kernel with wide tiles, the
SiLU gate fused into the first projection where the model's gate is that (launch.PREFILL_GATED / _TALL_GATED). On
sm90 (launch.hopper_device) packed groups with K % 128 == 0 take hopper.wgmma_kernel instead (row blocks of at most
128; x permuted once per projection input), the others packed_kernel; a down projection with few long programs
(Mixtral) splits K there (launch.hopper_split_k: partial outputs in copies of y, summed in a fixed order).
Prefill calls with many rows per expert and few bits (launch.prefill_dequant: Mixtral-8x7B's mix at 2,048 tokens) take
dequant.py instead: each expert dequantized once into a bf16 scratch, then torch._grouped_mm.
(A grouped-matmul formulation that dequantizes each packed value's own weight tile, Marlin/MxMoE style, measured
1.2-2.8x slower than packed_kernel on an H200 and was not kept: eval/results/gpu_grouped.md.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moecompress.runtime.cuda import launch, routing


def supports(experts, x: torch.Tensor) -> bool:
    """Whether this layer runs on the CUDA kernels for activations x (shapes and dtypes the kernels take); the
    answer is cached on the layer per dtype, device and packed tensors."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    key = (x.dtype, x.device, _signature(experts))
    cached = experts.__dict__.setdefault("_cuda_supports", {})
    if key not in cached:
        cached[key] = _supports(experts, x)
    return cached[key]


def _supports(experts, x: torch.Tensor) -> bool:
    for name in experts.proj_names:
        for group in getattr(experts, name).children():
            if group.experts and not group_supported(group, x.dtype):
                return False
    return True


def group_supported(group, dtype: torch.dtype) -> bool:
    if group.bits == 16:
        return group.weight.is_cuda and group.weight.is_contiguous() and group.weight.dtype == dtype
    q = group.qweight
    return (q.is_cuda and q.is_contiguous() and q.data_ptr() % 4 == 0 and group.in_features % 32 == 0
            and group.in_features % group.group_size == 0
            and group.group_size % launch.values_per_unit(group.bits)[0] == 0 and group.scales.is_contiguous()
            and group.scales.dtype == torch.float16 and (group.symmetric or group.zeros.is_contiguous())
            and dtype in (torch.bfloat16, torch.float16))


def _path(tokens: int, pairs: int) -> str:
    return "decode" if tokens <= launch.DECODE_ROWS and pairs <= routing.SMALL_PAIRS else "prefill"


def _tables(proj, flat: torch.Tensor, path: str, pairs: int):
    groups, positions = routing.proj_groups(proj)
    keys = routing.lookup(proj, flat.device)[flat.clamp(max=proj.num_experts)]  # [S]; -1 -> the last entry (dropped)
    max_rows = launch.HOPPER_MAX_ROWS if path == "prefill" and launch.hopper_device(flat.device) else None
    rows = launch.DECODE_ROWS if path == "decode" else launch.prefill_rows(pairs, positions, max_rows)
    return groups, routing.build(keys, positions, rows, small=path == "decode")


def _grid_m(tables: routing.Tables, n_slots: int, pairs: int) -> int:
    if tables.small:
        return min(n_slots, pairs)
    return min(n_slots, pairs) + pairs // tables.block_rows


def _split_k(proj, groups, tables, path, weights, device) -> int:
    """Splits of K of a weighted projection on sm90's prefill kernel (launch.hopper_split_k, the largest over the
    groups, for every group: the output gets that many copies of its rows, summed afterwards; packed_kernel's
    groups write the first)."""
    if path != "prefill" or weights is None or not launch.hopper_device(device):
        return 1
    pairs = tables.order.numel()
    return max([launch.hopper_split_k(g, pairs, proj.num_experts, tables.block_rows, device) for g, _ in groups
                if launch.hopper_group(g)] or [1])


def _project(proj, groups, tables, x, out, row_div, path, weights=None, one_token=False, dense=False,
             gated=False, split_k: int = 1) -> None:
    pairs = tables.order.numel()
    hopper = path == "prefill" and launch.hopper_device(x.device)
    x_perm = None
    for group, pos0 in groups:
        if hopper and launch.hopper_group(group):
            if x_perm is None:
                from moecompress.runtime.cuda.hopper import permute_k

                x_perm = permute_k(x)
            launch.run_hopper(group, x_perm, tables, pos0, _grid_m(tables, len(group.experts), pairs), out, row_div,
                              weights, gated, split_k=split_k)
            continue
        launch.run(group, x, tables, pos0, _grid_m(tables, len(group.experts), pairs), out, row_div,
                   launch.config_for(path, group.bits, tables.block_rows, dense), weights,
                   gemv=one_token and launch.GEMV_ENABLED, gated=gated)


def prefill_gate_fused(experts, groups) -> bool:
    """Whether the prefill path's first projection applies the gate itself (packed_kernel GATED): the model's gate
    is SiLU(gate) * up, every group of the first projection packed, no bias."""
    return (experts.has_gate and not getattr(experts, "has_bias", False) and all(g.bits != 16 for g, _ in groups)
            and silu_gate(experts))


def pair_supported(experts) -> bool:
    """Whether the layer can run the pair path: two projections of packed 2/3/4/8-bit groups, no bias, no
    post-expert norm (cached on the layer: its groups do not change)."""
    cached = experts.__dict__.get("_cuda_pair_supported")
    if cached is None:
        cached = experts.__dict__["_cuda_pair_supported"] = _pair_supported(experts)
    return cached


def _pair_supported(experts) -> bool:
    if len(experts.proj_names) != 2 or experts.has_post_expert_norm or getattr(experts, "has_bias", False):
        return False
    groups = [g for name in experts.proj_names for g in getattr(experts, name).children() if g.experts]
    return bool(groups) and all(g.bits in (2, 3, 4, 8) and g.group_size % 32 == 0
                                and g.group_size & (g.group_size - 1) == 0 for g in groups)


def silu_gate(experts) -> bool:
    """Whether the model's gate is SiLU(gate) * up on the two halves (then the pair path fuses it): checked once
    on a small CPU tensor (exact equality), cached on the layer."""
    fused = getattr(experts, "_cuda_silu_gate", None)
    if fused is None:
        fused = False
        if experts.has_gate and experts._gate_fn is not None:
            h = (torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
            try:
                fused = torch.equal(experts._gate_fn(experts, h), F.silu(h[:, :32]) * h[:, 32:])
            except Exception:  # noqa: BLE001 (any other gate: not fused)
                fused = False
        experts._cuda_silu_gate = fused
    return fused


def _pair_plan(experts, x: torch.Tensor, flat: torch.Tensor, weights: torch.Tensor, tokens: int, top_k: int):
    """The layer's pairs.PairPlan for this call's shapes, dtypes and launch settings (built at the first such call,
    cached on the layer; rebuilt if its packed tensors moved)."""
    key = (tokens, top_k, x.dtype, flat.dtype, weights.dtype, x.device, launch.PAIR_BLOCK_N, launch.PAIR_WARPS,
           launch.PAIR_GROUPS_PER_PROGRAM, launch.PAIR_ASM)
    plans = experts.__dict__.setdefault("_cuda_pair_plans", {})
    plan = plans.get(key)
    if plan is None or plan.signature != _signature(experts):
        from moecompress.runtime.cuda.pairs import PairPlan

        projs = [getattr(experts, name) for name in experts.proj_names]
        plan = PairPlan(experts, *[(p, routing.proj_groups(p)[0], routing.lookup(p, x.device)) for p in projs], silu_gate(experts),
                        tokens, top_k, x.dtype, x.device)
        plan.signature = _signature(experts)
        plans[key] = plan
    return plan


def _expert_bytes(experts) -> float:
    """Packed bytes of one expert, the mean over the layer's experts (both projections; cached on the layer)."""
    cached = experts.__dict__.get("_cuda_expert_bytes")
    if cached is None:
        total, count = 0, getattr(experts, experts.proj_names[0]).num_experts
        for name in experts.proj_names:
            for group in getattr(experts, name).children():
                if group.experts:
                    total += sum(t.numel() * t.element_size() for t in group.parameters()) + sum(
                        t.numel() * t.element_size() for t in group.buffers())
        cached = experts.__dict__["_cuda_expert_bytes"] = total / max(1, count)
    return cached


def _signature(experts) -> tuple[int, ...]:
    """Where the layer's packed tensors are (data pointers of each projection's first group): a plan or a
    `supports` answer made for other tensors is not reused."""
    firsts = experts.__dict__.get("_cuda_first_groups")
    if firsts is None:
        firsts = [next(iter(getattr(experts, name).children())) for name in experts.proj_names]
        experts.__dict__["_cuda_first_groups"] = firsts
    return tuple((g.qweight if g.bits != 16 else g.weight).data_ptr() for g in firsts)


def forward(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """PackedExperts.forward on CUDA: hidden_states [T, H], top_k_index / top_k_weights [T, K] -> [T, H]."""
    tokens, top_k = top_k_index.shape
    pairs = tokens * top_k
    x = hidden_states.contiguous()
    flat = top_k_index.reshape(-1)
    n_experts = getattr(experts, experts.proj_names[0]).num_experts
    dense = pairs > launch.PAIR_MAX_MEAN_ROWS * n_experts  # the tables path's tile: DECODE_DENSE
    if (tokens <= launch.PAIR_TOKENS and pair_supported(experts)
            and not (dense and launch.dense_decode(pairs, n_experts, _expert_bytes(experts)))):
        weights = top_k_weights.reshape(-1).contiguous()
        flat = flat.contiguous()
        return _pair_plan(experts, x, flat, weights, tokens, top_k)(x, flat, weights)
    path = _path(tokens, pairs)
    first, down = (getattr(experts, name) for name in experts.proj_names)
    if (path == "prefill" and launch.prefill_dequant(pairs, first._lookup[-1], mean_bits(experts))
            and _dequant_supported(experts)):
        from moecompress.runtime.cuda import dequant

        return dequant.forward(experts, x, top_k_index, top_k_weights)
    groups, tables = _tables(first, flat, path, pairs)
    gated = ((launch.DECODE_GATED and dense if path == "decode" else
              launch.PREFILL_TALL_GATED if tables.block_rows >= 256 else launch.PREFILL_GATED)
             and prefill_gate_fused(experts, groups))
    h = torch.empty(pairs, first.out_features // 2 if gated else first.out_features, dtype=x.dtype,
                    device=x.device)  # [S, out_first], by pair
    _project(first, groups, tables, x, h, top_k, path, one_token=tokens == 1, dense=dense, gated=gated)
    if not gated:
        h = experts._gate_fn(experts, h) if experts.has_gate else experts.act_fn(h)
    h = h.contiguous()
    if not experts._same_order:
        groups, tables = _tables(down, flat, path, pairs)
    else:
        groups = routing.proj_groups(down)[0]
    hidden = down.out_features
    if experts.has_post_expert_norm:
        y = torch.zeros(pairs, hidden, dtype=x.dtype, device=x.device)
        _project(down, groups, tables, h, y, 1, path, one_token=tokens == 1, dense=dense)
        y = experts.post_expert_norm(y).float() * top_k_weights.reshape(-1, 1).float()
    else:
        rw = top_k_weights.reshape(-1).contiguous()
        split_k = _split_k(down, groups, tables, path, rw, x.device)
        y = torch.zeros(split_k * pairs, hidden, dtype=torch.float32, device=x.device)  # [S, H], weighted, by pair
        _project(down, groups, tables, h, y, 1, path, rw, one_token=tokens == 1, dense=dense, split_k=split_k)
        if split_k > 1:  # (partial sums of K, rounded to bf16 each as the unsplit product is)
            y = y.view(split_k, pairs, hidden).sum(0)
    return y.view(tokens, top_k, hidden).sum(1).to(hidden_states.dtype)


def mean_bits(experts) -> float:
    """Mean bits per weight over the first projection's experts (bf16 groups: 16; cached on the layer)."""
    cached = experts.__dict__.get("_cuda_mean_bits")
    if cached is None:
        groups = [g for g in getattr(experts, experts.proj_names[0]).children() if g.experts]
        cached = sum(g.bits * len(g.experts) for g in groups) / max(1, sum(len(g.experts) for g in groups))
        experts.__dict__["_cuda_mean_bits"] = cached
    return cached


def _dequant_supported(experts) -> bool:
    """Whether the layer can take dequant.py's prefill (cached on the layer: its groups do not change)."""
    cached = experts.__dict__.get("_cuda_dequant_supported")
    if cached is None:
        from moecompress.runtime.cuda import dequant

        cached = experts.__dict__["_cuda_dequant_supported"] = dequant.supported(experts)
    return cached


def linear_sorted(group, x: torch.Tensor, slots: list[int], counts: list[int], path: str) -> torch.Tensor:
    """One group, rows sorted by slot (PackedGroup.linear_sorted / the kernel registry): x [R, in] -> [R, out],
    bias not added (linear_sorted adds it)."""
    per_slot = [0] * len(group.experts)
    for s, c in zip(slots, counts):
        per_slot[s] = c
    rows = launch.DECODE_ROWS if path == "decode" else launch.prefill_rows(sum(counts), len(slots))
    tables = routing.from_counts(per_slot, rows, x.device)
    out = torch.empty(x.shape[0], group.out_features, dtype=x.dtype, device=x.device)
    config = launch.config_for(path, group.bits, rows)
    launch.run(group, x.contiguous(), tables, 0, tables.blocks.shape[0], out, 1, config, with_bias=False)
    return out
