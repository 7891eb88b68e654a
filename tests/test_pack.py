"""Bit packing: exact round trips, exact sizes, the documented bit order, and dequantization of expert stacks."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moecompress.errors import MoecompressError
from moecompress.format.pack import PACK_BITS, dequantize, dequantize_unpacked, pack, unpack
from moecompress.format.sizes import packed_weight_bytes

fast = settings(max_examples=60, deadline=None)
lead_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


def random_q(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


@fast
@given(bits=st.sampled_from(PACK_BITS), lead=lead_shapes, blocks=st.integers(1, 16), seed=st.integers(0, 2**31))
def test_round_trip_is_exact_and_wastes_nothing(bits, lead, blocks, seed):
    n = 8 * blocks
    q = random_q(lead + (n,), bits, seed)
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == lead + (n * bits // 8,)
    assert packed.numel() == q.numel() * bits // 8
    assert torch.equal(unpack(packed, bits, n), q)


@fast
@given(bits=st.sampled_from(PACK_BITS), blocks=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_bit_order_is_little_endian_per_block_of_8(bits, blocks, seed):
    q = random_q((8 * blocks,), bits, seed)
    expected = b""
    for b in range(blocks):
        block = sum(int(v) << (i * bits) for i, v in enumerate(q[8 * b : 8 * b + 8]))
        expected += block.to_bytes(bits, "little")
    assert bytes(pack(q, bits).tolist()) == expected


def test_three_bit_block_by_hand():
    q = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    # 0b000_111_110_101_100_011_010_001, little-endian
    assert pack(q, 3).tolist() == [0b11010001, 0b01011000, 0b00011111]


@pytest.mark.parametrize("bits", PACK_BITS)
def test_packed_size_matches_byte_accounting(bits):
    out_features, in_features = 6, 40
    q = random_q((out_features, in_features), bits, 0)
    assert pack(q, bits).numel() == packed_weight_bytes(out_features, in_features, bits)


@pytest.mark.parametrize("bits", PACK_BITS)
@pytest.mark.parametrize("n", [1, 7, 12, 33])
def test_non_multiple_of_8_raises(bits, n):
    with pytest.raises(MoecompressError, match="multiple of 8"):
        pack(torch.zeros(3, n, dtype=torch.uint8), bits)
    with pytest.raises(MoecompressError, match="multiple of 8"):
        unpack(torch.zeros(3, n * bits // 8, dtype=torch.uint8), bits, n)


def test_rejects_bad_bits_dtype_and_range():
    q = torch.zeros(8, dtype=torch.uint8)
    for bits in (1, 5, 16):
        with pytest.raises(MoecompressError, match="bit-widths"):
            pack(q, bits)
    with pytest.raises(MoecompressError, match="uint8"):
        pack(q.to(torch.int32), 4)
    with pytest.raises(MoecompressError, match="does not fit in 3 bits"):
        pack(torch.full((8,), 8, dtype=torch.uint8), 3)
    with pytest.raises(MoecompressError, match="last dimension"):
        unpack(torch.zeros(5, dtype=torch.uint8), 4, 8)


@fast
@given(
    bits=st.sampled_from(PACK_BITS),
    experts=st.integers(1, 4),
    out_features=st.integers(1, 5),
    group_blocks=st.integers(1, 3),
    in_blocks=st.integers(1, 8),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_dequantize_stack_equals_each_expert(bits, experts, out_features, group_blocks, in_blocks, symmetric, seed):
    group_size, in_features = 8 * group_blocks, 8 * in_blocks  # the last group may be short
    groups = -(-in_features // group_size)
    g = torch.Generator().manual_seed(seed)
    q = random_q((experts, out_features, in_features), bits, seed)
    scales = (torch.rand(experts, out_features, groups, generator=g) + 0.01).to(torch.float16)
    zeros = None if symmetric else random_q((experts, out_features, groups), bits, seed + 1)
    packed = pack(q, bits)

    stack = dequantize(packed, scales, zeros, bits, group_size, in_features, torch.float32)
    assert stack.shape == (experts, out_features, in_features)
    for e in range(experts):
        one = dequantize(packed[e], scales[e], None if zeros is None else zeros[e], bits, group_size, in_features,
                         torch.float32)
        assert torch.equal(stack[e], one)

    # the formula itself: w[.., o, i] = (q - z) * s of input i's group
    group_of = torch.arange(in_features) // group_size
    z = float(1 << (bits - 1)) if zeros is None else zeros[..., group_of].float()
    assert torch.equal(stack, (q.float() - z) * scales[..., group_of].float())
    assert torch.equal(dequantize_unpacked(q, scales, zeros, bits, group_size, torch.float32), stack)


def test_dequantize_checks_metadata_shapes():
    q = torch.zeros(2, 16, dtype=torch.uint8)
    with pytest.raises(MoecompressError, match="scales of shape"):
        dequantize(pack(q, 4), torch.ones(2, 3, dtype=torch.float16), None, 4, 8, 16)
    with pytest.raises(MoecompressError, match="zeros of shape"):
        dequantize(pack(q, 4), torch.ones(2, 2, dtype=torch.float16), torch.zeros(2, 1, dtype=torch.uint8), 4, 8, 16)
