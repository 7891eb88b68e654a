"""The low-bit CPU kernels without AMX (runtime/kernels/cpu_lowbit.py, csrc/lowbit/) and the kernel registry.

Every ISA this CPU has is checked, and always the portable C++ one (forced), so that the kernels' arithmetic is
covered on any CPU. Tolerances:
- decode (int8 activations): against x_hat @ W^T in float64, x_hat = dx * xq the activations as the kernel quantized
  them: float32 summation only, |err| <= 1e-5 * sum|x_hat| |W|. Against the float reference x @ W^T: the bound of
  the int8 rounding, sum over groups of dx / 2 * sum|W| (|x - x_hat| <= dx / 2), plus the same float32 slack.
- prefill (dequantized tiles): tiles equal (q - z) * s exactly; outputs within float32 summation (float32 tiles) or
  2^-8 relative per product (bfloat16 tiles and x).
"""
from __future__ import annotations

import random

import pytest
import torch

from moecompress.errors import MoecompressError
from moecompress.format.pack import dequantize, pack
from moecompress.runtime.kernels import cpu_features, cpu_lowbit, kernel_registry
from moecompress.runtime.experts import packed_group
from moecompress.runtime.experts.packed_group import PackedGroup

SIMD = ("cpu:avx2", "cpu:avx512_vnni")


def isas() -> list[str]:
    """The low-bit kernel ISAs to check here: portable always, the SIMD ones this CPU has."""
    if not cpu_lowbit.available():
        pytest.skip("no C++ compiler: the low-bit kernels are not built (the torch-ops paths are tested elsewhere)")
    return ["cpu:portable", *(i for i in SIMD if cpu_features.detect().has(i))]


def weights(bits: int, symmetric: bool, n_exp: int, out_f: int, in_f: int, group: int, gen: torch.Generator):
    """Packed random weights and their float64 dequantized reference [n_exp, out, in]."""
    q = torch.randint(0, 1 << bits, (n_exp, out_f, in_f), generator=gen).to(torch.uint8)
    scales = (torch.rand(n_exp, out_f, in_f // group, generator=gen) * 0.1 + 0.005).half()
    zeros = None if symmetric else torch.randint(0, 1 << bits, (n_exp, out_f, in_f // group), generator=gen).to(torch.uint8)
    qweight = pack(q, bits)
    return qweight, scales, zeros, dequantize(qweight, scales, zeros, bits, group, in_f, torch.float64)


def x_hat(x: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The activations as the decode kernels quantize them (float64 [R, k]) and dx [R, k/group]."""
    xq, dx, _ = cpu_lowbit.quantize_rows(x, group, bits, "cpu:portable")
    r, k = x.shape
    return (xq.double().view(r, k // group, group) * dx.double().unsqueeze(-1)).view(r, k), dx.double()


def per_slot(x: torch.Tensor, w: torch.Tensor, slots: list[int], counts: list[int]) -> torch.Tensor:
    return torch.cat([xs @ w[s].t() for s, xs in zip(slots, x.split(counts))])


def check_decode(y, x, w, slots, counts, group, bits):
    xh, dx = x_hat(x, group, bits)
    want = per_slot(xh, w, slots, counts)
    slack = 1e-5 * per_slot(xh.abs(), w.abs(), slots, counts) + 1e-12
    assert ((y.double() - want).abs() <= slack).all()
    # against the float activations: within the int8 rounding bound
    w_abs_groups = w.abs().view(*w.shape[:2], -1, group).sum(-1)  # [N, out, groups]
    bound = per_slot(dx / 2, w_abs_groups, slots, counts) + 2 * slack
    assert ((y.double() - per_slot(x.double(), w, slots, counts)).abs() <= bound).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_decode_kernels_equal_the_reference_with_the_same_int8_activations(bits, symmetric, group):
    gen = torch.Generator().manual_seed(bits * 100 + group + symmetric)
    qweight, scales, zeros, w = weights(bits, symmetric, 4, 72, 2 * group, group, gen)
    # out of order, repeated, an empty slot, odd row counts (1, 3, 5: partial 4-row tiles)
    slots, counts = [3, 0, 2, 0, 1], [5, 1, 0, 3, 7]
    x = torch.randn(sum(counts), 2 * group, generator=gen) * torch.rand(1, 2 * group, generator=gen) * 3
    for isa in isas():
        y = cpu_lowbit.decode(x, qweight, scales, zeros, bits, group, slots, counts, isa)
        assert y.dtype == torch.float32 and y.shape == (sum(counts), 72)
        check_decode(y, x, w, slots, counts, group, bits)
        # bf16 x: quantized from its float32 value, output rounded to bf16
        xb = x.to(torch.bfloat16)
        yb = cpu_lowbit.decode(xb, qweight, scales, zeros, bits, group, slots, counts, isa)
        assert yb.dtype == torch.bfloat16
        ref = cpu_lowbit.decode(xb.float(), qweight, scales, zeros, bits, group, slots, counts, isa)
        assert torch.equal(yb, ref.to(torch.bfloat16))


def test_activation_quantization():
    isa_list = isas()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 256, generator=gen) * 4
    x[1, 64:128] = 0  # an all-zero group: dx 0, xq 0
    for bits in (2, 3, 4, 8):
        xq, dx, isum = cpu_lowbit.quantize_rows(x, 64, bits, "cpu:portable")
        assert xq.abs().max() <= 127 and dx[1, 1] == 0 and (xq[1, 64:128] == 0).all()
        err = (x.view(5, 4, 64) - xq.view(5, 4, 64).float() * dx.unsqueeze(-1)).abs()
        assert (err <= dx.unsqueeze(-1) * (0.5 + 1e-5)).all()
        assert torch.equal(isum, xq.view(5, 4, 64).sum(-1, dtype=torch.int32))
        order = cpu_lowbit.block_order(bits)
        assert sorted(order.tolist()) == list(range(32))
        for isa in isa_list[1:]:  # SIMD: the same integers, each block in the kernels' lane order
            sq, sdx, ssum = cpu_lowbit.quantize_rows(x, 64, bits, isa)
            blocks = sq.view(5, 8, 32)
            assert torch.equal(blocks[..., order], xq.view(5, 8, 32)) and torch.equal(sdx, dx) and torch.equal(ssum, isum)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_prefill_tiles_are_the_exact_weights_and_products_match(bits, symmetric):
    gen = torch.Generator().manual_seed(bits + 10 * symmetric)
    group = 64
    qweight, scales, zeros, w = weights(bits, symmetric, 3, 40, 192, group, gen)
    slots, counts = [2, 1, 0], [9, 0, 20]
    x = torch.randn(sum(counts), 192, generator=gen)
    for isa in isas():
        tile = cpu_lowbit.dequant_tile(qweight, scales, zeros, bits, group, 2, (3, 29), isa)
        want = w[2, 3:29].float()
        if isa != "cpu:portable":  # tile columns in block order: block b, lane order[i] holds input 32b + i
            want = want.view(26, -1, 32)[..., torch.argsort(cpu_lowbit.block_order(bits))].reshape(26, 192)
        assert torch.equal(tile, want)
        for tile_rows in (16, 128):  # partial strips, and one strip per slot
            y = cpu_lowbit.prefill(x, qweight, scales, zeros, bits, group, slots, counts, isa, torch.float32, tile_rows)
            ref = per_slot(x.double(), w, slots, counts)
            assert ((y.double() - ref).abs() <= 1e-5 * per_slot(x.double().abs(), w.abs(), slots, counts) + 1e-12).all()
        xb = x.to(torch.bfloat16)
        y = cpu_lowbit.prefill(xb, qweight, scales, zeros, bits, group, slots, counts, isa, torch.bfloat16, 16)
        ref = per_slot(xb.double(), w.float().to(torch.bfloat16).double(), slots, counts)
        bound = 2**-8 * (ref.abs() + per_slot(xb.double().abs(), w.abs(), slots, counts) * 2**-7) + 1e-6
        assert y.dtype == torch.bfloat16 and ((y.double() - ref).abs() <= bound).all()


def test_prefill_under_inference_mode_with_two_threads():
    """Worker threads must carry the caller's inference mode (an inference output tensor is written there)."""
    gen = torch.Generator().manual_seed(5)
    qweight, scales, zeros, w = weights(4, False, 2, 300, 128, 64, gen)
    x = torch.randn(64, 128, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for isa in isas():
            want = cpu_lowbit.prefill(x, qweight, scales, zeros, 4, 64, [0, 1], [30, 34], isa, torch.float32, 16)
            with torch.inference_mode():
                got = cpu_lowbit.prefill(x, qweight, scales, zeros, 4, 64, [0, 1], [30, 34], isa, torch.float32, 16)
            assert torch.equal(got, want)
    finally:
        torch.set_num_threads(threads)


def test_random_shapes_and_thread_counts():
    """Group sizes, widths, repeated and empty slots, 1-3 threads: decode and prefill on every ISA here."""
    isa_list, rng, threads = isas(), random.Random(0), torch.get_num_threads()
    gen = torch.Generator().manual_seed(11)
    try:
        for _ in range(12):
            torch.set_num_threads(rng.choice([1, 2, 3]))
            bits, g, symmetric = rng.choice([2, 3, 4, 8]), rng.choice([32, 64, 128]), rng.random() < 0.5
            k, n, e = g * rng.choice([1, 3]), rng.choice([8, 65, 130]), rng.choice([1, 4])
            qweight, scales, zeros, w = weights(bits, symmetric, e, n, k, g, gen)
            slots = [rng.randrange(e) for _ in range(rng.randint(1, 5))]
            counts = [rng.choice([0, 1, 2, 3, 17]) for _ in slots]
            x = torch.randn(sum(counts), k, generator=gen)
            for isa in isa_list:
                y = cpu_lowbit.decode(x, qweight, scales, zeros, bits, g, slots, counts, isa)
                if sum(counts):
                    check_decode(y, x, w, slots, counts, g, bits)
                    yp = cpu_lowbit.prefill(x, qweight, scales, zeros, bits, g, slots, counts, isa, torch.float32, 32)
                    ref = per_slot(x.double(), w, slots, counts)
                    assert ((yp.double() - ref).abs() <= 1e-5 * per_slot(x.double().abs(), w.abs(), slots, counts) + 1e-12).all()
                else:
                    assert y.shape == (0, n)
    finally:
        torch.set_num_threads(threads)


def test_kernels_refuse_bad_slots_and_offsets():
    isas()
    gen = torch.Generator().manual_seed(3)
    qweight, scales, zeros, _ = weights(4, False, 2, 8, 64, 32, gen)
    x = torch.zeros(3, 64)
    with pytest.raises(RuntimeError, match="slot out of range"):
        cpu_lowbit.decode(x, qweight, scales, zeros, 4, 32, [2], [3], "cpu:portable")
    with pytest.raises(RuntimeError, match="starts"):
        cpu_lowbit.prefill(x, qweight, scales, zeros, 4, 32, [0, 1], [2, 2], "cpu:portable", torch.float32)
    with pytest.raises(RuntimeError, match="group"):
        cpu_lowbit.decode(torch.zeros(1, 64), qweight, scales, zeros, 4, 16, [0], [1], "cpu:portable")


# -- the registry and PackedGroup ----------------------------------------------------------------------------------
def make_group(bits: int, symmetric: bool, gen: torch.Generator, n: int = 5, in_f: int = 128, out_f: int = 96):
    group = PackedGroup(tuple(range(n)), bits, in_f, out_f, 32, symmetric, True, dtype=torch.bfloat16)
    qweight, scales, zeros, w = weights(bits, symmetric, n, out_f, in_f, 32, gen)
    group.qweight.copy_(qweight)
    group.scales.copy_(scales)
    if zeros is not None:
        group.zeros.copy_(zeros)
    group.bias.copy_(torch.randn(n, out_f, generator=gen))
    return group, w


def test_every_isa_has_a_kernel_for_every_bit_width_and_path():
    for isa in cpu_features.ISA_ORDER:
        for bits in (2, 3, 4, 8):
            for path in kernel_registry.PATHS:
                assert kernel_registry.KERNELS[(isa, bits, path)], (isa, bits, path)


def test_forcing_an_isa(monkeypatch):
    features = cpu_features.detect()
    assert cpu_features.best_isa(features) == next(i for i in cpu_features.ISA_ORDER if features.has(i))
    monkeypatch.setenv(cpu_features.ISA_ENV, "cpu:portable")
    assert cpu_features.best_isa() == "cpu:portable"
    monkeypatch.setenv(cpu_features.ISA_ENV, "cpu:sse9")
    with pytest.raises(MoecompressError, match="not an ISA"):
        cpu_features.best_isa()
    lacking = cpu_features.CpuFeatures("x86_64", frozenset({"avx2", "fma", "f16c"}))  # an AVX2-only CPU
    monkeypatch.setenv(cpu_features.ISA_ENV, "cpu:avx512_vnni")
    with pytest.raises(MoecompressError, match="lacks"):
        cpu_features.best_isa(lacking)
    monkeypatch.delenv(cpu_features.ISA_ENV)
    assert cpu_features.best_isa(lacking) == "cpu:avx2"
    assert cpu_features.compute_dtype(lacking) == torch.float32
    assert cpu_features.compute_dtype(cpu_features.CpuFeatures("x86_64", frozenset({"avx512_bf16"}))) == torch.bfloat16
    arm = cpu_features.CpuFeatures("aarch64", frozenset({"asimd", "asimddp"}))
    assert cpu_features.best_isa(arm) == "cpu:neon_dotprod"
    assert cpu_features.best_isa(cpu_features.CpuFeatures("aarch64", frozenset({"asimd"}))) == "cpu:portable"
    assert not cpu_features.CpuFeatures("x86_64", arm.flags | {"avx2"}).has("cpu:neon_dotprod")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_packed_group_runs_the_registry_kernels_of_each_isa(bits, symmetric, monkeypatch):
    """PackedGroup on every ISA here but AMX (forced): bf16 decode rows take q8_*, many rows tile_mm_*, mixed runs split;
    float32 takes the exact tiles unless int8 activations are asked for."""
    gen = torch.Generator().manual_seed(20 + bits + symmetric)
    group, w = make_group(bits, symmetric, gen)
    counts = [3, 0, 20, 1, 0]  # a slot of many rows between decode slots
    x = torch.randn(sum(counts), 128, generator=gen)
    hit = [s for s, c in enumerate(counts) if c]
    rows = [counts[s] for s in hit]
    want = per_slot(x.double(), w, hit, rows) + group.bias[hit].double().repeat_interleave(torch.tensor(rows), 0)
    scale = want.abs().max()
    min_in = kernel_registry.Q8_PREFILL_MIN_IN
    for isa in isas():
        monkeypatch.setenv(cpu_features.ISA_ENV, isa)
        group.prepare(torch.bfloat16)
        assert "qweight" in group._buffers  # the format's packing is kept (no int4 layout without AMX)
        name = isa.removeprefix("cpu:")
        assert kernel_registry.select(bits, "decode", group, torch.bfloat16).name == f"q8_{name}"
        tile = "tile_mm_portable" if isa == "cpu:portable" else "tile_mm_avx2"
        monkeypatch.setattr(kernel_registry, "Q8_PREFILL_MIN_IN", 129)  # in_features 128 below it: tiles
        assert kernel_registry.select(bits, "prefill", group, torch.bfloat16).name == tile
        assert kernel_registry.select(bits, "prefill", group, torch.float32).name == tile
        monkeypatch.setattr(kernel_registry, "Q8_PREFILL_MIN_IN", 128)  # AVX2: int8 at every row count from there
        prefill = f"q8_{name}" if isa in kernel_registry.Q8_PREFILL_ISAS else tile
        assert kernel_registry.select(bits, "prefill", group, torch.bfloat16).name == prefill
        assert kernel_registry.select(bits, "prefill", group, torch.float32).name == tile
        monkeypatch.setattr(kernel_registry, "Q8_PREFILL_MIN_IN", 129)
        assert kernel_registry.select(bits, "prefill", group, torch.bfloat16).name == tile
        monkeypatch.setattr(kernel_registry, "Q8_PREFILL_MIN_IN", min_in)
        assert kernel_registry.select(bits, "decode", group, torch.float32).name == tile
        for min_rows in (None, 16, 0, 10**9):  # the kernel's own crossover, a split at slot 2, all tiles, all q8
            monkeypatch.setattr(packed_group, "PREFILL_MIN_ROWS", min_rows)
            got = group.linear_sorted(x.to(torch.bfloat16), counts)
            assert got.dtype == torch.bfloat16 and (got.double() - want).abs().max() < 3e-2 * scale
            got = group.linear_sorted(x, counts)  # float32: exact tiles
            assert (got.double() - want).abs().max() < 1e-5 * scale
        monkeypatch.setenv(kernel_registry.INT8_ACTIVATIONS_ENV, "always")
        assert kernel_registry.select(bits, "decode", group, torch.float32).name == f"q8_{name}"
        got = group.linear_sorted(x[:3], [3, 0, 0, 0, 0])
        check_decode(got - group.bias[0], x[:3], w, [0], [3], 32, bits)
        monkeypatch.delenv(kernel_registry.INT8_ACTIVATIONS_ENV)
    monkeypatch.setenv(kernel_registry.INT8_ACTIVATIONS_ENV, "sometimes")
    with pytest.raises(MoecompressError, match="allowed"):
        kernel_registry.select(bits, "decode", group, torch.bfloat16)


def test_groups_the_kernels_cannot_take_fall_back():
    """A group size the low-bit kernels do not take (not a multiple of 32) computes by dequantization."""
    group = PackedGroup((0, 1), 4, 48, 8, 16, True, False, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (2, 8, 48), generator=gen).to(torch.uint8)
    group.qweight.copy_(pack(q, 4))
    group.scales.copy_((torch.rand(2, 8, 3, generator=gen) + 0.1).half())
    for dtype in (torch.float32, torch.bfloat16):
        kernel = kernel_registry.select(4, "decode", group, dtype, isa="cpu:portable")
        assert kernel.name in ("int4", "dequant")
    x = torch.randn(3, 48, generator=gen)
    want = x.double() @ group.dequantized([1], torch.float64)[0].t()
    assert (group.linear_sorted(x, [0, 3]).double() - want).abs().max() < 1e-5 * want.abs().max()
