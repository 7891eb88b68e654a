"""The CUDA path choice for few-token MoE calls (launch.dense_decode), checked on the CPU: it is host arithmetic.

A layer with more than PAIR_MAX_MEAN_ROWS pairs per expert takes the routing-table path only where the pair path's
extra reads ((pairs - experts) x one expert's packed bytes) reach PAIR_DENSE_MIN_BYTES: Mixtral-8x7B at 16 tokens
stays on the tables path, refmoe-qwen3 (16 experts of 256 x 128) at 16 rows takes the pair path.
"""
from __future__ import annotations

import pytest

from moecompress.runtime.cuda import experts as cuda_experts
from moecompress.runtime.cuda import launch


def packed_bytes(out_f: int, in_f: int, bits: float, group_size: int) -> float:
    """One projection of one expert: packed words, float16 scales and uint8 zeros."""
    return out_f * in_f * bits / 8 + (2 + 1) * out_f * in_f / group_size


@pytest.fixture
def adopted(monkeypatch):
    monkeypatch.setattr(launch, "PAIR_MAX_MEAN_ROWS", 2.0)
    monkeypatch.setattr(launch, "PAIR_DENSE_MIN_BYTES", 32e6)


def test_mixtral_at_16_tokens_stays_on_the_tables_path(adopted):
    expert = packed_bytes(2 * 14336, 4096, 2, 128) + packed_bytes(4096, 14336, 2, 128)  # the cheapest: 2-bit
    assert expert > 40e6
    assert launch.dense_decode(16 * 2, 8, expert)
    assert launch.dense_decode(9 * 2, 8, expert)  # 18 pairs > 16: (18 - 8) x 46 MB re-read
    assert not launch.dense_decode(8 * 2, 8, expert)  # 2 pairs per expert: the pair path as before


def test_small_experts_at_16_rows_take_the_pair_path(adopted):
    expert = packed_bytes(256, 256, 4, 64) + packed_bytes(256, 128, 4, 64)  # refmoe-qwen3 at 4 bits: 55 KB
    assert (64 - 16) * expert < 3e6
    assert not launch.dense_decode(16 * 4, 16, expert)
    assert launch.dense_decode(16 * 4, 16, 1000 * expert)  # 55 MB experts: 48 x 55 MB re-read
    assert launch.dense_decode(16 * 4, 16, 20e6)


def test_zero_bytes_threshold_is_the_rows_rule(monkeypatch):
    monkeypatch.setattr(launch, "PAIR_MAX_MEAN_ROWS", 2.0)
    monkeypatch.setattr(launch, "PAIR_DENSE_MIN_BYTES", 0.0)
    assert launch.dense_decode(64, 16, 1.0) and not launch.dense_decode(32, 16, 1e12)


def test_expert_bytes_of_a_mixed_layer():
    """experts._expert_bytes: the packed bytes of the layer's groups (words, scales, zeros) over its experts."""
    from test_cuda_kernels import random_experts

    bits = [2, 3, 4, 8]
    layer = random_experts(4, 256, 128, bits, group_size=64, device="cpu")
    want = sum(packed_bytes(256, 256, b, 64) + packed_bytes(256, 128, b, 64) for b in bits) / 4
    assert cuda_experts._expert_bytes(layer) == pytest.approx(want, rel=1e-9)


def test_prefill_dequant_rule(monkeypatch):
    """launch.prefill_dequant: dequant.py where the mean rows per computed expert reach PREFILL_DEQUANT_MIN_ROWS and the
    mean bits per weight are at most PREFILL_DEQUANT_MAX_BITS (Mixtral-8x7B at 2,048 tokens: 512 rows; Qwen3-30B-A3B:
    128), never when PREFILL_DEQUANT is off."""
    monkeypatch.setattr(launch, "PREFILL_DEQUANT", True)
    monkeypatch.setattr(launch, "PREFILL_DEQUANT_MIN_ROWS", 512.0)
    monkeypatch.setattr(launch, "PREFILL_DEQUANT_MAX_BITS", 3.5)
    assert launch.prefill_dequant(2048 * 2, 8, 3.0)  # Mixtral mix 2/3/4: 512 rows per expert
    assert not launch.prefill_dequant(2048 * 2, 8, 4.0)  # Mixtral 4-bit
    assert not launch.prefill_dequant(1024 * 2, 8, 3.0)  # 256 rows per expert
    assert not launch.prefill_dequant(2048 * 8, 128, 3.0)  # Qwen3-30B-A3B: 128 rows per expert
    assert launch.prefill_dequant(1024 * 2, 4, 3.0)  # a bundle computing 4 of the 8 experts: 512 rows per expert
    monkeypatch.setattr(launch, "PREFILL_DEQUANT", False)
    assert not launch.prefill_dequant(2048 * 2, 8, 3.0)


def test_mean_bits_of_a_layer():
    """experts.mean_bits: bits per weight over the first projection's experts, bf16 groups counting 16."""
    from test_cuda_kernels import random_experts

    assert cuda_experts.mean_bits(random_experts(4, 64, 32, [2, 3, 4, 3], group_size=32, device="cpu")) == 3.0
    assert cuda_experts.mean_bits(random_experts(4, 64, 32, [2, 16, 4, 2], group_size=32, device="cpu",
                                                 held=[0, 1])) == 9.0
