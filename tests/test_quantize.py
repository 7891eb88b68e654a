"""RTN and GPTQ: error bounds, degenerate groups, idempotence, GPTQ vs RTN on a correlated Hessian, fallbacks."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moecompress.errors import MoecompressError
from moecompress.format.pack import dequantize, dequantize_values
from moecompress.quantize.gptq import gptq_quantize, layer_output_error
from moecompress.quantize.rtn import fake_quantize, quant_params, quantize_rtn, quantize_values

BITS = (2, 3, 4, 8)


def per_input(t, group_size):
    return t.repeat_interleave(group_size, dim=-1).float()


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    symmetric=st.booleans(),
    magnitude=st.floats(1e-7, 1e4),
    shift=st.floats(-2, 2),
    seed=st.integers(0, 2**31),
)
def test_rtn_error_at_most_half_a_step(bits, symmetric, magnitude, shift, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(6, 64, generator=g) + shift) * magnitude  # shift: groups that are all positive or negative
    qw = quantize_rtn(w, bits, 16, symmetric)
    assert qw.q.dtype == torch.uint8 and qw.q.shape == w.shape and int(qw.q.max()) < 1 << bits
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (6, 4)
    assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
    if symmetric:
        assert qw.zeros is None
    else:
        assert qw.zeros.dtype == torch.uint8 and qw.zeros.shape == (6, 4)
    step = per_input(qw.scales, 16)
    err = (w - qw.dequantize(torch.float32)).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-6 * w.abs().max()).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_matches_quant_params_and_stored_format(bits, symmetric):
    w = torch.randn(5, 32, dtype=torch.bfloat16)
    qw = quantize_rtn(w, bits, 8, symmetric)
    scales, zeros = quant_params(w.reshape(5, 4, 8), bits, symmetric)
    assert torch.equal(qw.scales, scales)
    assert (qw.zeros is None) if symmetric else torch.equal(qw.zeros, zeros)
    # what the runtime reads back from the packed format is exactly what was optimised
    via_format = dequantize(qw.packed(), qw.scales, qw.zeros, bits, 8, 32, torch.float32)
    assert torch.equal(via_format, qw.dequantize(torch.float32))
    assert torch.equal(fake_quantize(w, bits, 8, symmetric), via_format.to(torch.bfloat16))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_symmetric_levels(bits):
    half = 1 << (bits - 1)
    w = torch.linspace(-1, 1, 64).reshape(1, 64)
    qw = quantize_rtn(w, bits, 64, symmetric=True)
    assert float(qw.scales[0, 0]) == pytest.approx(1 / (half - 1), rel=1e-3)
    levels = (qw.q.int() - half).unique()
    assert levels.min() >= -half and levels.max() == half - 1


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_constant_and_zero_rows_give_no_nan(bits, symmetric):
    w = torch.stack([torch.zeros(32), torch.full((32,), 0.37), torch.full((32,), -2.5), torch.full((32,), 1e-9)])
    qw = quantize_rtn(w, bits, 16, symmetric)
    w_hat = qw.dequantize(torch.float32)
    assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat[0], torch.zeros(32))
    assert ((w - w_hat).abs() <= per_input(qw.scales, 16) / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_idempotent(bits):
    """float32: symmetric is exactly idempotent; asymmetric is exactly idempotent on every group whose integers reach
    the top level 2**bits-1 (almost all). A group whose rounded zero point leaves the top level unused re-quantizes to
    a slightly smaller range, moving its values by at most half a step. (In bf16 the dequantized values are rounded
    again, so neither holds exactly there.)"""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(bits))
    once = fake_quantize(w, bits, 64, symmetric=True)
    assert torch.equal(fake_quantize(once, bits, 64, symmetric=True), once)

    qw = quantize_rtn(w, bits, 64, symmetric=False)
    once = qw.dequantize(torch.float32)
    twice = fake_quantize(once, bits, 64, symmetric=False)
    full = qw.q.reshape(256, 4, 64).amax(-1) == (1 << bits) - 1  # [out, groups]
    assert full.float().mean() > 0.85
    changed = (twice != once).reshape(256, 4, 64).any(-1)
    assert not (changed & full).any()
    assert ((twice - once).abs() <= per_input(qw.scales, 64) / 2 * (1 + 1e-5)).all()


def test_fake_quantize_16_bits_is_identity_and_rtn_refuses_it():
    w = torch.randn(4, 16, dtype=torch.bfloat16)
    assert fake_quantize(w, 16, 8, False) is w
    with pytest.raises(MoecompressError, match="16 means kept in bf16"):
        quantize_rtn(w, 16, 8, False)


def test_bad_arguments_raise():
    with pytest.raises(MoecompressError, match="not a multiple of group_size"):
        quantize_rtn(torch.randn(4, 24), 4, 16, False)
    with pytest.raises(MoecompressError, match="NaN or inf"):
        quantize_rtn(torch.tensor([[float("nan")] * 8]), 4, 8, False)
    with pytest.raises(MoecompressError, match="hessian of shape"):
        gptq_quantize(torch.randn(4, 16), torch.eye(8), 4, 8, False)


# ---------------------------------------------------------------- GPTQ


def correlated_layer(out_features=64, in_features=128, samples=512, seed=0):
    """W and H = X^T X / N for inputs X = Z A mixed by a random matrix A (correlated features)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, in_features, generator=g)
    a = torch.randn(in_features, in_features, generator=g) / in_features**0.5
    x = z @ a  # [N, in]
    return torch.randn(out_features, in_features, generator=g), x.T @ x / samples


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_beats_rtn_on_layer_output_error(bits, act_order, symmetric):
    w, h = correlated_layer()
    rtn = quantize_rtn(w, bits, 32, symmetric)
    rtn_error = layer_output_error(w, rtn.dequantize(torch.float32), h)
    res = gptq_quantize(w, h, bits, 32, symmetric, act_order=act_order)
    assert res.fallback is None
    assert res.loss == pytest.approx(layer_output_error(w, res.weight.dequantize(torch.float32), h), rel=1e-6)
    assert res.loss < 0.95 * rtn_error
    assert res.weight.scales.shape == (64, 4) and res.weight.q.shape == (64, 128)


def textbook_gptq(w, h, bits, group_size, symmetric, damp=0.01):
    """Unblocked GPTQ in float64 with an explicit inverse Hessian, downdated after each column (no Cholesky)."""
    w, h = w.double().clone(), h.double()
    hinv = torch.linalg.inv(h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype))
    w_hat = torch.zeros_like(w)
    for j in range(w.shape[1]):
        if j % group_size == 0:
            scales, zeros = quant_params(w[:, j : j + group_size], bits, symmetric)
        q = quantize_values(w[:, j], scales, zeros, bits)
        w_hat[:, j] = dequantize_values(q, scales, zeros, bits).double()
        err = (w[:, j] - w_hat[:, j]) / hinv[j, j]
        w[:, j + 1 :] -= torch.outer(err, hinv[j, j + 1 :])
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return w_hat.float()


@pytest.mark.parametrize("block_size", [16, 48, 128])
def test_lazy_blocks_match_textbook_gptq(block_size):
    w, h = correlated_layer(out_features=16, in_features=64, seed=3)
    expected = textbook_gptq(w, h, 3, 16, symmetric=False)
    got = gptq_quantize(w, h, 3, 16, False, block_size=block_size).weight.dequantize(torch.float32)
    assert (got != expected).float().mean() < 0.01  # float32 vs float64 may flip a rare rounding tie
    assert layer_output_error(w, got, h) == pytest.approx(layer_output_error(w, expected, h), rel=1e-3)


def test_act_order_keeps_contiguous_static_groups():
    w, h = correlated_layer(out_features=16, in_features=64, seed=4)
    res = gptq_quantize(w, h, 4, 16, False, act_order=True)
    static = quantize_rtn(w, 4, 16, False)  # static groups: parameters of the original weight groups
    assert torch.equal(res.weight.scales, static.scales) and torch.equal(res.weight.zeros, static.zeros)


@pytest.mark.parametrize("symmetric", [False, True])
def test_zero_hessian_falls_back_to_rtn(symmetric):
    w = torch.randn(8, 32)
    res = gptq_quantize(w, torch.zeros(32, 32), 3, 16, symmetric)
    rtn = quantize_rtn(w, 3, 16, symmetric)
    assert res.fallback and "zero" in res.fallback
    assert torch.equal(res.weight.q, rtn.q) and torch.equal(res.weight.scales, rtn.scales)
    assert res.loss == 0.0  # no token reached the layer: nothing measurable was lost


def test_non_finite_hessian_falls_back_to_rtn():
    w, h = correlated_layer(out_features=8, in_features=32)
    h[3, 5] = float("inf")
    res = gptq_quantize(w, h, 4, 16, False)
    assert res.fallback and "NaN or inf" in res.fallback
    assert torch.equal(res.weight.q, quantize_rtn(w, 4, 16, False).q)
    assert res.loss != res.loss  # nan: no meaningful objective under a non-finite Hessian


def test_unfactorable_hessian_falls_back_to_rtn():
    w = torch.randn(8, 32)
    res = gptq_quantize(w, -torch.eye(32), 4, 16, False)  # negative definite: Cholesky fails at 1x and 10x damping
    assert res.fallback and "Cholesky" in res.fallback
    assert torch.equal(res.weight.q, quantize_rtn(w, 4, 16, False).q)
    assert res.loss == pytest.approx(layer_output_error(w, res.weight.dequantize(torch.float32), -torch.eye(32)))


def test_rank_deficient_hessian_is_handled_by_damping():
    """Rank 16 of 128 (X = Z A with Z of 16 columns): damping makes H positive definite, so GPTQ runs (no fallback),
    gives finite weights and still beats RTN."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 128, generator=g)  # [N, in], rank 16
    h = x.T @ x / 512
    w = torch.randn(32, 128, generator=g)
    res = gptq_quantize(w, h, 3, 32, False)
    assert res.fallback is None
    assert torch.isfinite(res.weight.dequantize(torch.float32)).all() and torch.isfinite(res.weight.scales).all()
    rtn = quantize_rtn(w, 3, 32, False)
    assert res.loss < layer_output_error(w, rtn.dequantize(torch.float32), h)


def test_dead_inputs_get_zero_weight():
    w, h = correlated_layer(out_features=8, in_features=32)
    dead = [2, 17]
    h[dead, :] = 0
    h[:, dead] = 0
    res = gptq_quantize(w, h, 4, 16, False)
    assert res.fallback is None
    w_hat = res.weight.dequantize(torch.float32)
    assert torch.equal(w_hat[:, dead], torch.zeros(8, 2))
    assert torch.isfinite(w_hat).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
def test_nn_linear_8_6(bits, act_order):
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 6).to(torch.bfloat16)
    x = torch.randn(256, 8) @ torch.randn(8, 8)  # [N, in]
    h = x.T @ x / 256
    res = gptq_quantize(linear.weight.detach(), h, bits, 8, False, act_order=act_order)
    assert res.fallback is None
    assert res.weight.q.shape == (6, 8) and res.weight.scales.shape == (6, 1) and res.weight.zeros.shape == (6, 1)
    assert res.weight.packed().shape == (6, bits)
    w_hat = res.weight.dequantize(torch.bfloat16)
    assert w_hat.dtype == torch.bfloat16 and torch.isfinite(w_hat.float()).all()
    y, y_hat = x @ linear.weight.float().T, x @ w_hat.float().T
    assert ((y - y_hat).norm() / y.norm()) < {2: 0.6, 3: 0.3, 4: 0.15, 8: 0.01}[bits]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_never_worse_than_minmax_per_group(bits, symmetric):
    from moecompress.format.pack import dequantize_values
    from moecompress.quantize.rtn import CLIP_GRID, clipped_params

    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 6, 32, generator=gen) ** 3  # heavy tails: clipping pays
    importance = torch.rand(32, generator=gen)

    def err(s, z):
        zz = None if z is None else z[..., None]
        d = dequantize_values(quantize_values(w, s[..., None], zz, bits), s[..., None], zz, bits) - w
        return (d * d * importance).sum(-1)

    s, z = clipped_params(w, bits, symmetric, importance)
    best = err(s, z)
    assert bool((best <= err(*quant_params(w, bits, symmetric)) + 1e-6).all())
    assert float(best.sum()) < 0.98 * float(err(*quant_params(w, bits, symmetric)).sum())
    # every chosen parameter pair is one of the grid's candidates
    cands = [quant_params(w, bits, symmetric, shrink) for shrink in CLIP_GRID]
    match = torch.zeros_like(best, dtype=torch.bool)
    for cs, cz in cands:
        match |= (cs == s) & (True if z is None else (cz == z))
    assert bool(match.all())


def test_mse_clip_through_rtn_gptq_and_options():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen) ** 3
    x = torch.randn(512, 64, generator=gen)
    h = x.T @ x
    mse = gptq_quantize(w, h, 2, 32, False, clip="mse").loss
    assert mse < gptq_quantize(w, h, 2, 32, False, clip="minmax").loss
    rtn = lambda clip: float(((w - quantize_rtn(w, 2, 32, False, clip).dequantize(torch.float32)) ** 2).sum())  # noqa: E731
    assert rtn("mse") < rtn("minmax")
    with pytest.raises(MoecompressError, match="clip 'p99'; allowed: minmax, mse"):
        quantize_rtn(w, 2, 32, False, "p99")
    from moecompress.quantize.stage import QuantizeOptions

    with pytest.raises(MoecompressError, match="quantize clip"):
        QuantizeOptions(clip="p99")
