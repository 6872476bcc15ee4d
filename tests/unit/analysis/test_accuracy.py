"""Verdicts on HellaSwag accuracy, proven on synthetic data with known truth: the direction flips correctly (higher
is better), the binomial SE covers as it should, the paired tests on the same examples hold their false-positive
rate under A/A and find a planted difference, and disagreeing metrics are flagged. Rates are checked against
binomial bands a correct method leaves with probability 0.999; every RNG is seeded."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.accuracy import analyse_accuracy, binomial_se, mcnemar_test, paired_examples_test
from analysis.accuracy_report import accuracy_blocks, accuracy_text, disagreement_note
from analysis.load import AnalysisInputError, prepare_runs
from analysis.study import Settings, analyse
from analysis.synthetic import NoiseModel, PlantedIntervention, generate_study
from tests.conftest import assert_at_most, assert_rate

ALPHA = 0.05
EXAMPLES = 2000


def difficulty(rng, n=EXAMPLES) -> np.ndarray:
    """Per-example probabilities of a right answer, near HellaSwag's small-model accuracies (mean ~0.3)."""
    return rng.beta(1.5, 3.5, n)


def records_for(runs: pd.DataFrame, rng, shift_of) -> dict[str, dict]:
    """A per-example record per run: each example right with probability difficulty + the run's shift."""
    p = difficulty(np.random.default_rng(99))
    labels = rng.integers(0, 4, p.size)
    records = {}
    for row in runs.itertuples():
        right = rng.random(p.size) < np.clip(p + shift_of(row), 0, 1)
        choice = np.where(right, labels, (labels + 1) % 4)
        records[row.run_id] = {
            "ind": list(range(p.size)),
            "label": labels.tolist(),
            "choice_norm": choice.tolist(),
            "choice": choice.tolist(),
        }
        runs.loc[runs["run_id"] == row.run_id, "hellaswag_acc_norm"] = right.mean()
    runs["hellaswag_examples"] = p.size
    return records


def scored_study(effect_loss: float, accuracy_per_loss: float, seed: int = 0):
    """A synthetic study whose accuracy moves `accuracy_per_loss` per unit of loss (negative: the usual
    agreement, lower loss = higher accuracy), with per-example records."""
    study = generate_study(
        [PlantedIntervention("better_loss", effect_loss)], noise=NoiseModel(0.004, 0.002, 0.0, 0.01), rng_seed=seed
    )
    runs = study.runs.copy()
    base = runs.loc[runs["intervention"] == "baseline", "test_loss"].mean()
    records = records_for(runs, np.random.default_rng(seed), lambda row: accuracy_per_loss * (row.test_loss - base))
    return prepare_runs(runs, "synthetic", "synthetic", study.histories), records


def test_a_higher_accuracy_is_better_and_the_interval_is_turned_the_right_way():
    study_runs, records = scored_study(-0.03, -2.0)  # loss 0.03 lower → accuracy ~6 points higher
    loss = analyse(study_runs, Settings(n_resamples=200)).ranking
    accuracy = analyse_accuracy(study_runs, loss, n_resamples=200, records=records)
    row = accuracy.ranking.set_index("intervention").loc["better_loss"]
    assert row["verdict"] == "better" and row["difference"] > 0.03
    assert row["ci_low"] < row["difference"] < row["ci_high"] and row["ci_low"] > 0
    assert row["intervention_score"] - row["baseline_score"] == pytest.approx(row["difference"])
    assert not accuracy.agreement["disagree"].any() and disagreement_note(accuracy) == ""
    sampling = accuracy.sampling.set_index("intervention").loc["better_loss"]
    # the examples' test compares the arms' mean accuracies (all runs); the seed-noise design may match cells
    assert sampling["paired_difference"] == pytest.approx(sampling["intervention_score"] - sampling["baseline_score"])
    assert sampling["paired_se"] < sampling["independent_se"]  # the same examples: the paired SE is tighter
    assert "positive difference = better" in accuracy_text(accuracy)
    worse_runs, worse_records = scored_study(0.03, -2.0)
    worse = analyse_accuracy(worse_runs, analyse(worse_runs, Settings(n_resamples=200)).ranking, records=worse_records)
    assert worse.ranking.loc[0, "verdict"] == "worse" and worse.ranking.loc[0, "ci_high"] < 0


def test_metrics_moving_in_opposite_directions_are_flagged():
    study_runs, records = scored_study(-0.03, +2.0)  # lower loss, lower accuracy
    analysis = analyse(study_runs, Settings(n_resamples=200, metric="hellaswag_acc_norm"))
    accuracy = analyse_accuracy(study_runs, analysis.ranking, n_resamples=200, records=records)
    agreement = accuracy.agreement.set_index("intervention").loc["better_loss"]
    assert (agreement["direction_loss"], agreement["direction_accuracy"]) == ("better", "worse")
    assert agreement["disagree"] and agreement["verdicts_conflict"]
    assert "disagree in direction" in disagreement_note(accuracy)
    assert ("warning", disagreement_note(accuracy)) in accuracy_blocks(accuracy, ALPHA)
    assert analysis.verdicts.loc[0, "verdict"] == "worse"  # metric= chooses the verdicts shown


def test_metric_without_scores_is_refused_with_the_command_that_scores_them():
    study = generate_study([PlantedIntervention("x", 0.0)])
    study_runs = prepare_runs(study.runs, "plain", "synthetic", study.histories)
    assert analyse(study_runs, Settings(n_resamples=200)).accuracy is None
    with pytest.raises(AnalysisInputError, match="evaluate RUN_DIR hellaswag=true"):
        analyse(study_runs, Settings(n_resamples=200, metric="hellaswag_acc_norm"))


def test_binomial_se_is_the_sd_of_an_accuracy_and_its_interval_covers():
    rng = np.random.default_rng(1)
    p, repetitions = difficulty(rng), 4000
    truth = p.mean()
    accuracies = (rng.random((repetitions, p.size)) < truth).mean(axis=1)
    se = binomial_se(accuracies, p.size)
    assert accuracies.std(ddof=1) == pytest.approx(binomial_se(truth, p.size), rel=0.05)
    covered = int(np.sum(np.abs(accuracies - truth) <= stats.norm.ppf(1 - ALPHA / 2) * se))
    assert_rate(covered, repetitions, 1 - ALPHA)


def simulate_pairs(rng, repetitions: int, shift: float, runs: int = 1):
    """Two arms of `runs` models each on the same examples (independent answers given each example's
    difficulty): the treated arm's probabilities shifted by `shift`."""
    p = difficulty(rng, 500)
    control = rng.random((repetitions, runs, p.size)) < p
    treated = rng.random((repetitions, runs, p.size)) < np.clip(p + shift, 0, 1)
    return treated, control


def test_mcnemar_holds_its_false_positive_rate_and_finds_a_planted_difference():
    rng = np.random.default_rng(2)
    treated, control = simulate_pairs(rng, 2000, 0.0)
    hits = sum(mcnemar_test(t[0], c[0])["p_value"] < ALPHA for t, c in zip(treated, control, strict=True))
    assert_at_most(hits, 2000, ALPHA)
    treated, control = simulate_pairs(rng, 400, 0.08)
    found = sum(mcnemar_test(t[0], c[0])["p_value"] < ALPHA for t, c in zip(treated, control, strict=True))
    # the normal approximation's power: the paired difference's SE is sqrt((q - d^2) / n), q the discordant share
    q = np.mean(treated[:, 0] != control[:, 0])
    predicted = stats.norm.sf(stats.norm.ppf(1 - ALPHA / 2) - 0.08 / np.sqrt((q - 0.08**2) / 500))
    assert abs(found / 400 - predicted) < 0.1 and found / 400 > 0.6


@pytest.mark.parametrize("runs", [1, 3])
def test_the_paired_t_over_examples_holds_its_false_positive_rate_and_has_power(runs):
    rng = np.random.default_rng(3 + runs)
    treated, control = simulate_pairs(rng, 2000, 0.0, runs)
    tests = [paired_examples_test(t, c, ALPHA) for t, c in zip(treated, control, strict=True)]
    assert_rate(sum(test["p_value"] < ALPHA for test in tests), 2000, ALPHA)
    assert all(test["dof"] == 499 for test in tests)
    treated, control = simulate_pairs(rng, 400, 0.08, runs)
    tests = [paired_examples_test(t, c, ALPHA) for t, c in zip(treated, control, strict=True)]
    power = np.mean([test["p_value"] < ALPHA for test in tests])
    # the power the test's own SE predicts at the planted difference
    se = np.mean([test["se"] for test in tests])
    predicted = stats.norm.sf(stats.norm.ppf(1 - ALPHA / 2) - 0.08 / se)
    assert abs(power - predicted) < 0.1 and power > 0.5
