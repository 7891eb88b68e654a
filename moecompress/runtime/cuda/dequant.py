"""Prefill of few large experts by dequantize-then-GEMM: each expert's packed weights dequantized once into a bf16
scratch, then torch._grouped_mm (CUTLASS) over the rows sorted by expert (session 27; launch.prefill_dequant).

Why: the fused prefill kernel (hopper.py on sm90) dequantizes a weight tile once per row block of at most 128 token
rows, so an expert with R rows is dequantized ceil(R / 128) times, inside the programs that run the wgmmas.
Mixtral-8x7B at 2,048 tokens has 512 rows per expert: each weight is dequantized 4 times per call. Here it is
dequantized once (`dequant_kernel`, memory-bound: packed bytes read, bf16 written) and the matmuls are the bf16
model's own GEMMs. Offsets stay on the device: no host sync, CUDA-graph safe. Scratch: P x N x K x 2 bytes of the
first projection (then the down projection's, in the same memory), transient: +1.9 GB over the fused path on
Mixtral-8x7B (2.38 GB workspace against 0.50 GB at 2,048 tokens, mix).

H200, one Mixtral-8x7B layer, 2,048 tokens, graph-replayed (eval/bench_gpu_prefill.py, eval/results/
gpu_prefill_s27.md): mix 2/3/4 fused 4772 -> 4255 µs (bf16 grouped_mm 3357); 4-bit fused 4125, this 4345 (slower:
launch.PREFILL_DEQUANT_MAX_BITS); at 1,024 / 512 tokens (256 / 128 rows per expert) the fused kernel is faster (2885 /
1865 against 3108 / 2724), on Qwen3-30B-A3B too (1126 against 1840). Where its time goes (profile, mix): grouped_mm
2300 µs (the same CUTLASS kernel as bf16's), dequant_kernel 1272 (3.38 GB at 2.5-2.7 TB/s; the floor at the copy
bandwidth is ~0.8 ms), gate, gathers and the weighted sum ~0.6 ms: the dequantized weights' round trip through HBM
alone keeps this above bf16's time. Tried in the same run and not kept: the down projection dequantized on a side
stream during the first projection's matmul (4260 µs: CUTLASS holds every SM, nothing overlaps; +0.94 GB), and one
torch.mm per expert after a host sync with the next expert dequantized on a side stream into a second buffer (4355
mix / 4952 4-bit; 65 ms on Qwen3-30B-A3B's 128 experts).

Rounding as the dequantize-then-matmul reference: the same bf16 weights ((q - z) * s in float32, rounded), bf16
matmul outputs, the model's gate on bf16 h, outputs times the routing weight in float32, a token's top_k outputs
summed in float32 in order. Requirements (`supported`): the projections share positions (_same_order), no bias, no
post-expert norm, torch._grouped_mm (torch >= 2.9, sm80+).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moecompress.runtime.cuda import launch
from moecompress.runtime.cuda.routing import lookup, proj_groups
from moecompress.runtime.cuda.kernels import _weights

# dequant_kernel's tile: output rows x values of K per program, warps. H200, Mixtral mix / 4-bit, both projections
# (eval/results/gpu_prefill_s27.md): 64x128 w4 1336 / 1375 µs, 32x256 w4 1275 / 1277 (not adopted: that run's tests
# covered 64x128 only), 128x128 w8 1422 / 1380, 64x256 w8 1376 / 1378
DEQUANT_BN, DEQUANT_BK, DEQUANT_WARPS = 64, 128, 4


@triton.jit
def dequant_kernel(q_ptr, s_ptr, z_ptr, w_ptr, N, K, groups, stride_qe, stride_qn,
                   BITS: tl.constexpr, GS: tl.constexpr, SYMMETRIC: tl.constexpr, VPW: tl.constexpr,
                   UNIT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """w[slot, n, k] = (q - z) * s rounded to w's dtype, for the [BN, BK] tile (program_id 1, 2) of slot
    program_id(0): the packed words read once, expanded as packed_kernel does (kernels._weights)."""
    slot64 = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = offs_n < N
    k0 = tl.program_id(2) * BK
    BKW: tl.constexpr = BK // VPW
    UPG: tl.constexpr = GS // VPW
    uu = k0 // VPW + tl.arange(0, BKW)
    wmask = (uu < K // VPW)[:, None] & nmask[None, :]
    q_rows = q_ptr + slot64 * stride_qe + offs_n[None, :].to(tl.int64) * stride_qn  # [1, BN]
    s_rows = s_ptr + slot64 * N * groups + offs_n * groups  # [BN]
    z_rows = z_ptr + slot64 * N * groups + offs_n * groups
    w = _weights(q_rows, s_rows, z_rows, k0, uu, nmask, wmask, BITS, GS, SYMMETRIC, VPW, UNIT, BKW, UPG, BK, BN,
                 w_ptr.dtype.element_ty)  # [BK, BN]
    kk = k0 + tl.arange(0, BK)
    ptrs = w_ptr + slot64 * N * K + offs_n[None, :].to(tl.int64) * K + kk[:, None]
    tl.store(ptrs, w, mask=(kk < K)[:, None] & nmask[None, :])


def dequantize_into(group, out: torch.Tensor, slots: slice | None = None) -> None:
    """out [n, N, K] (x's dtype) = the group's weights at `slots` (default all), dequantized (bf16 groups: copied)."""
    slots = slots or slice(0, len(group.experts))
    if group.bits == 16:
        out.copy_(group.weight[slots])
        return
    n, N, K = out.shape
    q = group.qweight.view(torch.int32)[slots]  # [n, N, K*bits/32]
    s = group.scales[slots]
    z = s if group.symmetric else group.zeros[slots]
    vpw, unit = launch.values_per_unit(group.bits)
    grid = (n, -(-N // DEQUANT_BN), -(-K // DEQUANT_BK))
    dequant_kernel[grid](q, s, z, out, N, K, s.shape[-1], q.stride(0), q.stride(1), BITS=group.bits,
                         GS=group.group_size, SYMMETRIC=bool(group.symmetric), VPW=vpw, UNIT=unit, BN=DEQUANT_BN,
                         BK=DEQUANT_BK, num_warps=DEQUANT_WARPS)


def supported(experts) -> bool:
    """Whether the layer can take this path: shared positions, no bias, no post-expert norm, two projections, and
    torch._grouped_mm in this torch (torch >= 2.9 on sm80+)."""
    return (hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability() >= (8, 0) and experts._same_order
            and not experts.has_post_expert_norm and not getattr(experts, "has_bias", False)
            and len(experts.proj_names) == 2)


def _scratch(proj, dtype, device) -> torch.Tensor:
    """An empty [P, N, K] scratch for every position's weights of one projection."""
    groups, positions = proj_groups(proj)
    first = groups[0][0]
    return torch.empty(positions, first.out_features, first.in_features, dtype=dtype, device=device)  # [P, N, K]


def _dequantize_all(proj, dtype, device) -> torch.Tensor:
    """[P, N, K]: every position's weights of one projection."""
    w = _scratch(proj, dtype, device)
    for group, pos0 in proj_groups(proj)[0]:
        dequantize_into(group, w[pos0:pos0 + len(group.experts)])
    return w


def _route(experts, flat: torch.Tensor):
    """(order [S] pairs by position, keys sorted [S], rows per position [P], end offsets int32 [P], positions)."""
    first = getattr(experts, experts.proj_names[0])
    positions = first._lookup[-1]
    keys = lookup(first, flat.device)[flat.clamp(max=first.num_experts)]  # [S]; positions = not computed
    sorted_keys, order = torch.sort(keys, stable=True)
    counts = torch.zeros(positions + 1, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, keys.long(), torch.ones_like(keys, dtype=torch.int32))
    counts = counts[:positions]
    return order, sorted_keys, counts, torch.cumsum(counts, 0, dtype=torch.int32), positions


def _finish(experts, y_sorted, order, sorted_keys, positions, top_k_weights, tokens, top_k, dtype):
    """Sorted bf16 outputs -> [T, H]: times the routing weight in float32, rows of dropped experts zero (grouped_mm
    leaves rows past the last offset unwritten), back to pair order, top_k summed in order."""
    rw = top_k_weights.reshape(-1).float()[order]
    y = torch.where((sorted_keys < positions)[:, None], y_sorted.float() * rw[:, None], 0.0)
    out = torch.empty_like(y)
    out[order] = y
    return out.view(tokens, top_k, -1).sum(1).to(dtype)


def _gate(experts, h):
    return experts._gate_fn(experts, h) if experts.has_gate else experts.act_fn(h)


def forward(experts, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """PackedExperts' CUDA forward by dequantize-then-grouped_mm: x [T, H] -> [T, H], no host sync."""
    tokens, top_k = top_k_index.shape
    first, down = (getattr(experts, name) for name in experts.proj_names)
    order, sorted_keys, _, offs, positions = _route(experts, top_k_index.reshape(-1))
    xs = x[order // top_k]  # [S, H] by position
    w1 = _dequantize_all(first, x.dtype, x.device)  # [P, N1, K1]
    h = _gate(experts, torch._grouped_mm(xs, w1.transpose(-2, -1), offs=offs))  # [S, N1] -> [S, N1 / 2]
    del w1  # the allocator gives its memory to w2 (same stream: after the matmul)
    w2 = _dequantize_all(down, x.dtype, x.device)  # [P, N2, K2]
    y = torch._grouped_mm(h.contiguous(), w2.transpose(-2, -1), offs=offs)  # [S, H]
    return _finish(experts, y, order, sorted_keys, positions, top_k_weights, tokens, top_k, x.dtype)
