"""CUDA (Triton) kernels for packed experts against the dequantize-then-matmul reference.

Every bit-width (2/3/4/8 and bf16 groups), asymmetric and symmetric, the decode and prefill paths, several tile
shapes, mixed bit-widths in one layer, dropped experts, and a CUDA-graph replay equal to eager.
Skipped where CUDA or Triton is missing (CI): the reason is moecompress.runtime.cuda.unavailable_reason().
`random_experts` is also what eval/bench_gpu.py measures.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from moecompress.format.pack import dequantize, pack
from moecompress.format.spec import ExpertsSpec
from moecompress.runtime import cuda
from moecompress.runtime.experts.packed_experts import PackedExperts

GROUP = 128


class GatedTemplate(nn.Module):
    """Stands in for a transformers experts module: SiLU gate on the first half of gate_up (Qwen3 / Mixtral)."""

    has_gate = True

    def __init__(self):
        super().__init__()
        self.act_fn = nn.SiLU()

    def _apply_gate(self, h):
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def random_experts(num_experts: int, hidden: int, inter: int, bits: list[int], *, group_size: int = GROUP,
                   symmetric: bool = False, held: list[int] | None = None, device="cuda", dtype=torch.bfloat16,
                   seed: int = 0, template: nn.Module | None = None) -> PackedExperts:
    """A PackedExperts layer with random integers/scales/zeros, made on `device`: expert e at bits[e] in both
    projections. held: the experts this layer holds (default all; the others are computed elsewhere and contribute
    nothing). template: the model's experts module whose gate is used (default GatedTemplate)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    held = list(range(num_experts)) if held is None else held
    by_bits: dict[int, tuple[int, ...]] = {}
    for e in held:
        by_bits.setdefault(bits[e], ())
        by_bits[bits[e]] += (e,)
    spec = ExpertsSpec(num_experts, {"gate_up": dict(by_bits), "down": dict(by_bits)})
    layer = PackedExperts(template if template is not None else GatedTemplate(),
                          [("gate_up", hidden, 2 * inter), ("down", inter, hidden)], spec, group_size, symmetric,
                          dtype=dtype, device=device)
    kw = dict(generator=gen, device=device)
    for proj in ("gate_up", "down"):
        for group in getattr(layer, proj).children():
            n, out_f, in_f = len(group.experts), group.out_features, group.in_features
            if group.bits == 16:
                group.weight.copy_((torch.randn(n, out_f, in_f, **kw) / in_f ** 0.5).to(dtype))
                continue
            for i in range(n):  # one expert at a time: bounded temporaries at real sizes
                q = torch.randint(0, 1 << group.bits, (out_f, in_f), **kw).to(torch.uint8)
                group.qweight[i].copy_(pack(q, group.bits))
            scale = 2.0 / ((1 << group.bits) * in_f ** 0.5)
            group.scales.copy_((torch.rand(group.scales.shape, **kw) + 0.5).mul(scale).half())
            if not symmetric:
                group.zeros.copy_(torch.randint(0, 1 << group.bits, group.zeros.shape, **kw).to(torch.uint8))
    return layer


def dequantized_weights(group, dtype) -> torch.Tensor:
    """[n, out, in] weights of a group as the reference computes them: float32 (q - z) * s, rounded to dtype."""
    if group.bits == 16:
        return group.weight.float()
    zeros = None if group.symmetric else group.zeros
    w = dequantize(group.qweight, group.scales, zeros, group.bits, group.group_size, group.in_features, torch.float32)
    return w.to(dtype).float()


def reference_layer(layer: PackedExperts, x: torch.Tensor, top_k_index, top_k_weights) -> torch.Tensor:
    """float32 dequantize-then-matmul, pair by pair (rounding h to x's dtype like the kernels)."""
    weights = {}
    for proj in ("gate_up", "down"):
        for group in getattr(layer, proj).children():
            w = dequantized_weights(group, x.dtype)
            for slot, e in enumerate(group.experts):
                weights[proj, e] = w[slot]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for k in range(top_k_index.shape[1]):
            e = int(top_k_index[t, k])
            if ("down", e) not in weights:
                continue
            h = (x[t].float() @ weights["gate_up", e].t()).to(x.dtype)
            a = layer._gate_fn(layer, h[None])[0]
            y = (a.float() @ weights["down", e].t()).to(x.dtype)
            out[t] += y.float() * top_k_weights[t, k].float()
    return out


def routing(tokens: int, num_experts: int, top_k: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=gen)
    w, idx = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return idx.to(device), (w / w.sum(-1, keepdim=True)).to(device)


def activations(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    """Seeded bf16 activations on the GPU (the same inputs whatever order the tests run in)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(tokens, width, generator=gen).to("cuda", torch.bfloat16)


def tolerance(tokens: int) -> float:
    """Norm-relative error bound against reference_layer. Both round h to bf16, but an h element near a rounding
    boundary can round the other way after a different accumulation order; one token's output sums only 2-3 experts'
    rows, so a few such flips weigh more (1.0e-2 to 1.3e-2 seen at one and two tokens on an H200)."""
    return 2e-2 if tokens <= 2 else 1e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


pytestmark = pytest.mark.skipif(not cuda.available(), reason=f"CUDA kernels: {cuda.unavailable_reason()}")
MIXED = [2, 3, 4, 8, 16, 3, 2, 4]  # bits of experts 0..7: every bit-width in one layer


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("tokens,pair_tokens", [(1, 16), (4, 16), (16, 16), (1, 0), (4, 0), (16, 0), (96, 16)])
def test_layer_matches_reference_every_bit_width(bits, symmetric, tokens, pair_tokens, monkeypatch):
    """1-16 tokens: the pair path (decode.py; bf16 groups take the tables path) and, with PAIR_TOKENS 0, the
    decode path of routing tables; 96: the prefill path."""
    from moecompress.runtime.cuda import experts as cuda_experts, launch

    monkeypatch.setattr(launch, "PAIR_TOKENS", pair_tokens)
    monkeypatch.setattr(launch, "PAIR_MAX_MEAN_ROWS", float("inf"))
    layer = random_experts(8, 128, 128, [bits] * 8, symmetric=symmetric, seed=bits)
    x = activations(tokens, 128, seed=1)
    idx, w = routing(tokens, 8, 2, "cuda", seed=tokens)
    assert cuda_experts.supports(layer, x)
    out = cuda_experts.forward(layer, x, idx, w)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    assert rel_err(out, reference_layer(layer, x, idx, w)) < tolerance(tokens)


@pytest.mark.parametrize("tokens", [1, 3, 16, 200])
def test_mixed_bit_widths_in_one_layer_and_dropped_experts(tokens):
    """Groups of five bit-widths in one layer; experts 5 and 6 held elsewhere contribute nothing; the
    PackedExperts module itself dispatches to the CUDA kernels."""
    layer = random_experts(8, 256, 128, MIXED, held=[0, 1, 2, 3, 4, 7], seed=1)
    x = activations(tokens, 256, seed=2)
    idx, w = routing(tokens, 8, 3, "cuda", seed=tokens)
    out = layer(x, idx, w)
    assert rel_err(out, reference_layer(layer, x, idx, w)) < tolerance(tokens)


class GeluTemplate(GatedTemplate):
    """A gate the pair path does not fuse (GELU): its first projection writes h, the model's gate runs in torch."""

    def __init__(self):
        super().__init__()
        self.act_fn = nn.GELU()


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_pair_path_mixed_bit_widths_dropped_experts(gelu, group_size, tokens, monkeypatch):
    """All four packed bit-widths in one launch per projection, experts 5 and 6 held elsewhere (their pairs
    contribute zeros), the SiLU gate fused (or GELU, not fused), symmetric at group 32."""
    from moecompress.runtime.cuda import experts as cuda_experts, launch

    monkeypatch.setattr(launch, "PAIR_MAX_MEAN_ROWS", float("inf"))

    layer = random_experts(8, 256, 128, [2, 3, 4, 8, 3, 2, 4, 8], held=[0, 1, 2, 3, 4, 7], group_size=group_size,
                           symmetric=group_size == 32, seed=7, template=GeluTemplate() if gelu else None)
    assert cuda_experts.pair_supported(layer) and cuda_experts.silu_gate(layer) == (not gelu)
    x = activations(tokens, 256, seed=3)
    idx, w = routing(tokens, 8, 3, "cuda", seed=tokens)
    out = layer(x, idx, w)
    assert out.shape == (tokens, 256) and out.dtype == torch.bfloat16
    assert rel_err(out, reference_layer(layer, x, idx, w)) < tolerance(tokens)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("block_n,block_k", [(32, 64), (64, 256), (128, 128)])
def test_any_tile_shape(bits, block_n, block_k, monkeypatch):
    """Group size 32 (scales per unit) and 128 (one scale per step, or per unit), K not a multiple of the step;
    the pair path's column tiles too (block_n)."""
    from moecompress.runtime.cuda import experts as cuda_experts, launch

    monkeypatch.setattr(launch, "HOPPER_PREFILL", False)  # packed_kernel's tiles (test_hopper_prefill: sm90's)
    config = launch.Config(block_n, block_k)
    monkeypatch.setitem(launch.DECODE, bits, config)
    monkeypatch.setitem(launch.DECODE_DENSE, bits, config)
    monkeypatch.setitem(launch.PREFILL, bits, config)
    monkeypatch.setattr(launch, "PAIR_BLOCK_N", block_n // 4)
    for group_size, hidden, inter in ((32, 384, 160), (128, 640, 384)):
        layer = random_experts(4, hidden, inter, [bits] * 4, group_size=group_size, seed=group_size)
        for tokens in (2, 40):
            x = activations(tokens, hidden, seed=4)
            idx, w = routing(tokens, 4, 2, "cuda")
            out = cuda_experts.forward(layer, x, idx, w)
            assert rel_err(out, reference_layer(layer, x, idx, w)) < tolerance(tokens), (group_size, tokens)


def test_prefill_tall_row_blocks(monkeypatch):
    """Many rows per expert (300): the prefill path's blocks of 256 rows (PREFILL_TALL), mixed bit-widths."""
    from moecompress.runtime.cuda import experts as cuda_experts, launch

    monkeypatch.setattr(launch, "HOPPER_PREFILL", False)  # sm90's kernel takes blocks up to 128 rows
    assert launch.prefill_rows(1200, 4) == 256
    layer = random_experts(4, 256, 128, [2, 3, 4, 8], seed=11)
    x = activations(600, 256, seed=5)
    idx, w = routing(600, 4, 2, "cuda", seed=4)
    out = cuda_experts.forward(layer, x, idx, w)
    assert rel_err(out, reference_layer(layer, x, idx, w)) < 1e-2


def test_group_entry_matches_dequantized_matmul():
    """PackedGroup.linear on CUDA (the kernel registry's ("cuda", bits, path) entries), rows of some slots only."""
    layer = random_experts(6, 256, 128, [2, 3, 4, 8, 3, 2], seed=3)
    for group in layer.gate_up.children():
        w = dequantized_weights(group, torch.bfloat16)
        for rows in (1, 5, 70):
            chunks = [torch.randn(rows, 256, device="cuda").to(torch.bfloat16) for _ in group.experts]
            outs = group.linear(list(range(len(chunks))), chunks)
            for s, (c, o) in enumerate(zip(chunks, outs)):
                assert rel_err(o, c.float() @ w[s].t()) < 1e-2


def test_small_routing_tables_equal_the_torch_ones():
    from moecompress.runtime.cuda import routing as r

    gen = torch.Generator().manual_seed(0)
    for pairs, positions in ((1, 5), (8, 128), (128, 128), (64, 8), (32, 40)):
        keys = torch.randint(0, positions + 1, (pairs,), generator=gen)
        keys = keys.cuda()
        if int(torch.bincount(keys, minlength=positions + 1)[:positions].max()) > 16:
            continue
        small, big = r.build(keys, positions, 16, small=True), r.build_torch(keys, positions, 16)
        assert torch.equal(small.order, big.order)
        assert torch.equal(small.first, big.first.clamp(max=small.blocks.shape[0]))
        n = small.blocks.shape[0]
        used = small.blocks[:, 0] < positions
        assert torch.equal(small.blocks[used], big.blocks[:n][used])
        assert (big.blocks[n:, 0] == positions).all()


@pytest.mark.parametrize("tokens", [1, 4, 64])  # the pair path, then the prefill path
def test_cuda_graph_replay_equals_eager(tokens):
    layer = random_experts(16, 256, 128, [2, 3, 4, 3] * 4, seed=5)
    x = activations(tokens, 256, seed=6)
    idx, w = routing(tokens, 16, 4, "cuda", seed=1)
    static = [x.clone(), idx.clone(), w.clone()]
    with torch.no_grad():
        layer(*static)  # compiles the kernels (outside the capture)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(*static)
        for seed in (2, 3):  # new inputs into the captured buffers
            x2 = activations(tokens, 256, seed=7)
            idx2, w2 = routing(tokens, 16, 4, "cuda", seed=seed)
            for buf, new in zip(static, (x2, idx2, w2)):
                buf.copy_(new)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, layer(x2, idx2, w2))


@pytest.mark.parametrize("fast", [True, False])
def test_pair_plan_calls_after_the_first_equal_the_reference(fast, monkeypatch):
    """The pair path's plan (pairs.py): the first call launches through Triton, later ones the compiled kernels
    directly (launcher.py; fast=False: always through Triton); new inputs every call, one of them views whose data
    is not 16-byte aligned (Triton's own path for that call), the split-K and the unsplit gate."""
    from moecompress.runtime.cuda import launcher

    monkeypatch.setattr(launcher, "FAST_LAUNCH", fast)
    for group_size in (32, 128):  # K 256: 8 groups (split K) / 2 groups (gate fused into pair_kernel)
        layer = random_experts(8, 256, 128, [2, 3, 4, 8, 3, 2, 4, 8], group_size=group_size, seed=group_size)
        for call in range(4):
            x = activations(2, 256, seed=8 + call)
            idx, w = routing(2, 8, 3, "cuda", seed=call)
            if call == 3:  # int64 ids and float32 weights 8 / 4 bytes past a 16-byte boundary
                idx = torch.cat([idx.new_zeros(1), idx.reshape(-1)])[1:].view(2, 3)
                w = torch.cat([w.new_zeros(1), w.reshape(-1)])[1:].view(2, 3)
                assert idx.data_ptr() % 16 and w.data_ptr() % 16
            out = layer(x, idx, w)
            assert rel_err(out, reference_layer(layer, x, idx, w)) < tolerance(2), (group_size, call)
        plans = list(layer._cuda_pair_plans.values())
        assert len(plans) == 1 and (plans[0].first._compiled is not None) == fast


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("tokens,pair", [(2, True), (8, False), (16, False)])
def test_few_large_experts_take_the_tables_path(tokens, pair, gated, monkeypatch):
    """More than launch.PAIR_MAX_MEAN_ROWS pairs per expert (here 2; 4 experts, top-2: above 4 tokens) and the pair
    path's extra reads above PAIR_DENSE_MIN_BYTES (here 0): the routing tables (each expert's rows one block, its
    bytes read once; the DECODE_DENSE tile) instead of the pair path; same function, with the gate in torch or fused
    into the first projection (DECODE_GATED)."""
    from moecompress.runtime.cuda import launch

    monkeypatch.setattr(launch, "PAIR_MAX_MEAN_ROWS", 2)
    monkeypatch.setattr(launch, "PAIR_DENSE_MIN_BYTES", 0)
    monkeypatch.setattr(launch, "DECODE_GATED", gated)
    layer = random_experts(4, 256, 128, [2, 3, 4, 8], seed=13)
    x = activations(tokens, 256, seed=9)
    idx, w = routing(tokens, 4, 2, "cuda", seed=tokens)
    out = layer(x, idx, w)
    assert rel_err(out, reference_layer(layer, x, idx, w)) < tolerance(tokens)
    assert bool(getattr(layer, "_cuda_pair_plans", None)) == pair


def test_small_experts_keep_the_pair_path(monkeypatch):
    """Above PAIR_MAX_MEAN_ROWS pairs per expert but with the pair path's extra reads below PAIR_DENSE_MIN_BYTES
    (4 small experts, 16 tokens, top-2: 28 x 55 KB = 1.5 MB): the pair path (a launch-bound layer); same function."""
    from moecompress.runtime.cuda import launch

    monkeypatch.setattr(launch, "PAIR_MAX_MEAN_ROWS", 2)
    monkeypatch.setattr(launch, "PAIR_DENSE_MIN_BYTES", 16e6)
    layer = random_experts(4, 256, 128, [2, 3, 4, 8], seed=13)
    x = activations(16, 256, seed=9)
    idx, w = routing(16, 4, 2, "cuda", seed=16)
    out = layer(x, idx, w)
    assert rel_err(out, reference_layer(layer, x, idx, w)) < tolerance(16)
    assert layer._cuda_pair_plans


@pytest.mark.parametrize("gated", [True, False])
def test_prefill_gate_fused_or_not(gated, monkeypatch):
    """packed_kernel's prefill with SiLU(gate) * up fused into the first projection (GATED) or the model's gate in
    torch: row blocks up to 128 (PREFILL) and of 256 (PREFILL_TALL), symmetric group 32, every packed bit-width."""
    from moecompress.runtime.cuda import experts as cuda_experts, launch, routing as cuda_routing

    monkeypatch.setattr(launch, "PREFILL_GATED", gated)
    monkeypatch.setattr(launch, "PREFILL_TALL_GATED", gated)
    monkeypatch.setattr(launch, "HOPPER_PREFILL", False)  # packed_kernel here (test_hopper_prefill: sm90's)
    layer = random_experts(4, 384, 160, [3, 2, 8, 4], group_size=32, symmetric=True, seed=12)
    assert cuda_experts.prefill_gate_fused(layer, cuda_routing.proj_groups(layer.gate_up)[0])
    for tokens in (40, 600):
        x = activations(tokens, 384, seed=11)
        idx, w = routing(tokens, 4, 2, "cuda", seed=tokens)
        out = cuda_experts.forward(layer, x, idx, w)
        assert rel_err(out, reference_layer(layer, x, idx, w)) < 1e-2, tokens


def _hopper_reason() -> str | None:
    """None where the sm90 prefill kernel (runtime/cuda/hopper.py, Gluon) runs, else why not."""
    if not cuda.available():
        return cuda.unavailable_reason()
    if torch.cuda.get_device_capability() != (9, 0):
        return f"hopper.py needs an sm90 GPU, this is sm{''.join(map(str, torch.cuda.get_device_capability()))}"
    from moecompress.runtime.cuda import launch

    return None if launch._gluon_imports() else "this Triton has no Gluon (triton.experimental.gluon)"


def _ran_hopper(layer, proj: str) -> bool:
    from moecompress.runtime.cuda import hopper

    return all(any(key[0] == id(hopper.wgmma_kernel) for key in group.__dict__.get("_cuda_launchers", {}))
               for group in getattr(layer, proj).children() if group.experts and group.bits != 16)


@pytest.mark.skipif(_hopper_reason() is not None, reason=f"{_hopper_reason()}")
@pytest.mark.parametrize("bits", [(2, 3, 4, 8), (4, 4, 4, 4), (3, 16, 2, 3)])
@pytest.mark.parametrize("group_size,symmetric", [(128, False), (32, True), (64, False)])
@pytest.mark.parametrize("gated", [True, False])
def test_hopper_prefill_matches_reference(bits, group_size, symmetric, gated, monkeypatch):
    """sm90's prefill (wgmma, dequantized weights as the register operand, K permuted per step of 128): every
    packed width, a bf16 group beside (packed_kernel), SiLU gate fused or not (then down's weighted store of two
    row tiles), row blocks of 16 and 128, output columns not a multiple of the tile (384 = 1.5 x 256)."""
    from moecompress.runtime.cuda import experts as cuda_experts, launch

    monkeypatch.setattr(launch, "HOPPER_PREFILL", True)
    monkeypatch.setattr(launch, "PREFILL_GATED", gated)
    layer = random_experts(4, 384, 384, list(bits), group_size=group_size, symmetric=symmetric, seed=group_size)
    for tokens in (40, 600):
        x = activations(tokens, 384, seed=12)
        idx, w = routing(tokens, 4, 2, "cuda", seed=tokens)
        out = cuda_experts.forward(layer, x, idx, w)
        assert rel_err(out, reference_layer(layer, x, idx, w)) < 1e-2, tokens
    assert _ran_hopper(layer, "gate_up") and _ran_hopper(layer, "down")


@pytest.mark.skipif(_hopper_reason() is not None, reason=f"{_hopper_reason()}")
def test_hopper_prefill_equals_packed_kernel_closely(monkeypatch):
    """The two prefill kernels on one layer (mixed widths, K 640 = 5 steps of 128; down K 160: packed_kernel for
    both; group 32): the same products in another order, so equal within bf16 rounding of the outputs."""
    from moecompress.runtime.cuda import experts as cuda_experts, launch

    layer = random_experts(4, 640, 160, [2, 3, 4, 8], group_size=32, seed=21)
    x = activations(300, 640, seed=13)
    idx, w = routing(300, 4, 2, "cuda", seed=5)
    outs = []
    for on in (False, True):
        monkeypatch.setattr(launch, "HOPPER_PREFILL", on)
        outs.append(cuda_experts.forward(layer, x, idx, w))
    assert _ran_hopper(layer, "gate_up") and not _ran_hopper(layer, "down")
    assert rel_err(outs[1], outs[0]) < 1e-2


@pytest.mark.skipif(_hopper_reason() is not None, reason=f"{_hopper_reason()}")
@pytest.mark.parametrize("group_size,symmetric", [(64, False), (32, True)])
def test_hopper_dequant_forms_equal(group_size, symmetric, monkeypatch):
    """hopper.py's two dequantizations (q in 1.0's mantissa + one fma; magic number + add + fma) give the same
    bf16 weights, so the same outputs bit for bit: every packed width (3 bits: the values across two words)."""
    from moecompress.runtime.cuda import experts as cuda_experts, launch

    monkeypatch.setattr(launch, "HOPPER_PREFILL", True)
    layer = random_experts(4, 384, 256, [2, 3, 4, 8], group_size=group_size, symmetric=symmetric, seed=7)
    x = activations(600, 384, seed=14)
    idx, w = routing(600, 4, 2, "cuda", seed=6)
    outs = []
    for mantissa in (False, True):
        monkeypatch.setattr(launch, "HOPPER_MANTISSA", mantissa)
        outs.append(cuda_experts.forward(layer, x, idx, w))
    assert _ran_hopper(layer, "gate_up") and _ran_hopper(layer, "down")
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[1], reference_layer(layer, x, idx, w)) < 1e-2


@pytest.mark.skipif(_hopper_reason() is not None, reason=f"{_hopper_reason()}")
@pytest.mark.parametrize("splits", [2, 3])
def test_hopper_split_k_matches(splits, monkeypatch):
    """Down projections split along K on sm90 (launch.hopper_split_k forced; K 1280 = 10 steps: splits of 5 + 5 or
    4 + 4 + 2 steps), each split into its own copy of the output, summed: equal to the unsplit kernel up to the
    rounding of each partial product to bf16, and close to the reference; every packed width, blocks of 16 and 128."""
    from moecompress.runtime.cuda import experts as cuda_experts, launch

    monkeypatch.setattr(launch, "HOPPER_PREFILL", True)
    layer = random_experts(4, 256, 1280, [2, 3, 4, 8], group_size=64, seed=11)
    for tokens in (40, 600):
        x = activations(tokens, 256, seed=16)
        idx, w = routing(tokens, 4, 2, "cuda", seed=tokens + 2)
        outs = []
        for k in (1, splits):
            monkeypatch.setattr(launch, "hopper_split_k", lambda *a, k=k: k)
            outs.append(cuda_experts.forward(layer, x, idx, w))
        assert rel_err(outs[1], outs[0]) < 5e-3, tokens
        assert rel_err(outs[1], reference_layer(layer, x, idx, w)) < 1e-2, tokens
    assert _ran_hopper(layer, "gate_up") and _ran_hopper(layer, "down")


def test_split_k_rule():
    """launch.split_k_for on Mixtral-8x7B's down projection (112 steps of K, 16 column programs, 132 SMs): a group
    of 2 of the 8 experts (~10 row blocks at 2048 tokens) splits in 4 (ceil(640 / 132) * 28 = 140 program-steps
    per SM against 2 * 112 = 224), all 8 experts (40 blocks: 5 waves either way) do not split; short K never."""
    from moecompress.runtime.cuda.launch import split_k_for

    assert split_k_for(160, 112, 132, 128) == 4
    assert split_k_for(320, 112, 132, 128) == 2
    assert split_k_for(640, 112, 132, 128) == 1
    assert split_k_for(10, 12, 132, 128) == 1  # 12 steps: a split of 6 < 8 steps


def test_permute_k_order():
    """hopper.permute_k: column 16i + 8h + 2t + e of each block of 128 takes x's column 32t + 4i + 2h + e."""
    pytest.importorskip("triton.experimental.gluon", reason="hopper.py needs Triton's Gluon")
    from moecompress.runtime.cuda.hopper import permute_k

    x = torch.arange(2 * 256).view(2, 256)
    p = permute_k(x)
    for c in range(256):
        blk, cc = divmod(c, 128)
        i, h, t, e = cc // 16, (cc // 8) % 2, (cc // 2) % 4, cc % 2
        assert int(p[1, c]) == 256 + blk * 128 + 32 * t + 4 * i + 2 * h + e
