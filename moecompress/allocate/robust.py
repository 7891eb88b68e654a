"""Costs that carry to new text: per-domain damages, shrunk toward a popularity prior, chosen by leave-one-domain-out.

The separable costs of loss_aware sensitivity are right on the text they are measured on but lose most of their lead
over popularity-only on other text (README, issue 13, session 25). Two estimates of an item's cost that trade a little
in-sample fit for less variance across text, both pure functions of the per-domain measurements:

- shrinkage (`kappa`, routed rows): an item's damage per routed row is pulled toward the pooled damage per row of its
  (layer, projection) group at the same bits, with the weight of `kappa` pseudo-rows (empirical Bayes, normal mean
  with a common prior): s_i(b) = (D_i(b) + kappa * s_group(b)) / (r_i + kappa). kappa = 0: the measured costs;
  kappa = inf: popularity with the group's measured bit curve.
- tempered routing share (`tau`): the expert's share of its layer's routed rows p_i becomes p_i^tau / sum p^tau
  (tau = 1: the measured share; tau = 0: every expert alike).

cost_i(b) = (rows of the layer / tokens) * p_i^(tau) * s_i(b): with kappa = 0 and tau = 1 it is exactly the pooled
measured cost sum_d D_i,d(b) / sum_d n_d. `leave_one_domain_out` picks (kappa, tau) on calibration text only: for each
domain d, allocate from the other domains' estimate and score the plan with domain d's own measured costs, as a ratio
to the popularity-only plan made from the same other domains.

`mixture` re-weighs the per-domain costs to another mix of the same domains (the evaluation text's, for the
oracle bound of the benchmark; never a method). A third estimate changes the objective instead: `worst_domain_costs` weighs each domain's costs, relative to a
reference plan's damage on that domain, by the weights of the worst-case mixture of domains (group DRO, solved by
multiplicative weights), so that no calibration domain is sacrificed for the others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moecompress.allocate.allocation import choose
from moecompress.errors import MoecompressError


@dataclass(frozen=True, eq=False)
class DomainCosts:
    """Per-domain measured damages of the items of one cost table, on one candidate set."""

    domains: tuple[str, ...]
    bits: tuple[int, ...]  # candidate bit-widths, the columns of `damage`
    group: np.ndarray  # [n] int: (layer, projection) group of each item; shrinkage and shares are within a group
    damage: np.ndarray  # [D, n, B] float: summed damage over the domain's tokens (not divided by them)
    rows: np.ndarray  # [D, n] float: routed (token, slot) rows of the item's expert in the domain
    tokens: np.ndarray  # [D] float: tokens of the domain

    def __post_init__(self):
        d, n, b = self.damage.shape
        if (len(self.domains), len(self.bits)) != (d, b) or self.rows.shape != (d, n) or self.group.shape != (n,) \
                or self.tokens.shape != (d,):
            raise MoecompressError(f"DomainCosts shapes disagree: damage {self.damage.shape}, rows "
                                   f"{self.rows.shape}, group {self.group.shape}, tokens {self.tokens.shape}, "
                                   f"{d} domains, bits {self.bits}")
        if (self.tokens <= 0).any():
            raise MoecompressError("every domain of DomainCosts needs at least one token")

    def truth(self, d: int) -> np.ndarray:
        """[n, B] domain d's measured cost per token (the held-out score in leave-one-domain-out)."""
        return self.damage[d] / self.tokens[d]


def _keep(dc: DomainCosts, keep: np.ndarray | None) -> np.ndarray:
    return np.ones(len(dc.domains), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)


def estimate(dc: DomainCosts, kappa: float = 0.0, tau: float = 1.0, keep: np.ndarray | None = None) -> np.ndarray:
    """[n, B] cost per token of every item from the domains in `keep` (default all), shrunk by `kappa` (pseudo
    routed rows; math.inf: the group's curve) with the routing share tempered by `tau` (see the module doc)."""
    if kappa < 0 or not 0 <= tau <= 1:
        raise MoecompressError(f"need kappa >= 0 and 0 <= tau <= 1, got kappa={kappa}, tau={tau}")
    k = _keep(dc, keep)
    dmg, rows, n = dc.damage[k].sum(0), dc.rows[k].sum(0), dc.tokens[k].sum()  # [n, B], [n], scalar
    out = np.zeros_like(dmg, dtype=np.float64)
    for g in np.unique(dc.group):
        m = dc.group == g
        r, d, total_rows = rows[m], dmg[m], rows[m].sum()
        if total_rows <= 0:
            continue  # nothing routed to the group: no damage observed
        prior = d.sum(0) / total_rows  # [B] pooled damage per routed row of the group
        if math.isinf(kappa):
            per_row = np.broadcast_to(prior, d.shape)
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                per_row = (d + kappa * prior) / (r + kappa)[:, None]
            per_row = np.where((r + kappa)[:, None] > 0, per_row, prior)  # an unrouted expert: the prior
        share = r / total_rows
        tempered = share ** tau / (share ** tau).sum()
        out[m] = (total_rows / n) * tempered[:, None] * per_row
    return out


def mixture(dc: DomainCosts, weights: np.ndarray) -> np.ndarray:
    """[n, B] cost per token under another mix of the same domains: sum_d w_d * truth(d), `weights` [D] >= 0
    normalised to sum 1 (a domain of weight 0 is left out). weights = dc.tokens gives estimate(dc) (kappa 0,
    tau 1); the evaluation text's domain shares give the calibration costs at the evaluation mix (a bound's input,
    eval/bench_quality_robust.py --oracle)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(dc.domains),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise MoecompressError(f"mixture weights need one finite value >= 0 per domain ({len(dc.domains)}: "
                               f"{', '.join(dc.domains)}) and a positive sum, got {w.tolist()}")
    return np.tensordot(w / w.sum(), dc.damage / dc.tokens[:, None, None], 1)


def popularity(dc: DomainCosts, keep: np.ndarray | None = None) -> np.ndarray:
    """[n, B] popularity-only cost: the expert's share of its group's routed rows x 4^-bits."""
    k = _keep(dc, keep)
    rows = dc.rows[k].sum(0)
    share = np.zeros_like(rows, dtype=np.float64)
    for g in np.unique(dc.group):
        m = dc.group == g
        share[m] = rows[m] / max(rows[m].sum(), 1e-300)
    return share[:, None] * 4.0 ** -np.asarray(dc.bits, dtype=np.float64)[None, :]


@dataclass(frozen=True)
class Validation:
    """Leave-one-domain-out scores: mean over held-out domains and budgets of log(plan's cost / popularity's)."""

    scores: dict[tuple[float, float], float]  # (kappa, tau) -> mean log ratio (lower is better)
    per_domain: dict[tuple[float, float], tuple[float, ...]]  # (kappa, tau) -> ratio per held-out domain (budget mean)
    best: tuple[float, float]


def leave_one_domain_out(dc: DomainCosts, nbytes: np.ndarray, budgets: list[int], kappas: list[float],
                         taus: list[float]) -> Validation:
    """Score every (kappa, tau) of the grid on each held-out domain (module doc); nbytes [n, B] int per option,
    budgets in bytes. Ties go to the earlier grid entry (list kappa = 0, tau = 1 first to prefer the measured)."""
    if len(dc.domains) < 2:
        raise MoecompressError("leave-one-domain-out needs calibration text of at least two domains")
    valid = np.ones(nbytes.shape, dtype=bool)
    logs: dict[tuple[float, float], list[float]] = {(k, t): [] for k in kappas for t in taus}
    per: dict[tuple[float, float], list[float]] = {key: [] for key in logs}
    for d in range(len(dc.domains)):
        keep = np.arange(len(dc.domains)) != d
        truth = dc.truth(d)
        rows = np.arange(truth.shape[0])
        pop = popularity(dc, keep)
        base = [truth[rows, choose(nbytes, pop, valid, b, "lagrangian").choice].sum() for b in budgets]
        for key in logs:
            cost = estimate(dc, key[0], key[1], keep)
            ratios = [truth[rows, choose(nbytes, cost, valid, b, "lagrangian").choice].sum() / max(p, 1e-300)
                      for b, p in zip(budgets, base)]
            logs[key].extend(math.log(max(r, 1e-300)) for r in ratios)
            per[key].append(float(np.mean(ratios)))
    scores = {key: float(np.mean(v)) for key, v in logs.items()}
    best = min(scores, key=lambda key: (scores[key], list(scores).index(key)))
    return Validation(scores, {k: tuple(v) for k, v in per.items()}, best)


def worst_domain_costs(dc: DomainCosts, reference: np.ndarray, nbytes: np.ndarray, budget: int, steps: int = 200,
                       rate: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """([n, B] cost, [D] domain weights) for the plan that minimises the worst domain's damage relative to the
    `reference` plan's ([n] column per item) on that domain: min over plans of max over domains d of
    C_d(plan) / C_d(reference). Multiplicative weights over the domains (`steps`, learning `rate`); the cost is
    sum_d w_d C_d / C_d(reference) with w the weights averaged over the steps (a separable table for `allocate`)."""
    if steps < 1 or rate <= 0:
        raise MoecompressError(f"need steps >= 1 and rate > 0, got steps={steps}, rate={rate}")
    rows = np.arange(nbytes.shape[0])
    truth = np.stack([dc.truth(d) for d in range(len(dc.domains))])  # [D, n, B]
    ref = np.maximum(truth[:, rows, reference].sum(1), 1e-300)  # [D]
    scaled = truth / ref[:, None, None]
    valid = np.ones(nbytes.shape, dtype=bool)
    w = np.full(len(dc.domains), 1.0 / len(dc.domains))
    mean_w = np.zeros_like(w)
    for _ in range(steps):
        choice = choose(nbytes, np.tensordot(w, scaled, 1), valid, budget, "lagrangian").choice
        ratio = scaled[:, rows, choice].sum(1)  # [D]
        w = w * np.exp(rate * (ratio - ratio.max()))
        w /= w.sum()
        mean_w += w / steps
    return np.tensordot(mean_w, scaled, 1), mean_w
