"""The runtime's compute paths on one PackedGroup: every bit-width, both 4-bit CPU paths, chunking, bias, round trip.

MOECOMPRESS_CPU_ISA=cpu:torch (the `int4_layout` fixture) forces the torch-ops / PyTorch int4 paths, and thereby the
int4 layout, on every CPU; tests/test_cpu_kernels.py covers the low-bit kernels of the other ISAs."""
from __future__ import annotations

import pytest
import torch

from moecompress.format.pack import dequantize, pack
from moecompress.runtime.kernels import cpu_features, cpu_int4, kernel_registry
from moecompress.runtime.experts import packed_group
from moecompress.runtime.experts.packed_group import PackedGroup

IN, OUT, GROUP = 128, 128, 32
COUNTS = [5, 0, 70, 1, 0, 3]  # rows per slot: empty slots, a single row, one slot past the dequant threshold


def make_group(bits: int, symmetric: bool = False, bias: bool = True, n: int = len(COUNTS), seed: int = 0):
    """A float32 PackedGroup with random integers, scales, zeros and bias, and its reference weights [n, out, in]."""
    gen = torch.Generator().manual_seed(seed)
    group = PackedGroup(tuple(range(10, 10 + n)), bits, IN, OUT, GROUP, symmetric, bias, dtype=torch.float32)
    if bits == 16:
        group.weight.copy_(torch.randn(n, OUT, IN, generator=gen))
        ref = group.weight.clone()
    else:
        q = torch.randint(0, 1 << bits, (n, OUT, IN), generator=gen).to(torch.uint8)
        group.qweight.copy_(pack(q, bits))
        group.scales.copy_((torch.rand(n, OUT, IN // GROUP, generator=gen) * 0.1 + 0.01).half())
        zeros = None
        if not symmetric:
            zeros = torch.randint(0, 1 << bits, (n, OUT, IN // GROUP), generator=gen).to(torch.uint8)
            group.zeros.copy_(zeros)
        ref = dequantize(group.qweight, group.scales, zeros, bits, GROUP, IN, torch.float32)
    if bias:
        group.bias.copy_(torch.randn(n, OUT, generator=gen))
    return group, ref


# The C++ module of cpu_kernels.py (-march=native, ~90 s to build) serves the int4 layout (the cpu:torch ISA, forced by
# the `int4_layout` fixture) on AMX CPUs only: elsewhere its tests skip before building it, and the int4 layout runs
# the torch ops.
NO_AMX = None if cpu_features.detect().has("cpu:amx") else (
    "no AMX on this CPU: the int4 layout's C++ kernels (cpu_kernels.py) serve AMX CPUs only and are not built here")


@pytest.fixture
def int4_layout(monkeypatch):
    """The registry's torch-ops ISA: 4-bit groups convert to PyTorch's int4 layout at prepare() on every CPU (the
    C++ int4 kernels only where AMX exists: NO_AMX)."""
    monkeypatch.setenv(cpu_features.ISA_ENV, "cpu:torch")
    if NO_AMX:
        from moecompress.runtime.kernels import cpu_kernels

        monkeypatch.setattr(cpu_kernels, "available", lambda: False)


def reference(x: torch.Tensor, counts: list[int], ref_w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    outs = []
    for s, xs in enumerate(x.split(counts)):
        if len(xs):
            outs.append(xs @ ref_w[s].t() + (0 if bias is None else bias[s]))
    return torch.cat(outs)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("isa", [None, "cpu:torch"])
def test_every_path_matches_the_dequantized_reference(bits, symmetric, isa, monkeypatch):
    """float32: the CPU's own kernels (exact tiles for float32 x) and the torch-ops / int4 paths."""
    if isa:
        monkeypatch.setenv(cpu_features.ISA_ENV, isa)
    group, ref_w = make_group(bits, symmetric)
    group.prepare(torch.float32)
    x = torch.randn(sum(COUNTS), IN, generator=torch.Generator().manual_seed(1))
    want = reference(x, COUNTS, ref_w, group.bias)
    for min_rows, chunk in ((48, 1 << 24), (48, IN * OUT), (0, 1 << 24), (0, IN * OUT), (10**9, 1 << 24)):
        monkeypatch.setattr(packed_group, "DEQUANT_MIN_ROWS", min_rows)
        monkeypatch.setattr(packed_group, "DEQUANT_CHUNK", chunk)  # IN * OUT: one slot per chunk
        got = group.linear_sorted(x, COUNTS)
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_amx_keeps_every_width_in_the_formats_packing():
    """On AMX CPUs no width converts to PyTorch's int4 layout: the whole-model CPU decode step (runtime/cpu_step/)
    takes packed groups only, and 4-bit groups in the int4 layout sent every 4-bit model's decode to transformers."""
    for bits in (2, 3, 4, 8):
        for path in kernel_registry.PATHS:
            assert {k.layout for k in kernel_registry.KERNELS[("cpu:amx", bits, path)]} == {"packed"}, (bits, path)


def test_linear_keeps_the_callers_order():
    group, ref_w = make_group(8)
    gen = torch.Generator().manual_seed(2)
    chunks = [torch.randn(m, IN, generator=gen) for m in (3, 1, 4)]
    outs = group.linear([4, 0, 2], chunks)
    for s, x, y in zip([4, 0, 2], chunks, outs):
        assert torch.allclose(y, x @ ref_w[s].t() + group.bias[s], atol=1e-4)


def test_unpack_blocked_reads_the_int4_kernel_layout():
    block = cpu_int4.block_layout(OUT, IN)
    if block is None:
        pytest.skip("PyTorch packs int4 in another layout on this CPU (the int4 kernel alone is used)")
    q = torch.randint(0, 16, (3, OUT, IN), generator=torch.Generator().manual_seed(3)).to(torch.uint8)
    packed = torch.stack([cpu_int4.pack_int4(m) for m in q])
    assert torch.equal(cpu_int4.unpack_blocked(packed, block).transpose(-2, -1), q)
    assert torch.equal(cpu_int4.unpack_int4(packed[1], IN, GROUP), q[1])


def test_prepared_int4_group_is_its_packed_size_and_saves_exactly(int4_layout):
    group, _ = make_group(4, bias=False)
    before = {k: v.clone() for k, v in group.state_dict().items()}
    group.prepare(torch.bfloat16)
    if group._int4 is None:
        pytest.skip("no CPU int4 kernel in this PyTorch build")
    assert "qweight" not in group._buffers  # the format's copy is dropped, not duplicated
    assert group.int4_weight.numel() == before["qweight"].numel()
    after = group.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    group.prepare(torch.bfloat16)  # idempotent


def cpp_kernels():
    """cpu_kernels, or a skip where the C++ kernels cannot run here."""
    from moecompress.runtime.kernels import cpu_kernels

    if NO_AMX:
        pytest.skip(NO_AMX)
    if not cpu_int4.available() or cpu_int4.block_layout(OUT, IN) is None:
        pytest.skip("no blocked CPU int4 layout on this CPU")
    if not cpu_kernels.available():
        pytest.skip("no C++ compiler: the torch-ops dequantization is used (covered above)")
    return cpu_kernels


def test_one_pass_cpp_dequantization_matches_the_formula_and_the_bf16_path(int4_layout, monkeypatch):
    kernels = cpp_kernels()
    monkeypatch.setattr(kernels, "amx", lambda: False)  # the dequantize + grouped matmul path, also on AMX CPUs
    group, ref_w = make_group(4, bias=False)
    group.prepare(torch.bfloat16)
    slots = [0, 2, 5]
    got = group._weights_t(slots, torch.bfloat16)  # [3, in, out], the C++ kernel
    sz = group.int4_sz[slots].to(torch.bfloat16).float()  # [3, in/g, out, 2]
    s, shift = sz[..., 0].repeat_interleave(GROUP, 1), (sz[..., 1] - 8 * sz[..., 0]).repeat_interleave(GROUP, 1)
    q_t = group._int4_integers(slots).transpose(-2, -1).float()  # [3, in, out]
    assert torch.equal(got, (q_t * s + shift).to(torch.bfloat16))  # exactly the formula, rounded once
    assert (got.float() - ref_w[slots].transpose(-2, -1)).abs().max() < 2e-2 * ref_w.abs().max()
    # the whole group through both dequantization paths, in bf16
    x = torch.randn(sum(COUNTS), IN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    monkeypatch.setattr(packed_group, "FAST_DEQUANT_MIN_ROWS", 0)
    fast = group.linear_sorted(x, COUNTS).float()
    monkeypatch.setenv("MOECOMPRESS_NO_CPP", "1")
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(packed_group, "DEQUANT_MIN_ROWS", 0)
    slow = group.linear_sorted(x, COUNTS).float()
    want = reference(x.float(), COUNTS, ref_w, None)
    assert (fast - want).abs().max() < 3e-2 * want.abs().max()
    assert (fast - slow).abs().max() < 2e-2 * want.abs().max()


def test_fused_amx_kernel_equals_a_matmul_with_the_dequantized_weights(int4_layout, monkeypatch):
    kernels = cpp_kernels()
    if not kernels.amx():
        pytest.skip("no AMX BF16 on this CPU (or the OS does not grant it): dequantize + grouped matmul is used")
    group, ref_w = make_group(4, bias=False)
    group.prepare(torch.bfloat16)
    assert group._fused(torch.bfloat16) and not group._fused(torch.float32)
    gen = torch.Generator().manual_seed(4)
    # slots out of order, an empty one, a partial 16-row tile, several tiles, and a last slot whose tile would run
    # past the end of x
    slots, counts = [4, 1, 0, 3, 5], [17, 0, 1, 40, 3]
    x = torch.randn(sum(counts), IN, generator=gen).to(torch.bfloat16)
    got = kernels.int4_mm(x, group.int4_weight, group.int4_sz, slots, counts, group._int4_block, GROUP)
    w_t = group._weights_t(slots, torch.bfloat16).float()  # the same bf16 weights (tested exact above)
    want = torch.cat([xs.float() @ w_t[i] for i, xs in enumerate(x.split(counts)) if len(xs)])
    # float32 sums of exact bf16 products, rounded once to bf16: within half a bf16 ulp plus summation-order slack
    assert ((got.float() - want).abs() <= 2**-8 * want.abs() + 1e-4 * want.abs().max()).all()
    # the group: the fused kernel for its big slots, PyTorch's int4 kernel for the small ones, in the right order
    x = torch.randn(sum(COUNTS), IN, generator=gen).to(torch.bfloat16)
    want = reference(x.float(), COUNTS, ref_w, None)
    for min_rows in (0, packed_group.FUSED_MIN_ROWS, 10**9):
        monkeypatch.setattr(packed_group, "FUSED_MIN_ROWS", min_rows)
        got = group.linear_sorted(x, COUNTS).float()
        assert (got - want).abs().max() < 3e-2 * want.abs().max()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fused_packed_kernel_equals_a_matmul_with_the_dequantized_weights(bits, symmetric):
    kernels = cpp_kernels()
    if not kernels.amx():
        pytest.skip("no AMX BF16 on this CPU (or the OS does not grant it): dequantize + grouped matmul is used")
    group, ref_w = make_group(bits, symmetric)  # not prepared: the format's own packing
    gen = torch.Generator().manual_seed(5)
    slots, counts = [4, 1, 0, 3, 5], [17, 0, 1, 40, 3]  # as above; x tiles are zero-padded, never read past x
    x = torch.randn(sum(counts), IN, generator=gen).to(torch.bfloat16)
    zeros = None if symmetric else group.zeros
    got = kernels.packed_mm(x, group.qweight, group.scales, zeros, bits, GROUP, slots, counts)
    w = group.dequantized(slots, torch.bfloat16).float()  # [5, out, in], (q - z) * s rounded once to bf16
    want = torch.cat([xs.float() @ w[i].t() for i, xs in enumerate(x.split(counts)) if len(xs)])
    assert ((got.float() - want).abs() <= 2**-8 * want.abs() + 1e-4 * want.abs().max()).all()
    # the group takes this path for bf16 inputs, bias included
    x = torch.randn(sum(COUNTS), IN, generator=gen).to(torch.bfloat16)
    assert kernel_registry.select(bits, "prefill", group, torch.bfloat16, layout="packed").name == "packed_amx"
    assert kernel_registry.select(bits, "prefill", group, torch.float32, layout="packed").name != "packed_amx"
    assert kernel_registry.select(bits, "decode", group, torch.bfloat16, layout="packed").name == "q8_avx512_vnni"
    want = reference(x.float(), COUNTS, ref_w, group.bias)
    assert (group.linear_sorted(x, COUNTS).float() - want).abs().max() < 3e-2 * want.abs().max()


def test_fused_kernels_on_random_shapes_and_thread_counts():
    """Both fused kernels against the exact bf16 weights: group sizes, widths, repeated and empty slots, 1-3 threads."""
    import random

    kernels = cpp_kernels()
    if not kernels.amx():
        pytest.skip("no AMX BF16 on this CPU (or the OS does not grant it)")
    rng, threads = random.Random(0), torch.get_num_threads()
    try:
        for _ in range(16):
            torch.set_num_threads(rng.choice([1, 2, 3]))
            bits, g = rng.choice([2, 3, 4, 8]), rng.choice([32, 64, 128])
            k, n, e = g * rng.choice([1, 3]), 64 * rng.choice([1, 3]), rng.choice([1, 4])
            q = torch.randint(0, 1 << bits, (e, n, k), dtype=torch.uint8)
            s = (torch.rand(e, n, k // g) * 0.1 + 1e-3).half()
            z = None if rng.random() < 0.5 else torch.randint(0, 1 << bits, (e, n, k // g), dtype=torch.uint8)
            slots = [rng.randrange(e) for _ in range(rng.randint(1, 5))]
            counts = [rng.choice([0, 1, 16, 17, 33]) for _ in slots]
            counts[0] = max(counts[0], 1)
            x = torch.randn(sum(counts), k).to(torch.bfloat16)
            zf = torch.full_like(s, 1 << (bits - 1), dtype=torch.float32) if z is None else z.float()
            w = ((q.float() - zf.repeat_interleave(g, -1)) * s.float().repeat_interleave(g, -1)).to(torch.bfloat16)
            want = torch.cat([xs.float() @ w[sl].float().t() for sl, xs in zip(slots, x.split(counts)) if len(xs)])
            got = kernels.packed_mm(x, pack(q, bits), s, z, bits, g, slots, counts).float()
            assert ((got - want).abs() <= 2**-8 * want.abs() + 1e-4 * want.abs().max()).all()
            if bits == 4 and cpu_int4.block_layout(n, k) == 64:  # the int4 layout's own (bf16 scale, zero) numbers
                packed = torch.stack([cpu_int4.pack_int4(m) for m in q])
                sz = cpu_int4.scales_and_zeros(s, z, torch.bfloat16)
                got = kernels.int4_mm(x, packed, sz, slots, counts, 64, g).float()
                assert (got - want).abs().max() < 2e-2 * want.abs().max()
    finally:
        torch.set_num_threads(threads)


def test_kernels_refuse_bad_slots_and_offsets(int4_layout):
    """Slot ids outside the stacked experts, or row offsets that do not cover x, are errors, never stray reads."""
    kernels = cpp_kernels()
    group, _ = make_group(4, bias=False)
    group.prepare(torch.bfloat16)
    with pytest.raises(RuntimeError, match="slot out of range"):
        kernels.dequant_blocked(group.int4_weight, group.int4_sz, [0, len(COUNTS)], group._int4_block, GROUP)
    if not kernels.amx():
        pytest.skip("no AMX BF16 on this CPU: the fused kernels are not built")
    x = torch.zeros(3, IN, dtype=torch.bfloat16)
    raw, _ = make_group(2, bias=False)
    with pytest.raises(RuntimeError, match="slot out of range"):
        kernels.packed_mm(x, raw.qweight, raw.scales, raw.zeros, 2, GROUP, [-1], [3])
    with pytest.raises(RuntimeError, match="starts"):
        kernels.int4_mm(x, group.int4_weight, group.int4_sz, [0, 1], [2, 2], group._int4_block, GROUP)


def test_pack_blocked_is_the_layout_unpack_blocked_reads():
    q = torch.randint(0, 16, (3, OUT, IN), generator=torch.Generator().manual_seed(6)).to(torch.uint8)
    packed = cpu_int4.pack_blocked(q, 64)
    assert packed.shape == (3, OUT, IN // 2)
    assert torch.equal(cpu_int4.unpack_blocked(packed, 64).transpose(-2, -1), q)
    if cpu_int4.block_layout(OUT, IN) == 64:  # PyTorch packs 64-row blocks on this CPU: the same bytes
        assert torch.equal(packed[1], cpu_int4.pack_int4(q[1]))


def dense_group(bits: int = 4, symmetric: bool = False):
    """A one-expert group (what PackedLinear is: attention, shared experts) and its reference weight [1, out, in]."""
    return make_group(bits, symmetric, bias=False, n=1, seed=7)


@pytest.fixture
def amx_forced(monkeypatch):
    """The registry's AMX rows, looked up on any CPU (the kernels themselves run on AMX CPUs only)."""
    from moecompress.runtime.kernels import cpu_kernels

    monkeypatch.setattr(cpu_features, "best_isa", lambda features=None: "cpu:amx")
    monkeypatch.setattr(cpu_kernels, "amx", lambda: True)


@pytest.mark.parametrize("opt_in", ["0", "1"])
def test_amx_dense_4bit_prefill_kernel_is_opt_in_and_decode_stays_q8(opt_in, amx_forced, monkeypatch):
    monkeypatch.setenv(kernel_registry.AMX_DENSE_INT4_ENV, opt_in)
    dense, _ = dense_group()
    experts, _ = make_group(4, bias=False)
    sel = lambda bits, path, group, dtype=torch.bfloat16: kernel_registry.select(bits, path, group, dtype).name
    assert sel(4, "prefill", dense) == ("int4_amx_dense" if opt_in == "1" else "packed_amx")
    assert sel(4, "prefill", experts) == "packed_amx"  # many experts: our packing's AMX kernel
    assert sel(2, "prefill", dense_group(2)[0]) == "packed_amx"
    assert sel(4, "prefill", dense, torch.float32) != "int4_amx_dense"
    assert sel(4, "decode", dense) == "q8_avx512_vnni"  # what the C++ decode step reads: the format's packing
    monkeypatch.setenv(kernel_registry.AMX_DENSE_INT4_ENV, "yes")
    with pytest.raises(Exception, match="MOECOMPRESS_AMX_DENSE_INT4"):
        sel(4, "prefill", dense)


@pytest.mark.parametrize("symmetric", [False, True])
def test_amx_dense_int4_copy_keeps_the_packed_weights_and_their_numbers(symmetric, amx_forced, monkeypatch):
    """prepare() adds the int4 prefill copy beside the format's packing: the same integers, (zero, scale) giving the
    same weights up to bf16 rounding of the scale, state_dict unchanged, idempotent."""
    monkeypatch.setenv(kernel_registry.AMX_DENSE_INT4_ENV, "1")
    group, ref_w = dense_group(symmetric=symmetric)
    before = {k: v.clone() for k, v in group.state_dict().items()}
    group.prepare(torch.bfloat16)
    assert "qweight" in group._buffers and group._int4 is None  # still a packed group for the decode kernels
    packed, sz = group.int4_copy_weight, group.int4_copy_sz
    q = cpu_int4.unpack_blocked(packed, 64).transpose(-2, -1)  # [1, out, in]
    from moecompress.format.pack import unpack

    assert torch.equal(q, unpack(group.qweight, 4, IN))
    s = sz[..., 0].float().transpose(-2, -1).repeat_interleave(GROUP, -1)  # [1, out, in]
    zero = sz[..., 1].float().transpose(-2, -1).repeat_interleave(GROUP, -1)
    w = q.float() * s + (zero - 8 * s)  # the int4 kernel's formula
    assert (w - ref_w).abs().max() <= 2**-7 * ref_w.abs().max()
    after = group.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    group.prepare(torch.bfloat16)
    assert group.int4_copy_weight is packed


@pytest.mark.parametrize("symmetric", [False, True])
def test_amx_dense_int4_prefill_equals_the_dequantized_reference(symmetric, monkeypatch):
    """On an AMX CPU: a dense 4-bit projection's prefill through the int4 copy, its decode through q8, vs float64."""
    kernels = cpp_kernels()
    if not kernels.amx():
        pytest.skip("no AMX BF16 on this CPU (or the OS does not grant it)")
    monkeypatch.setenv(kernel_registry.AMX_DENSE_INT4_ENV, "1")
    group, ref_w = dense_group(symmetric=symmetric)
    group.prepare(torch.bfloat16)
    decode, prefill = group._kernels(torch.bfloat16)
    assert (decode.name, prefill.name) == ("q8_avx512_vnni", "int4_amx_dense")
    gen = torch.Generator().manual_seed(8)
    for rows in (1, 5, 6, 17, 70):  # decode below AMX_MIN_ROWS, prefill from it; partial 16-row tiles
        x = torch.randn(rows, IN, generator=gen).to(torch.bfloat16)
        want = x.double() @ ref_w[0].double().t()
        got = group.linear_sorted(x, [rows]).double()
        assert (got - want).abs().max() < 3e-2 * want.abs().max(), rows
