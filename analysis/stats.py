"""Statistical primitives of the comparison: t-tests, prediction intervals, bootstrap, P(better), power, Holm, verdicts.

Every function is vectorised (leading axes are repetitions), so one study and thousands of simulated ones run the
same code. The methods are described in docs/analysis.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.optimize import elementwise

MAX_SEEDS = 10_000
THIN_DOF = 3


@dataclass
class DifferenceTest:
    """A t-test of a mean difference; arrays over leading batch axes."""

    difference: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_value: np.ndarray
    statistic: np.ndarray
    dof: np.ndarray
    standardiser: np.ndarray  # statistic / standardiser estimates delta / sigma


def paired_test(differences, alpha: float = 0.05) -> DifferenceTest:
    """One-sample t-test of per-seed differences (last axis = seeds)."""
    differences = np.asarray(differences, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        result = stats.ttest_1samp(differences, 0.0, axis=-1)
    interval = result.confidence_interval(1 - alpha)
    n = differences.shape[-1]
    return DifferenceTest(
        differences.mean(axis=-1),
        interval.low,
        interval.high,
        result.pvalue,
        result.statistic,
        result.df,
        np.full_like(result.statistic, np.sqrt(n)),
    )


def welch_test(treated, control, alpha: float = 0.05) -> DifferenceTest:
    """Welch's t-test of ``mean(treated) - mean(control)`` (last axis = seeds)."""
    treated, control = np.asarray(treated, dtype=float), np.asarray(control, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        result = stats.ttest_ind(treated, control, equal_var=False, axis=-1)
        var_t, var_c = treated.var(axis=-1, ddof=1), control.var(axis=-1, ddof=1)
        standard_error = np.sqrt(var_t / treated.shape[-1] + var_c / control.shape[-1])
        standardiser = np.sqrt(var_t + var_c) / standard_error
    interval = result.confidence_interval(1 - alpha)
    return DifferenceTest(
        treated.mean(axis=-1) - control.mean(axis=-1),
        interval.low,
        interval.high,
        result.pvalue,
        result.statistic,
        result.df,
        standardiser,
    )


def prediction_test(treated, control, noise_sd, noise_dof, alpha: float = 0.05) -> DifferenceTest:
    """Prediction-interval t-test of ``mean(treated) - mean(control)``.

    ``treated`` (m replicates) and ``control`` (n replicates) on the last axis
    are independent draws around their means, each with the SD that
    ``noise_sd`` estimates on ``noise_dof`` degrees of freedom, from data
    independent of the two means.  Then ``difference / (noise_sd *
    sqrt(1/m + 1/n))`` is t-distributed with ``noise_dof`` dof (noncentral
    under an effect), which gives the p-value and the interval.  ``noise_sd``
    and ``noise_dof`` broadcast against the leading axes.
    """
    treated, control = np.asarray(treated, dtype=float), np.asarray(control, dtype=float)
    m, n = treated.shape[-1], control.shape[-1]
    difference = treated.mean(axis=-1) - control.mean(axis=-1)
    scale = np.sqrt(1 / m + 1 / n)
    noise_sd, dof = np.broadcast_arrays(np.asarray(noise_sd, float), np.asarray(noise_dof, float))
    noise_sd = np.broadcast_to(noise_sd, difference.shape)
    dof = np.broadcast_to(dof, difference.shape)
    standard_error = noise_sd * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic = difference / standard_error
        usable = dof > 0
        p_value = np.where(usable, 2 * stats.t.sf(np.abs(statistic), np.where(usable, dof, 1)), np.nan)
        half_width = stats.t.isf(alpha / 2, np.where(usable, dof, np.nan)) * standard_error
    standardiser = np.full(difference.shape, np.sqrt(2) / scale)  # per fresh run-vs-run difference
    return DifferenceTest(
        difference,
        difference - half_width,
        difference + half_width,
        p_value,
        statistic,
        np.where(usable, dof, np.nan),
        standardiser,
    )


def no_test(shape) -> DifferenceTest:
    """The missing test: every field NaN."""
    nan = np.full(shape, np.nan)
    return DifferenceTest(nan, nan, nan, nan, nan, nan, nan)


def bootstrap_interval(
    samples: tuple, alpha: float = 0.05, n_resamples: int = 9999, random_seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap CI of a mean (one sample) or mean difference (two).

    The samples are resampled independently along the last axis.
    """

    def mean_difference(*resampled, axis=-1):
        means = [sample.mean(axis=axis) for sample in resampled]
        return means[0] - means[1] if len(means) == 2 else means[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # all values equal
        result = stats.bootstrap(
            samples,
            mean_difference,
            vectorized=True,
            axis=-1,
            method="percentile",
            confidence_level=1 - alpha,
            n_resamples=n_resamples,
            rng=np.random.default_rng(random_seed),
        )
    return result.confidence_interval.low, result.confidence_interval.high


def noncentrality_interval(statistic, dof, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """CI for the noncentrality of a t statistic by inverting ``scipy.stats.nct``."""
    statistic, dof = np.broadcast_arrays(np.asarray(statistic, float), np.asarray(dof, float))
    bounds = []
    for target in (1 - alpha / 2, alpha / 2):
        with np.errstate(all="ignore"):
            bracket = elementwise.bracket_root(
                _nct_cdf_minus, statistic - 1.0, statistic + 1.0, args=(statistic, dof, target)
            )
            root = elementwise.find_root(_nct_cdf_minus, bracket.bracket, args=(statistic, dof, target))
        bounds.append(np.where(bracket.success & root.success, root.x, np.nan))
    return bounds[0], bounds[1]


def _nct_cdf_minus(noncentrality, statistic, dof, target):
    """``nct.cdf(statistic) - target``, decreasing in the noncentrality.

    Where scipy cannot evaluate far tails, use the limits 0 and 1.
    """
    cdf = stats.nct.cdf(statistic, dof, noncentrality)
    cdf = np.where(np.isnan(cdf), np.where(noncentrality > statistic, 0.0, 1.0), cdf)
    return cdf - target


def probability_better(test: DifferenceTest, alpha: float = 0.05):
    """P(intervention run has lower loss), with its CI (docs/analysis.md)."""
    statistic = np.asarray(test.statistic, dtype=float)
    finite = np.isfinite(statistic) & np.isfinite(test.dof)
    low_nc, high_nc = noncentrality_interval(np.where(finite, statistic, 0.0), np.where(finite, test.dof, 1.0), alpha)
    with np.errstate(invalid="ignore"):
        estimate = stats.norm.cdf(-statistic / test.standardiser)
        low = np.where(finite, stats.norm.cdf(-high_nc / test.standardiser), estimate)
        high = np.where(finite, stats.norm.cdf(-low_nc / test.standardiser), estimate)
    return estimate, low, high


def t_test_power(noncentrality, dof, alpha: float = 0.05, critical=None):
    """Power of a two-sided t-test: P(|T| > t_crit) with T ~ nct(dof, noncentrality).

    ``t_crit`` is the t quantile of ``alpha``, or ``critical`` when given
    (e.g. a group-sequential boundary).  scipy's ``nct.cdf`` returns NaN far in the tail opposite a large
    noncentrality (from about 7.6); that tail is below ``Phi(-|noncentrality|)``
    < 1e-13 there and counts as 0 (statsmodels' power has the same NaN, which
    made a NaN read as "not enough power").
    """
    noncentrality = np.abs(np.asarray(noncentrality, dtype=float))
    if critical is None:
        critical = stats.t.isf(alpha / 2, dof)
    with np.errstate(all="ignore"):
        beyond = stats.nct.sf(critical, dof, noncentrality)
        opposite = stats.nct.cdf(-critical, dof, noncentrality)
    return beyond + np.where(np.isnan(opposite), 0.0, opposite)


def power_at(effect, noise_sd, n_seeds, paired: bool, alpha: float = 0.05):
    """Power of the two-sided t-test with ``n_seeds`` init seeds (pairs or per arm).

    Paired: one-sample t on n differences of SD ``sqrt(2) * noise_sd``.
    Otherwise: two independent samples of n runs each with SD ``noise_sd``.
    """
    n = np.asarray(n_seeds, dtype=float)
    with np.errstate(all="ignore"):
        if paired:
            return t_test_power(np.abs(effect) / (np.sqrt(2) * noise_sd) * np.sqrt(n), n - 1, alpha)
        return t_test_power(np.abs(effect) / noise_sd * np.sqrt(n / 2), 2 * n - 2, alpha)


def seeds_needed(effect, noise_sd, paired, alpha: float = 0.05, power: float = 0.8) -> np.ndarray:
    """Smallest number of init seeds (>= 2) with at least ``power``; inf beyond MAX_SEEDS, NaN without a noise SD.

    Power grows with the number of seeds, so it is a bisection over 2 ... MAX_SEEDS, for all arms at once.
    """
    effect, noise_sd, paired = np.broadcast_arrays(
        np.asarray(effect, dtype=float), np.asarray(noise_sd, dtype=float), np.asarray(paired, dtype=bool)
    )

    def enough(n: np.ndarray) -> np.ndarray:
        reached = np.zeros(effect.shape, dtype=bool)
        for kind in (True, False):
            chosen = paired == kind
            reached[chosen] = power_at(effect[chosen], noise_sd[chosen], n[chosen], kind, alpha) >= power
        return reached

    with np.errstate(invalid="ignore"):
        valid = np.isfinite(effect) & np.isfinite(noise_sd) & (noise_sd > 0)
    low, high = np.full(effect.shape, 2), np.full(effect.shape, MAX_SEEDS)
    reachable = valid & enough(high)
    while (searching := reachable & (low < high)).any():
        middle = (low + high) // 2
        met = enough(middle)
        high = np.where(searching & met, middle, high)
        low = np.where(searching & ~met, middle + 1, low)
    return np.where(reachable, low.astype(float), np.where(valid, np.inf, np.nan))


def holm_adjust(p_values) -> np.ndarray:
    """Holm-adjusted p-values along the last axis; missing p-values stay missing.

    The k present p-values in increasing order are scaled by k, k-1, ..., 1,
    capped at 1 and made non-decreasing (statsmodels' ``holm``, vectorised).
    """
    p_values = np.asarray(p_values, dtype=float)
    present = np.isfinite(p_values)
    count = present.sum(axis=-1, keepdims=True)
    ordered = np.where(present, p_values, np.inf)
    order = np.argsort(ordered, axis=-1, kind="stable")
    rank = np.arange(p_values.shape[-1])
    with np.errstate(invalid="ignore"):
        scaled = np.minimum(1.0, (count - rank) * np.take_along_axis(ordered, order, axis=-1))
    adjusted = np.empty_like(p_values)
    np.put_along_axis(adjusted, order, np.maximum.accumulate(scaled, axis=-1), axis=-1)
    return np.where(present, adjusted, np.nan)


def verdicts(difference, p_adjusted, alpha: float = 0.05, min_effect: float = 0.0) -> np.ndarray:
    """``better``/``worse`` when resolved (adjusted p < alpha) and >= min_effect."""
    difference, p_adjusted = np.asarray(difference, float), np.asarray(p_adjusted, float)
    resolved = p_adjusted < alpha
    better = resolved & (difference < 0) & (difference <= -min_effect)
    worse = resolved & (difference > 0) & (difference >= min_effect)
    return np.where(better, "better", np.where(worse, "worse", "inconclusive"))
