"""The Holm-adjusted interval excludes zero exactly when the Holm-adjusted p is below alpha, so the forest plot
and the parent run's verdict metrics never contradict a verdict; it is never narrower than the row's own interval."""

import numpy as np
import pandas as pd
from scipy import stats

from analysis.adjusted import holm_intervals
from analysis.load import prepare_runs
from analysis.stats import holm_adjust, verdicts
from analysis.study import analyse
from analysis.synthetic import PlantedIntervention, generate_study


def ranking_of(differences, standard_errors, dofs, alpha=0.05) -> pd.DataFrame:
    """A ranking as the analysis writes it: t intervals, two-sided p-values, Holm across the rows."""
    difference, se, dof = (np.asarray(v, dtype=float) for v in (differences, standard_errors, dofs))
    half = stats.t.ppf(1 - alpha / 2, dof) * se
    p = 2 * stats.t.sf(np.abs(difference / se), dof)
    p_holm = holm_adjust(p)
    return pd.DataFrame(
        {
            "intervention": [f"arm{i}" for i in range(len(difference))],
            "difference": difference,
            "ci_low": difference - half,
            "ci_high": difference + half,
            "p_value": p,
            "p_holm": p_holm,
            "dof": dof,
            "verdict": verdicts(difference, p_holm, alpha, 0.0),
        }
    )


def assert_matches_verdicts(ranking: pd.DataFrame) -> None:
    excludes_zero = (ranking["holm_low"] > 0) | (ranking["holm_high"] < 0)
    assert (excludes_zero == (ranking["verdict"] != "inconclusive")).all(), ranking
    assert (ranking["holm_low"] <= ranking["ci_low"] + 1e-12).all() and (
        ranking["holm_high"] >= ranking["ci_high"] - 1e-12
    ).all()


def test_an_interval_that_excludes_zero_alone_is_widened_when_holm_keeps_it_inconclusive():
    # p about 0.03 and 0.04: each t interval excludes zero, but Holm's first step (0.03 x 2 > 0.05) stops both
    ranking = holm_intervals(ranking_of([0.33, 0.31], [0.1243, 0.1243], [8, 8]), 0.05)
    assert (ranking["ci_low"] > 0).all() and (ranking["verdict"] == "inconclusive").all()
    assert_matches_verdicts(ranking)
    assert (ranking["holm_low"] <= 0).all()


def test_random_rankings_never_contradict_their_verdicts():
    rng = np.random.default_rng(0)
    for _ in range(300):
        rows = int(rng.integers(1, 7))
        ranking = ranking_of(rng.normal(0, 0.3, rows), rng.uniform(0.05, 0.2, rows), rng.integers(1, 30, rows))
        assert_matches_verdicts(holm_intervals(ranking, 0.05))


def test_a_studys_ranking_carries_the_adjusted_interval():
    study = generate_study(
        [PlantedIntervention("no_dropout", -0.05), PlantedIntervention("qkv_bias", 0.0, changes_init=True)],
        init_seeds=(1, 2, 3, 4),
        rng_seed=5,
    )
    ranking = analyse(prepare_runs(study.runs, "adjusted", "synthetic", study.histories)).ranking
    assert {"holm_low", "holm_high", "holm_confidence"} <= set(ranking.columns)
    assert_matches_verdicts(ranking)
    assert (ranking["holm_confidence"] >= 0.95).all()
