"""allocate/robust.py: per-domain costs, shrinkage toward the group curve, tempered shares, leave-one-domain-out."""
import math

import numpy as np
import pytest

from moecompress.allocate.allocation import choose
from moecompress.allocate.robust import (DomainCosts, estimate, leave_one_domain_out, mixture, popularity,
                                        worst_domain_costs)
from moecompress.errors import MoecompressError

BITS = (2, 3, 4, 8)


def two_domains() -> DomainCosts:
    # 3 items in group 0, 1 item in group 1; damage sums over the domain's tokens
    damage = np.array([[[8., 4, 2, 0], [4, 2, 1, 0], [0, 0, 0, 0], [6, 3, 1, 0]],
                       [[2., 1, 1, 0], [4, 2, 1, 0], [2, 1, 0, 0], [2, 1, 1, 0]]])  # [D=2, n=4, B=4]
    rows = np.array([[4., 2, 0, 5], [2, 2, 2, 3]])  # [D, n]
    return DomainCosts(("a", "b"), BITS, np.array([0, 0, 0, 1]), damage, rows, np.array([10., 30.]))


def test_kappa_zero_tau_one_is_the_pooled_measured_cost():
    dc = two_domains()
    np.testing.assert_allclose(estimate(dc), dc.damage.sum(0) / 40.0, rtol=1e-12)
    keep = np.array([True, False])
    np.testing.assert_allclose(estimate(dc, keep=keep), dc.damage[0] / 10.0, rtol=1e-12)


def test_shrinkage_by_hand():
    dc = two_domains()
    # group 0 pooled: damage [20, 10, 5, 0] over 12 rows; item 0: damage [10, 5, 3, 0] over 6 rows; kappa = 6
    prior = np.array([20., 10, 5, 0]) / 12
    per_row = (np.array([10., 5, 3, 0]) + 6 * prior) / (6 + 6)
    np.testing.assert_allclose(estimate(dc, kappa=6.0)[0], (12 / 40) * (6 / 12) * per_row, rtol=1e-12)
    # kappa = inf: every item of the group has the group's curve times its share
    inf = estimate(dc, kappa=math.inf)
    np.testing.assert_allclose(inf[:3], (12 / 40) * np.outer([6 / 12, 4 / 12, 2 / 12], prior), rtol=1e-12)
    # the unrouted item of domain a alone gets the prior per row and a zero share
    only_a = estimate(dc, kappa=0.0, keep=np.array([True, False]))
    np.testing.assert_allclose(only_a[2], 0.0)


def test_tau_zero_shares_the_layer_alike_and_keeps_the_total_rows():
    dc = two_domains()
    flat = estimate(dc, kappa=math.inf, tau=0.0)
    np.testing.assert_allclose(flat[0], flat[1], rtol=1e-12)
    np.testing.assert_allclose(flat[:3].sum(0), estimate(dc, kappa=math.inf)[:3].sum(0), rtol=1e-12)
    half = estimate(dc, kappa=math.inf, tau=0.5)
    shares = np.sqrt([6., 4, 2]) / np.sqrt([6., 4, 2]).sum()
    np.testing.assert_allclose(half[:3, 0] / half[:3, 0].sum(), shares, rtol=1e-12)


def test_popularity_is_share_times_four_to_minus_bits():
    dc = two_domains()
    pop = popularity(dc)
    np.testing.assert_allclose(pop[0], 0.5 * 4.0 ** -np.array(BITS))
    np.testing.assert_allclose(pop[3], 1.0 * 4.0 ** -np.array(BITS))


def test_bad_inputs_raise_our_error():
    dc = two_domains()
    with pytest.raises(MoecompressError, match="shapes disagree"):
        DomainCosts(("a",), BITS, dc.group, dc.damage, dc.rows, dc.tokens)
    with pytest.raises(MoecompressError, match="kappa"):
        estimate(dc, kappa=-1.0)
    with pytest.raises(MoecompressError, match="tau"):
        estimate(dc, tau=2.0)


def synthetic(noise: float, seed: int = 0) -> tuple[DomainCosts, np.ndarray, list[int]]:
    """40 items of one group, 8 domains; per-row damage = item factor x 4^-bits x per-domain noise."""
    rng = np.random.default_rng(seed)
    n, d = 40, 8
    factor = np.exp(rng.normal(0, 1.0, n))  # real, text-independent differences between items
    rows = np.full((d, n), 100.0)
    noise_f = np.exp(rng.normal(0, noise, (d, n)))
    damage = rows[..., None] * (factor * noise_f)[..., None] * 4.0 ** -np.array(BITS, dtype=float)
    dc = DomainCosts(tuple("abcdefgh"), BITS, np.zeros(n, dtype=int), damage, rows, np.full(d, 100.0))
    nbytes = np.tile(np.array(BITS, dtype=np.int64) * 100, (n, 1))
    return dc, nbytes, [n * 250, n * 300]


def test_lodo_keeps_the_measured_costs_when_they_carry():
    dc, nbytes, budgets = synthetic(noise=0.0)
    val = leave_one_domain_out(dc, nbytes, budgets, [0.0, 100.0, math.inf], [1.0, 0.5])
    assert val.best == (0.0, 1.0)
    assert val.scores[(0.0, 1.0)] < math.log(0.9)  # the measured costs beat popularity by > 10 % on every held-out
    assert val.scores[(math.inf, 1.0)] == pytest.approx(0.0, abs=1e-12)  # equal shares, 4^-bits curve: = popularity


def test_lodo_shrinks_when_the_item_differences_are_text_noise():
    dc, nbytes, budgets = synthetic(noise=0.0)
    pure_noise = DomainCosts(dc.domains, dc.bits, dc.group,
                             dc.damage / dc.damage[0, :, :1][None] * np.exp(
                                 np.random.default_rng(1).normal(0, 1.5, (8, 40)))[..., None] * 4.0 ** -2,
                             dc.rows, dc.tokens)
    val = leave_one_domain_out(pure_noise, nbytes, budgets, [0.0, 100.0, math.inf], [1.0])
    assert val.best[0] > 0.0
    assert val.scores[val.best] < val.scores[(0.0, 1.0)]
    assert len(val.per_domain[(0.0, 1.0)]) == 8


def test_worst_domain_plan_protects_the_domain_the_pooled_plan_sacrifices():
    # domain a has 10x the damage of b; upgrading item 0 saves 9/16 of a's damage, item 1 9/16 of b's, item 2 5/16
    # of each: the sum prefers item 0, the worst domain item 2
    damage = np.array([[[10., 1], [0, 0], [6, 1]], [[0., 0], [1, 0.1], [0.6, 0.1]]])  # [D=2, n=3, B=2]
    dc = DomainCosts(("a", "b"), (2, 3), np.zeros(3, dtype=int), damage, np.ones((2, 3)), np.ones(2))
    nbytes = np.array([[2, 3]] * 3, dtype=np.int64)
    valid = np.ones(nbytes.shape, dtype=bool)
    ref = np.zeros(3, dtype=int)  # every item at 2 bits
    pooled = choose(nbytes, estimate(dc), valid, 7, "milp").choice
    assert pooled.tolist() == [1, 0, 0]  # domain a's damage dominates the sum: b is left at its reference damage
    cost, weights = worst_domain_costs(dc, ref, nbytes, 7)
    assert weights.sum() == pytest.approx(1.0) and (weights > 0).all()
    robust = choose(nbytes, cost, valid, 7, "milp").choice
    assert robust.tolist() == [0, 0, 1]
    worst = max(dc.truth(d)[np.arange(3), robust].sum() / dc.truth(d)[np.arange(3), ref].sum() for d in range(2))
    assert worst == pytest.approx(11 / 16)  # both domains at 11/16 of their reference damage; pooled's worst is 1
    with pytest.raises(MoecompressError, match="steps"):
        worst_domain_costs(dc, ref, nbytes, 7, steps=0)


def test_mixture_at_the_token_shares_is_the_pooled_cost_and_one_hot_is_one_domain():
    dc = two_domains()
    np.testing.assert_allclose(mixture(dc, dc.tokens), estimate(dc), rtol=1e-12)
    np.testing.assert_allclose(mixture(dc, np.array([0., 5.])), dc.damage[1] / 30.0, rtol=1e-12)
    # equal weights: the mean of the two domains' per-token costs
    np.testing.assert_allclose(mixture(dc, np.array([1., 1.])), (dc.damage[0] / 10 + dc.damage[1] / 30) / 2,
                               rtol=1e-12)
    for bad in (np.array([1.]), np.array([-1., 2.]), np.array([0., 0.]), np.array([np.nan, 1.])):
        with pytest.raises(MoecompressError, match="mixture weights"):
            mixture(dc, bad)
