"""Each intervention against the baseline.

Negative differences mean the intervention is better (lower loss).

What is compared with what.  The unit of replication is the init seed (with
its data seed): runs at different train seeds of one init seed share its
initial weights, so they are not independent.  An arm whose noise reference
is train-seed noise (it keeps the baseline's initial weights) is only ever set
against baseline runs with the same init seed and data seed, so the init-seed
effect the two share cancels; where both have the exact (seed, train_seed,
data_seed) cell, that cell pairs with its twin (the same dropout-mask stream:
common random numbers).  Another init seed's baseline is never averaged in.
Exact repeats are averaged into their cell first.  Designs, in order:

``paired``
    At least two init seeds have something to pair.  Per init seed, the mean
    difference over the shared cells (for an arm that keeps the baseline's
    init: over all its cells at that seed when none is shared); a one-sample
    t-test over init seeds, dof = seeds - 1.
``prediction``
    Fewer than two: the prediction-interval t-test.  The difference of the
    mean of the arm's replicates and the mean of the matching baseline
    replicates, ``SE = sd * sqrt(1/m + 1/n)`` with ``sd`` the pooled noise SD
    of the reference and ``t`` on that estimate's degrees of freedom.  This is
    the principled form of the seeds' "within 3 SD of baseline" rule.  What
    is a replicate depends on what is exchangeable with the arm's runs:

    - train-seed reference (the arm keeps the baseline's initial weights):
      the cells at the shared init seed, ``m`` the arm's, ``n`` the
      baseline's.  Given the shared initial weights, each cell is one draw of
      training randomness, so the baseline's cells at that seed are what the
      arm's cells would be without the intervention.  All of them are used,
      not just the cell the arm shares: a shared dropout-mask stream can only
      correlate the two positively, which makes ``sd^2 (1/m + 1/n)`` an upper
      bound on the variance, while pairing the one shared cell alone would
      drop the other baseline runs and raise the SE (``sqrt(2)`` against
      ``sqrt(4/3)`` with three baseline cells) for a correlation that one pair
      cannot show.
    - init-seed reference (the arm has its own initial weights): the arm's
      init seeds against the baseline's init seeds, each the mean of its cells
      at the arm's train-seed and data-seed levels.  A run with fresh initial
      weights is exchangeable with a baseline run at another init seed at the
      same train-seed level (one independent draw of init and of training
      randomness each); baseline runs at other levels of the same init seeds
      repeat those init draws and are not new replicates.
``welch``
    An arm with no usable pairing but at least two init seeds on each side:
    Welch's t-test on the per-seed means.
``none``
    Nothing to test against (no noise estimate of the needed kind).

The noise estimates rest on every run of the study (see
:mod:`analysis.noise`) and have their own dof.  Under normal noise the
prediction test is exact for the train-seed reference (the pooled SD uses
only within-group deviations, independent of the means compared); for the
init-seed reference it uses the init estimate's conservative dof (each init
draw counted once), which kept false positives below alpha in simulation
(about 3% at alpha = 5% with three init seeds).  Pooling assumes the
intervention does not change the noise level.

Intervals.  The t interval from the test; the bootstrap interval is scipy's
percentile bootstrap of the same mean difference for the paired and Welch
designs (too narrow with very few seeds; the t interval is the primary one),
absent for the prediction test, whose uncertainty comes from the noise
estimate rather than from resampling one or two runs.

P(better).  The probability that a fresh intervention run beats a fresh
baseline run (at the same init seed for the train-seed reference) under a
normal model: ``Phi(-delta / sigma)``, with ``sigma`` the SD of such a
difference.  Its CI inverts the noncentral t distribution of the t statistic
(exact for the paired and prediction tests, Welch-approximate otherwise) and
maps the interval through ``Phi``.

Decision.  p-values are Holm-adjusted across all the interventions of a
study, whatever their design.  The verdict is ``better`` (``worse``) when
the adjusted p is below ``alpha`` and the difference is at least
``min_effect`` below (above) zero, else ``inconclusive``.  Any row whose test
rests on fewer than ``THIN_DOF`` degrees of freedom (or has no test) is
flagged as thin evidence.

Noise reference.  Declared in the intervention registry if it says so, else
train-seed noise when the arm's initial weights equal the baseline's for the
same seed (same ``init_fingerprint``, or ``changes_init`` false), else
init-seed noise.  It gives the effect in noise-SD units and the seeds needed:
the smallest number of init seeds at which a t-test has 80% power for the
observed difference (paired, one run per arm and seed, with difference SD
``sqrt(2) * noise_sd`` for the train-seed reference or the paired design;
two independent samples otherwise), from the noncentral t distribution.

Every test function is vectorised (leading axes are repetitions) so that
:func:`decide` runs the same code on one study and on thousands of
simulated ones.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import elementwise

from analysis.load import BASELINE
from analysis.noise import NoiseEstimate, choose_reference, noise_designs, noise_statistics

CELL_KEY = ["seed", "train_seed", "data_seed"]
UNIT_KEY = ["seed", "data_seed"]
LEVEL_KEY = ["train_seed", "data_seed"]
MAX_SEEDS = 10_000
THIN_DOF = 3
RANKING_COLUMNS = [
    "rank",
    "intervention",
    "verdict",
    "baseline_loss",
    "intervention_loss",
    "difference",
    "ci_low",
    "ci_high",
    "boot_low",
    "boot_high",
    "p_value",
    "p_holm",
    "dof",
    "method",
    "thin_evidence",
    "warning",
    "p_better",
    "p_better_low",
    "p_better_high",
    "noise_reference",
    "noise_sd",
    "effect_in_sd",
    "seeds_needed",
    "design",
    "n_intervention_seeds",
    "n_baseline_seeds",
    "n_intervention_runs",
    "n_baseline_runs",
    "intervention_runs",
    "baseline_runs",
    "reference_rule",
    "reference_reason",
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
    """P(intervention run has lower loss), with its CI (see module docstring)."""
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


def seeds_needed(effect: float, noise_sd: float, paired: bool, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest number of init seeds (>= 2) with at least ``power``; inf beyond MAX_SEEDS.

    Power grows with the number of seeds, so the candidates are scanned in
    growing blocks and the scan stops at the first block that reaches it.
    """
    if not (np.isfinite(effect) and np.isfinite(noise_sd)) or noise_sd <= 0:
        return np.nan
    first = 2
    for last in (64, 1024, MAX_SEEDS):
        candidates = np.arange(first, last + 1)
        reached = np.flatnonzero(power_at(effect, noise_sd, candidates, paired, alpha) >= power)
        if reached.size:
            return float(candidates[reached[0]])
        first = last + 1
    return np.inf


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


@dataclass(frozen=True)
class ArmPlan:
    """How one arm is compared with the baseline: the structure, without losses.

    ``treated`` and ``control`` are weight matrices (replicates x runs of the
    study): ``losses @ treated.T`` gives the arm's replicates (cell or seed
    means), ``losses @ control.T`` the baseline's.  In the paired design row
    i of both belongs to the same init seed.
    """

    intervention: str
    design: str  # paired | prediction | welch | none
    reference: str  # the noise the arm is judged against: train | init
    rule: str  # what decided the reference (see analysis.noise.REFERENCE_RULES)
    reason: str
    treated: np.ndarray
    control: np.ndarray
    intervention_runs: str
    baseline_runs: str
    n_intervention_runs: int
    n_baseline_runs: int
    n_intervention_seeds: int
    n_baseline_seeds: int

    @property
    def method(self) -> str:
        if self.design == "paired":
            return f"paired t over {self.treated.shape[0]} init seeds"
        if self.design == "welch":
            return f"Welch t, {self.treated.shape[0]} vs {self.control.shape[0]} init seeds"
        if self.design == "prediction":
            return f"prediction t vs {self.reference}-seed noise"
        return "no test"

    def replicates(self, losses) -> tuple[np.ndarray, np.ndarray]:
        losses = np.asarray(losses, dtype=float)
        return losses @ self.treated.T, losses @ self.control.T


def _cells(runs: pd.DataFrame) -> pd.Series:
    """Row positions of the runs in each (seed, train_seed, data_seed) cell, in run order."""
    positions = runs.groupby(CELL_KEY, sort=False).groups
    index = pd.MultiIndex.from_tuples(list(positions), names=CELL_KEY)
    return pd.Series([list(rows) for rows in positions.values()], index=index, dtype=object)


def _label(cell: tuple, n_runs: int) -> str:
    seed, train_seed, data_seed = cell
    data = "" if data_seed == "none" else f"/d{data_seed}"
    return f"s{seed}/{train_seed}{data}" + (f" x{n_runs}" if n_runs > 1 else "")


def _listing(cells: pd.Series) -> tuple[str, int]:
    n_runs = int(sum(len(positions) for positions in cells))
    labels = ", ".join(_label(cell, len(positions)) for cell, positions in cells.items())
    return f"{n_runs} run{'s' if n_runs != 1 else ''}: {labels}", n_runs


def _mean_weights(replicates: list[pd.Series], n_runs: int) -> np.ndarray:
    """One row per replicate (a group of cells): the mean over its cells of the cell means."""
    weights = np.zeros((len(replicates), n_runs))
    for row, cells in enumerate(replicates):
        for positions in cells:
            weights[row, positions] += 1.0 / (len(cells) * len(positions))
    return weights


def _by_unit(cells: pd.Series) -> dict[tuple, pd.Series]:
    """The cells of each (seed, data_seed) unit."""
    return {unit: group for unit, group in cells.groupby(level=UNIT_KEY, sort=False)}


def _each_cell(cells: pd.Series) -> list[pd.Series]:
    return [cells.iloc[[i]] for i in range(len(cells))]


def plan_arm(name: str, arm: pd.DataFrame, baseline: pd.DataFrame, n_runs: int, measurable: set[str]) -> ArmPlan:
    """Choose the design and the runs of one comparison (module docstring)."""
    choice = choose_reference(name, arm, baseline)
    reference, reason = choice.reference, choice.reason
    arm_cells, base_cells = _cells(arm), _cells(baseline)
    arm_units, base_units = _by_unit(arm_cells), _by_unit(base_cells)
    pairs = {}  # unit -> (arm cells, baseline cells) that pair at that unit
    for unit in (u for u in arm_units if u in base_units):
        shared = arm_units[unit].index.intersection(base_units[unit].index)
        if len(shared):
            pairs[unit] = (arm_cells[shared], base_cells[shared])
        elif reference == "train":  # same initial weights: the seed pairs without a shared cell
            pairs[unit] = (arm_units[unit], base_units[unit])
    if len(pairs) >= 2:
        design = "paired"
        treated = _mean_weights([a for a, _ in pairs.values()], n_runs)
        control = _mean_weights([b for _, b in pairs.values()], n_runs)
        used_arm = pd.concat([a for a, _ in pairs.values()])
        used_base = pd.concat([b for _, b in pairs.values()])
    elif reference == "train" and pairs:
        design = "prediction"
        (unit,) = pairs
        used_arm, used_base = arm_units[unit], base_units[unit]
        treated = _mean_weights(_each_cell(used_arm), n_runs)
        control = _mean_weights(_each_cell(used_base), n_runs)
        if len(arm_units) > 1:
            reason += "; its runs at init seeds the baseline did not run are left out"
        if "train" not in measurable:
            reference = "init"
            reason += (
                "; train-seed noise not measured, init-seed noise used (conservative: it includes train-seed noise)"
            )
    elif len(arm_units) >= 2 and len(base_units) >= 2:
        design = "welch"
        if reference == "train":
            reference = "init"
            reason += "; no baseline run at its init seeds, so init-seed noise applies"
        treated = _mean_weights(list(arm_units.values()), n_runs)
        control = _mean_weights(list(base_units.values()), n_runs)
        used_arm, used_base = arm_cells, base_cells
    else:
        design = "prediction"
        if reference == "train":
            reason += "; no baseline run at its init seed, so init-seed noise applies"
        reference = "init"
        levels = arm_cells.index.droplevel("seed").unique()
        matching = base_cells[base_cells.index.droplevel("seed").isin(levels)]
        if matching.empty:
            matching = base_cells
            reason += "; no baseline run at its train seed, baseline seeds averaged over all"
        treated = _mean_weights(list(arm_units.values()), n_runs)
        control = _mean_weights(list(_by_unit(matching).values()), n_runs)
        used_arm, used_base = arm_cells, matching
    if design == "prediction" and reference not in measurable:
        design = "none"
        reason += f"; no {reference}-seed noise estimate to test against"
    (arm_text, n_arm), (base_text, n_base) = _listing(used_arm), _listing(used_base)
    return ArmPlan(
        name,
        design,
        reference,
        choice.rule,
        reason,
        treated,
        control,
        arm_text,
        base_text,
        n_arm,
        n_base,
        used_arm.index.get_level_values("seed").nunique(),
        used_base.index.get_level_values("seed").nunique(),
    )


def plan_comparisons(runs: pd.DataFrame, measurable: set[str]) -> list[ArmPlan]:
    """One plan per intervention; ``runs`` must have a RangeIndex.

    ``measurable``: the noise kinds (``train``, ``init``) the study estimates.
    """
    baseline = runs[runs["intervention"] == BASELINE]
    return [
        plan_arm(name, arm, baseline, len(runs), measurable)
        for name, arm in runs[runs["intervention"] != BASELINE].groupby("intervention")
    ]


def test_arm(plan: ArmPlan, losses, noise: dict[str, tuple], alpha: float = 0.05) -> DifferenceTest:
    """The plan's test on ``losses`` (..., runs); ``noise``: ``{kind: (sd, dof)}``."""
    losses = np.asarray(losses, dtype=float)
    if plan.design == "none":
        return no_test(losses.shape[:-1])
    treated, control = plan.replicates(losses)
    if plan.design == "paired":
        return paired_test(treated - control, alpha)
    if plan.design == "welch":
        return welch_test(treated, control, alpha)
    noise_sd, noise_dof = noise[plan.reference]
    return prediction_test(treated, control, noise_sd, noise_dof, alpha)


@dataclass
class Decisions:
    """The tests and verdicts of every arm; arrays (..., arms)."""

    tests: list[DifferenceTest]
    difference: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_value: np.ndarray
    p_holm: np.ndarray
    dof: np.ndarray
    verdict: np.ndarray

    @property
    def thin_evidence(self) -> np.ndarray:
        return ~(self.dof >= THIN_DOF)


def decide(
    plans: list[ArmPlan], losses, noise: dict[str, tuple], alpha: float = 0.05, min_effect: float = 0.0
) -> Decisions:
    """Test every arm, Holm-adjust across all of them, and give the verdicts."""
    tests = [test_arm(plan, losses, noise, alpha) for plan in plans]
    shape = np.shape(losses)[:-1] + (len(plans),)

    def stacked(field: str) -> np.ndarray:
        if not tests:
            return np.zeros(shape)
        return np.stack([np.broadcast_to(getattr(test, field), shape[:-1]) for test in tests], axis=-1).astype(float)

    difference, p_value = stacked("difference"), stacked("p_value")
    p_holm = holm_adjust(p_value)
    return Decisions(
        tests,
        difference,
        stacked("ci_low"),
        stacked("ci_high"),
        p_value,
        p_holm,
        stacked("dof"),
        verdicts(difference, p_holm, alpha, min_effect),
    )


def decide_studies(
    runs: pd.DataFrame, losses, alpha: float = 0.05, min_effect: float = 0.0
) -> tuple[list[ArmPlan], Decisions]:
    """Verdicts for many studies with the design of ``runs``: ``losses`` is (..., runs).

    The analysis path, vectorised: the noise estimates of each study
    (:func:`analysis.noise.noise_statistics`), the plans of ``runs`` and
    :func:`decide`.  Used to prove the method by simulation.
    """
    runs = runs.reset_index(drop=True)
    designs = noise_designs(runs)
    plans = plan_comparisons(runs, {kind for kind in ("train", "init") if designs[kind].dof > 0})
    return plans, decide(plans, losses, noise_statistics(designs, losses), alpha, min_effect)


def noise_arrays(noise: dict[str, NoiseEstimate]) -> dict[str, tuple]:
    """``{kind: (sd, dof)}`` of a study's estimates, for :func:`decide`."""
    return {kind: (np.array(estimate.sd), np.array(float(estimate.dof))) for kind, estimate in noise.items()}


def measurable_kinds(noise: dict[str, NoiseEstimate]) -> set[str]:
    return {kind for kind in ("train", "init") if kind in noise and np.isfinite(noise[kind].sd) and noise[kind].dof > 0}


def compare_to_baseline(
    runs: pd.DataFrame,
    noise: dict[str, NoiseEstimate],
    alpha: float = 0.05,
    min_effect: float = 0.0,
    n_resamples: int = 9999,
    random_seed: int = 0,
) -> pd.DataFrame:
    """The ranking table: one row per intervention, sorted by difference."""
    runs = runs.reset_index(drop=True)
    plans = plan_comparisons(runs, measurable_kinds(noise))
    if not plans:
        return pd.DataFrame(columns=RANKING_COLUMNS)
    losses = runs["test_loss"].to_numpy(dtype=float)
    decisions = decide(plans, losses, noise_arrays(noise), alpha, min_effect)
    rows = [
        _row(plan, test, losses, noise, alpha, n_resamples, random_seed)
        for plan, test in zip(plans, decisions.tests, strict=True)
    ]
    table = pd.DataFrame(rows)
    table["p_holm"] = decisions.p_holm
    table["verdict"] = decisions.verdict
    table["thin_evidence"] = decisions.thin_evidence
    table["warning"] = [
        _warning(dof) if thin else "" for dof, thin in zip(decisions.dof, decisions.thin_evidence, strict=True)
    ]
    table = table.sort_values("difference", na_position="last", kind="stable")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table.reset_index(drop=True)[RANKING_COLUMNS]


def _warning(dof: float) -> str:
    if not np.isfinite(dof):
        return "no test"
    return f"thin evidence: {dof:.1f} dof < {THIN_DOF}"


def _row(plan: ArmPlan, test: DifferenceTest, losses, noise, alpha, n_resamples, random_seed) -> dict:
    treated, control = plan.replicates(losses)
    if plan.design == "paired":
        boot = bootstrap_interval((treated - control,), alpha, n_resamples, random_seed)
    elif plan.design == "welch":
        boot = bootstrap_interval((treated, control), alpha, n_resamples, random_seed)
    else:
        boot = (np.nan, np.nan)
    reference, reason = plan.reference, plan.reason
    if not np.isfinite(noise[reference].sd):  # for the effect size only: no test uses it
        other = "init" if reference == "train" else "train"
        if np.isfinite(noise[other].sd):
            reason += f"; {reference}-seed noise not measured, {other} used for the effect size"
            reference = other
    noise_sd = noise[reference].sd
    difference = treated.mean() - control.mean()
    p_better = probability_better(test, alpha) if plan.design != "none" else (np.nan,) * 3
    paired_follow_up = plan.design == "paired" or plan.reference == "train"
    return {
        "intervention": plan.intervention,
        "baseline_loss": control.mean(),
        "intervention_loss": treated.mean(),
        "difference": difference,
        "ci_low": float(test.ci_low),
        "ci_high": float(test.ci_high),
        "boot_low": float(boot[0]),
        "boot_high": float(boot[1]),
        "p_value": float(test.p_value),
        "dof": float(test.dof),
        "method": plan.method,
        "p_better": float(p_better[0]),
        "p_better_low": float(p_better[1]),
        "p_better_high": float(p_better[2]),
        "noise_reference": reference,
        "noise_sd": noise_sd,
        "effect_in_sd": difference / noise_sd,
        "seeds_needed": seeds_needed(difference, noise_sd, paired_follow_up, alpha),
        "design": plan.design,
        "n_intervention_seeds": plan.n_intervention_seeds,
        "n_baseline_seeds": plan.n_baseline_seeds,
        "n_intervention_runs": plan.n_intervention_runs,
        "n_baseline_runs": plan.n_baseline_runs,
        "intervention_runs": plan.intervention_runs,
        "baseline_runs": plan.baseline_runs,
        "reference_rule": plan.rule,
        "reference_reason": reason,
    }
