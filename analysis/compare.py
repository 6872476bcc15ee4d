"""Each intervention against the baseline.

Design.  The unit of replication is the init seed (with its data seed):
runs at different train seeds of one init seed share its initial weights, so
they are not independent.  When the two arms share seed cells (seed,
train_seed, data_seed) in at least two init seeds, the comparison is a paired
t-test over init seeds: per seed, the mean over the shared cells of the
intervention - baseline difference (exact repeats averaged first), which
cancels the seed effects the arms share.  Otherwise it is Welch's t-test on
the per-seed mean losses of each arm.  Negative differences mean the
intervention is better (lower loss).

Intervals.  The t interval comes from scipy's ``confidence_interval``; the
bootstrap interval is scipy's percentile bootstrap of the same mean
difference (it is too narrow with very few seeds, so the t interval is the
primary one).

P(better).  The probability that a fresh intervention run beats a fresh
baseline run at the same init seed (paired), or a random baseline run
(Welch), under a normal model: ``Phi(-delta / sigma)``, with ``sigma`` the SD
of a paired difference, or ``sqrt(var_intervention + var_baseline)``.  Its CI
inverts the noncentral t distribution of the t statistic (exact for paired
normal data, Welch-approximate otherwise) and maps the interval through
``Phi``.

Decision.  p-values are Holm-adjusted across the interventions of a study
(statsmodels).  The verdict is ``better`` (``worse``) when the adjusted p is
below ``alpha`` and the difference is at least ``min_effect`` below (above)
zero, else ``inconclusive``.

Noise reference.  An intervention whose initial weights equal the baseline's
for the same seed (same ``init_fingerprint``, or ``changes_init`` false) is
set against the train-seed noise; otherwise against the init-seed noise.  It
gives the effect in noise-SD units and the seeds needed: the smallest number
of seeds (pairs when paired, per arm otherwise) at which the t-test has 80%
power for the observed difference (statsmodels ``TTestPower`` on paired
differences with SD ``sqrt(2) * noise_sd``, ``TTestIndPower`` otherwise).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import elementwise
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from analysis.load import BASELINE
from analysis.noise import NoiseEstimate, keeps_baseline_init

CELL_KEY = ["seed", "train_seed", "data_seed"]
UNIT_KEY = ["seed", "data_seed"]
MAX_SEEDS = 10_000
RANKING_COLUMNS = [
    "rank", "intervention", "verdict", "baseline_loss", "intervention_loss", "difference",
    "ci_low", "ci_high", "boot_low", "boot_high", "p_value", "p_holm",
    "p_better", "p_better_low", "p_better_high", "noise_reference", "noise_sd",
    "effect_in_sd", "seeds_needed", "design", "n_intervention_seeds", "n_baseline_seeds",
    "n_intervention_runs", "n_baseline_runs", "reference_reason",
]


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
        differences.mean(axis=-1), interval.low, interval.high, result.pvalue,
        result.statistic, result.df, np.full_like(result.statistic, np.sqrt(n)),
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
        treated.mean(axis=-1) - control.mean(axis=-1), interval.low, interval.high,
        result.pvalue, result.statistic, result.df, standardiser,
    )


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
            samples, mean_difference, vectorized=True, axis=-1, method="percentile",
            confidence_level=1 - alpha, n_resamples=n_resamples,
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
            root = elementwise.find_root(
                _nct_cdf_minus, bracket.bracket, args=(statistic, dof, target)
            )
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
    """P(intervention run has lower loss), with its CI (see module docstring)."""
    statistic = np.asarray(test.statistic, dtype=float)
    finite = np.isfinite(statistic)
    low_nc, high_nc = noncentrality_interval(np.where(finite, statistic, 0.0), test.dof, alpha)
    with np.errstate(invalid="ignore"):
        estimate = stats.norm.cdf(-statistic / test.standardiser)
        low = np.where(finite, stats.norm.cdf(-high_nc / test.standardiser), estimate)
        high = np.where(finite, stats.norm.cdf(-low_nc / test.standardiser), estimate)
    return estimate, low, high


def power_at(effect, noise_sd, n_seeds, paired: bool, alpha: float = 0.05):
    """Power of the two-sided t-test with ``n_seeds`` seeds (pairs or per arm)."""
    if paired:
        return TTestPower().power(np.abs(effect) / (np.sqrt(2) * noise_sd), n_seeds, alpha)
    return TTestIndPower().power(np.abs(effect) / noise_sd, n_seeds, alpha)


def seeds_needed(effect: float, noise_sd: float, paired: bool,
                 alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest number of seeds with at least ``power``; inf beyond MAX_SEEDS.

    Power grows with the number of seeds, so the candidates are scanned in
    growing blocks and the scan stops at the first block that reaches it.
    """
    if not (np.isfinite(effect) and np.isfinite(noise_sd)) or noise_sd <= 0:
        return np.nan
    first = 2
    for last in (64, 1024, MAX_SEEDS):
        candidates = np.arange(first, last + 1)
        with np.errstate(all="ignore"):
            reached = np.flatnonzero(power_at(effect, noise_sd, candidates, paired, alpha) >= power)
        if reached.size:
            return float(candidates[reached[0]])
        first = last + 1
    return np.inf


def holm_adjust(p_values) -> np.ndarray:
    """Holm-adjusted p-values; missing p-values stay missing."""
    p_values = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p_values, np.nan)
    present = np.isfinite(p_values)
    if present.any():
        adjusted[present] = multipletests(p_values[present], method="holm")[1]
    return adjusted


def verdicts(difference, p_adjusted, alpha: float = 0.05, min_effect: float = 0.0) -> np.ndarray:
    """``better``/``worse`` when resolved (adjusted p < alpha) and >= min_effect."""
    difference, p_adjusted = np.asarray(difference, float), np.asarray(p_adjusted, float)
    resolved = p_adjusted < alpha
    better = resolved & (difference < 0) & (difference <= -min_effect)
    worse = resolved & (difference > 0) & (difference >= min_effect)
    return np.where(better, "better", np.where(worse, "worse", "inconclusive"))


def noise_reference(
    arm: pd.DataFrame, baseline: pd.DataFrame, noise: dict[str, NoiseEstimate]
) -> tuple[str, str]:
    """Which noise to judge the arm against (``train`` or ``init``), and why."""
    keeps_init, reason = keeps_baseline_init(arm, baseline)
    preferred = "train" if keeps_init else "init"
    if np.isfinite(noise[preferred].sd):
        return preferred, reason
    fallback = "init" if preferred == "train" else "train"
    if np.isfinite(noise[fallback].sd):
        return fallback, f"{reason}; {preferred}-seed noise not measured, {fallback} used"
    return preferred, f"{reason}; no noise estimate available"


def compare_to_baseline(
    runs: pd.DataFrame,
    noise: dict[str, NoiseEstimate],
    alpha: float = 0.05,
    min_effect: float = 0.0,
    n_resamples: int = 9999,
    random_seed: int = 0,
) -> pd.DataFrame:
    """The ranking table: one row per intervention, sorted by difference."""
    baseline = runs[runs["intervention"] == BASELINE]
    rows = [
        _compare_arm(name, arm, baseline, noise, alpha, n_resamples, random_seed)
        for name, arm in runs[runs["intervention"] != BASELINE].groupby("intervention")
    ]
    if not rows:
        return pd.DataFrame(columns=RANKING_COLUMNS)
    table = pd.DataFrame(rows)
    table["p_holm"] = holm_adjust(table["p_value"])
    table["verdict"] = verdicts(table["difference"], table["p_holm"], alpha, min_effect)
    table = table.sort_values("difference", na_position="last", kind="stable")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table.reset_index(drop=True)[RANKING_COLUMNS]


def _compare_arm(name, arm, baseline, noise, alpha, n_resamples, random_seed) -> dict:
    arm_cells = arm.groupby(CELL_KEY)["test_loss"].mean()
    base_cells = baseline.groupby(CELL_KEY)["test_loss"].mean()
    shared = arm_cells.index.intersection(base_cells.index)
    paired = shared.droplevel("train_seed").nunique() >= 2
    if paired:
        arm_cells, base_cells = arm_cells[shared], base_cells[shared]
    arm_units = arm_cells.groupby(level=UNIT_KEY).mean()
    base_units = base_cells.groupby(level=UNIT_KEY).mean()
    if paired:
        design = "paired"
        differences = (arm_units - base_units).to_numpy()
        test = paired_test(differences, alpha)
        boot = bootstrap_interval((differences,), alpha, n_resamples, random_seed)
    elif len(arm_units) >= 2 and len(base_units) >= 2:
        design = "welch"
        samples = (arm_units.to_numpy(), base_units.to_numpy())
        test = welch_test(*samples, alpha)
        boot = bootstrap_interval(samples, alpha, n_resamples, random_seed)
    else:
        design, test, boot = "too few seeds", None, (np.nan, np.nan)
    reference, reason = noise_reference(arm, baseline, noise)
    noise_sd = noise[reference].sd
    difference = arm_units.mean() - base_units.mean()
    p_better = probability_better(test, alpha) if test else (np.nan,) * 3
    return {
        "intervention": name,
        "baseline_loss": base_units.mean(),
        "intervention_loss": arm_units.mean(),
        "difference": difference,
        "ci_low": float(test.ci_low) if test else np.nan,
        "ci_high": float(test.ci_high) if test else np.nan,
        "boot_low": float(boot[0]),
        "boot_high": float(boot[1]),
        "p_value": float(test.p_value) if test else np.nan,
        "p_better": float(p_better[0]),
        "p_better_low": float(p_better[1]),
        "p_better_high": float(p_better[2]),
        "noise_reference": reference,
        "noise_sd": noise_sd,
        "effect_in_sd": difference / noise_sd,
        "seeds_needed": seeds_needed(difference, noise_sd, design == "paired", alpha),
        "design": design,
        "n_intervention_seeds": len(arm_units),
        "n_baseline_seeds": len(base_units),
        "n_intervention_runs": _runs_in_cells(arm, arm_cells.index),
        "n_baseline_runs": _runs_in_cells(baseline, base_cells.index),
        "reference_reason": reason,
    }


def _runs_in_cells(runs: pd.DataFrame, cells: pd.Index) -> int:
    return int(runs.set_index(CELL_KEY).index.isin(cells).sum())
