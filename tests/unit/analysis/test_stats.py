"""Validation of the statistics on synthetic data with known truth.

Rates are checked against binomial acceptance bands that a correct method
leaves with probability 0.999, and every RNG is seeded, so the tests neither
flake nor pass by luck.  Simulations are vectorised over repetitions where the
code under test takes arrays (the t-tests, bootstrap, P(better) and verdicts).
"""

import gc

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats
from statsmodels.stats.multitest import multipletests

from analysis.compare import compare_to_baseline
from analysis.factorial import fit_factorial
from analysis.load import prepare_runs
from analysis.noise import checkpoint_noise, estimate_noise, variance_components
from analysis.stats import (
    bootstrap_interval,
    holm_adjust,
    paired_test,
    power_at,
    probability_better,
    seeds_needed,
    verdicts,
    welch_test,
)
from analysis.study import Settings, analyse
from analysis.synthetic import NoiseModel, PlantedIntervention, generate_study
from tests.conftest import assert_at_most, assert_rate

ALPHA = 0.05


def study_runs(interventions, **options):
    study = generate_study(interventions, **options)
    return prepare_runs(study.runs, "synthetic", "synthetic", study.histories)


# --- intervals cover the truth at their nominal rate -------------------------------------


def test_paired_t_interval_covers_true_difference_at_nominal_rate():
    rng = np.random.default_rng(1)
    reps, true_difference = 1000, -0.01
    differences = rng.normal(true_difference, 0.008, size=(reps, 3))
    test = paired_test(differences, ALPHA)
    covered = (test.ci_low <= true_difference) & (true_difference <= test.ci_high)
    assert_rate(int(covered.sum()), reps, 1 - ALPHA)


def test_welch_t_interval_covers_true_difference_at_nominal_rate():
    rng = np.random.default_rng(2)
    reps, true_difference = 1000, 0.02
    treated = rng.normal(3.3 + true_difference, 0.01, size=(reps, 5))
    control = rng.normal(3.3, 0.02, size=(reps, 6))
    test = welch_test(treated, control, ALPHA)
    covered = (test.ci_low <= true_difference) & (true_difference <= test.ci_high)
    assert_rate(int(covered.sum()), reps, 1 - ALPHA)


def test_bootstrap_intervals_cover_true_difference_with_enough_seeds():
    rng = np.random.default_rng(3)
    reps, true_difference = 300, -0.01
    differences = rng.normal(true_difference, 0.02, size=(reps, 20))
    low, high = bootstrap_interval((differences,), ALPHA, n_resamples=1000)
    assert_rate(int(((low <= true_difference) & (true_difference <= high)).sum()), reps, 1 - ALPHA)
    treated = rng.normal(true_difference, 0.02, size=(reps, 20))
    control = rng.normal(0.0, 0.03, size=(reps, 25))
    low, high = bootstrap_interval((treated, control), ALPHA, n_resamples=1000)
    assert_rate(int(((low <= true_difference) & (true_difference <= high)).sum()), reps, 1 - ALPHA)


@pytest.mark.parametrize("n_seeds, standardised_effect", [(3, -0.5), (6, 1.0)])
def test_probability_better_interval_covers_truth(n_seeds, standardised_effect):
    rng = np.random.default_rng(4)
    reps, sd = 600, 0.01
    differences = rng.normal(standardised_effect * sd, sd, size=(reps, n_seeds))
    estimate, low, high = probability_better(paired_test(differences, ALPHA), ALPHA)
    truth = stats.norm.cdf(-standardised_effect)
    assert np.all((0 <= low) & (low <= estimate) & (estimate <= high) & (high <= 1))
    assert_rate(int(((low <= truth) & (truth <= high)).sum()), reps, 1 - ALPHA)


def test_welch_probability_better_interval_covers_truth():
    rng = np.random.default_rng(5)
    reps = 600
    treated = rng.normal(-0.01, 0.01, size=(reps, 5))
    control = rng.normal(0.0, 0.015, size=(reps, 5))
    _, low, high = probability_better(welch_test(treated, control, ALPHA), ALPHA)
    truth = stats.norm.cdf(0.01 / np.hypot(0.01, 0.015))
    assert_rate(int(((low <= truth) & (truth <= high)).sum()), reps, 1 - ALPHA)


def test_noise_sd_intervals_cover_true_noise():
    noise = NoiseModel(init_sd=0.02, train_sd=0.006, repeat_sd=0.003)
    truth = {
        "init": np.sqrt(noise.init_sd**2 + noise.train_sd**2 + noise.repeat_sd**2),
        "train": np.hypot(noise.train_sd, noise.repeat_sd),
        "repeat": noise.repeat_sd,
    }
    reps = 120
    covered = dict.fromkeys(truth, 0)
    for rep in range(reps):
        runs = study_runs(
            [PlantedIntervention("no_dropout", -0.01), PlantedIntervention("qkv_bias", 0.0, True)],
            init_seeds=(1, 2, 3, 4),
            train_seeds=(23, 67),
            baseline_repeats=4,
            noise=noise,
            periods=3,
            rng_seed=rep,
        ).runs
        for kind, estimate in estimate_noise(runs, ALPHA).items():
            covered[kind] += estimate.ci_low <= truth[kind] <= estimate.ci_high
    for hits in covered.values():
        assert_rate(hits, reps, 1 - ALPHA)


def test_factorial_intervals_cover_planted_effects():
    main_a, main_b, interaction = -0.02, 0.01, 0.012
    # Effects coding (+-1/2): the arm effects relative to the baseline that these produce.
    cells = {"a": main_a - interaction / 2, "b": main_b - interaction / 2, "a+b": main_a + main_b}
    truth = {"a": main_a, "b": main_b, "a:b": interaction}
    reps, covered = 100, dict.fromkeys(truth, 0)
    for rep in range(reps):
        runs = study_runs(
            [PlantedIntervention(name, effect) for name, effect in cells.items()],
            init_seeds=(1, 2, 3, 4),
            train_seeds=("none",),
            baseline_repeats=1,
            periods=3,
            rng_seed=rep,
        ).runs
        effects = fit_factorial(runs, ALPHA).effects.set_index("term")
        for term, value in truth.items():
            covered[term] += effects.loc[term, "ci_low"] <= value <= effects.loc[term, "ci_high"]
    for hits in covered.values():
        assert_rate(hits, reps, 1 - ALPHA)


def test_factorial_fit_uses_only_the_arms_of_its_factors():
    runs = study_runs(
        [PlantedIntervention(name, 0.01) for name in ("a", "b", "a+b", "other")], init_seeds=(1, 2, 3), periods=3
    ).runs
    fit = fit_factorial(runs)
    assert fit.factors == ["a", "b"] and fit.blocked_by_seed
    assert fit.n_runs == (runs["intervention"] != "other").sum()
    assert fit.effects["term"].tolist() == ["a", "b", "a:b"]
    assert fit.effects["kind"].tolist() == ["main", "main", "interaction"]


def test_incomplete_factorial_design_is_reported_not_fitted():
    study = study_runs([PlantedIntervention("a", -0.01), PlantedIntervention("a+b", 0.0)], periods=3)
    analysis = analyse(study, Settings(n_resamples=999))
    assert analysis.factorial is None and "not estimable" in analysis.factorial_note
    assert fit_factorial(study_runs([PlantedIntervention("a", -0.01)], periods=3).runs) is None


# --- decisions: A/A false verdicts and power ---------------------------------------------


def test_aa_comparison_gives_a_verdict_in_at_most_alpha_of_repetitions():
    rng = np.random.default_rng(6)
    reps = 4000
    intervention = rng.normal(3.3, 0.01, size=(reps, 3))
    baseline = rng.normal(3.3, 0.01, size=(reps, 3))
    test = paired_test(intervention - baseline, ALPHA)
    verdict = verdicts(test.difference, test.p_value, ALPHA)  # one intervention: Holm = raw p
    decided = int((verdict != "inconclusive").sum())
    assert_at_most(decided, reps, ALPHA)
    assert decided > 0  # the test can fail: verdicts are reachable at all


def test_aa_study_with_several_interventions_keeps_family_error_at_alpha():
    rng = np.random.default_rng(7)
    reps, arms, seeds = 400, 4, 3
    init = rng.normal(0, 0.02, size=(reps, 1, seeds))  # shared initial weights, shared seeds
    baseline = 3.3 + init[:, 0] + rng.normal(0, 0.006, size=(reps, seeds))
    interventions = 3.3 + init + rng.normal(0, 0.006, size=(reps, arms, seeds))
    test = paired_test(interventions - baseline[:, None, :], ALPHA)
    adjusted = holm_adjust(test.p_value)
    decided = verdicts(test.difference, adjusted, ALPHA) != "inconclusive"
    assert_at_most(int(decided.any(axis=1).sum()), reps, ALPHA)


def test_planted_effect_is_found_at_the_stated_power():
    rng = np.random.default_rng(8)
    effect, noise_sd, reps = -0.008, 0.006, 600
    n_seeds = int(seeds_needed(effect, noise_sd, paired=True, alpha=ALPHA))
    stated = float(power_at(effect, noise_sd, n_seeds, paired=True, alpha=ALPHA))
    assert stated >= 0.8 > float(power_at(effect, noise_sd, n_seeds - 1, paired=True, alpha=ALPHA))
    # Paired runs with shared initial weights: init cancels, train noise remains in both arms.
    init = rng.normal(0, 0.03, size=(reps, n_seeds))
    baseline = 3.3 + init + rng.normal(0, noise_sd, size=(reps, n_seeds))
    intervention = 3.3 + effect + init + rng.normal(0, noise_sd, size=(reps, n_seeds))
    test = paired_test(intervention - baseline, ALPHA)
    found = int((verdicts(test.difference, test.p_value, ALPHA) == "better").sum())
    assert_rate(found, reps, stated)


def test_planted_effect_without_shared_seeds_is_found_at_the_stated_power():
    rng = np.random.default_rng(9)
    effect, noise_sd, reps = 0.02, 0.015, 600
    n_seeds = int(seeds_needed(effect, noise_sd, paired=False, alpha=ALPHA))
    stated = float(power_at(effect, noise_sd, n_seeds, paired=False, alpha=ALPHA))
    baseline = rng.normal(3.3, noise_sd, size=(reps, n_seeds))
    intervention = rng.normal(3.3 + effect, noise_sd, size=(reps, n_seeds))
    test = welch_test(intervention, baseline, ALPHA)
    found = int((verdicts(test.difference, test.p_value, ALPHA) == "worse").sum())
    assert_rate(found, reps, stated)


def test_verdict_needs_resolution_and_the_minimum_effect():
    difference = np.array([-0.02, -0.004, -0.02, 0.03, 0.0])
    p_adjusted = np.array([0.001, 0.001, 0.2, 0.01, 0.0])
    assert list(verdicts(difference, p_adjusted, ALPHA, min_effect=0.005)) == [
        "better",
        "inconclusive",
        "inconclusive",
        "worse",
        "inconclusive",
    ]
    assert list(verdicts(difference, p_adjusted, ALPHA, min_effect=0.0))[:2] == ["better", "better"]


def test_holm_adjust_matches_statsmodels_and_keeps_missing_values():
    p_values = np.array([0.01, np.nan, 0.04, 0.03])
    adjusted = holm_adjust(p_values)
    assert np.isnan(adjusted[1])
    expected = multipletests([0.01, 0.04, 0.03], method="holm")[1]
    np.testing.assert_allclose(adjusted[[0, 2, 3]], expected)
    np.testing.assert_allclose(adjusted[[0, 2, 3]], [0.03, 0.06, 0.06])


def direct_power(noncentrality: float, dof: float, alpha: float = ALPHA) -> float:
    """P(|T| > t_crit) for T = (Z + noncentrality) / sqrt(V / dof), V ~ chi2(dof), by quadrature."""
    critical = stats.t.isf(alpha / 2, dof)

    def given(v):
        scale = critical * np.sqrt(v / dof)
        return (stats.norm.sf(scale - noncentrality) + stats.norm.cdf(-scale - noncentrality)) * stats.chi2.pdf(v, dof)

    return integrate.quad(given, 0, np.inf, limit=200)[0]


@pytest.mark.parametrize("effect_in_sd", [0.8, 3.0, 7.65, 10.71, 15.56, 40.0])
@pytest.mark.parametrize("paired", [True, False])
def test_power_matches_a_direct_noncentral_t_computation(effect_in_sd, paired):
    for n in range(2, 7):
        if paired:
            expected = direct_power(effect_in_sd / np.sqrt(2) * np.sqrt(n), n - 1)
        else:
            expected = direct_power(effect_in_sd * np.sqrt(n / 2), 2 * n - 2)
        assert float(power_at(effect_in_sd, 1.0, n, paired)) == pytest.approx(expected, abs=1e-6)


def test_seeds_needed_where_statsmodels_power_is_nan():
    # A paired d = effect / (sqrt(2) sd) of 11: two pairs give 0.78 < 0.8, three are enough
    # (statsmodels' power is NaN at three pairs, which read as "not enough" and gave 4).
    effect = 11 * np.sqrt(2)
    assert direct_power(11 * np.sqrt(2), 1) < 0.8 <= direct_power(11 * np.sqrt(3), 2)
    assert seeds_needed(effect, 1.0, paired=True) == 3
    assert seeds_needed(7.65, 1.0, paired=True) == 3  # old: 7
    assert np.isfinite(power_at(effect, 1.0, np.arange(2, 5000), paired=True)).all()


def test_holm_adjust_is_vectorised_over_leading_axes():
    rng = np.random.default_rng(3)
    p_values = rng.uniform(0, 0.2, size=(12, 6))
    p_values[rng.uniform(size=p_values.shape) < 0.2] = np.nan
    p_values[0, :2] = 0.01  # ties
    adjusted = holm_adjust(p_values)
    gc.freeze()  # statsmodels' multipletests calls gc.collect(), slow on a big test-suite heap
    try:
        for row, expected in zip(p_values, adjusted, strict=True):
            present = np.isfinite(row)
            np.testing.assert_array_equal(np.isnan(expected), ~present)
            if present.any():
                np.testing.assert_allclose(expected[present], multipletests(row[present], method="holm")[1])
    finally:
        gc.unfreeze()


def test_seeds_needed_is_the_smallest_count_with_enough_power():
    n_seeds = seeds_needed(0.01, 0.005, paired=True)
    assert power_at(0.01, 0.005, n_seeds, paired=True) >= 0.8
    assert power_at(0.01, 0.005, n_seeds - 1, paired=True) < 0.8
    assert seeds_needed(0.0, 0.005, paired=True) == np.inf
    assert np.isnan(seeds_needed(0.01, np.nan, paired=False))


# --- the study-level comparison ----------------------------------------------------------


def test_comparison_finds_planted_effects_and_picks_the_noise_reference():
    runs = study_runs(
        [
            PlantedIntervention("no_dropout", -0.03),
            PlantedIntervention("weight_decay", 0.03),
            PlantedIntervention("qkv_bias", 0.0, changes_init=True),
        ],
        init_seeds=(42, 22, 67, 7, 8),
        noise=NoiseModel(init_sd=0.02, train_sd=0.004),
    ).runs
    noise = estimate_noise(runs, ALPHA)
    ranking = compare_to_baseline(runs, noise, ALPHA, min_effect=0.005, n_resamples=999)
    by_name = ranking.set_index("intervention")
    assert list(ranking["intervention"]) == ["no_dropout", "qkv_bias", "weight_decay"]
    assert list(by_name["verdict"]) == ["better", "inconclusive", "worse"]
    assert by_name.loc["no_dropout", "noise_reference"] == "train"
    assert by_name.loc["qkv_bias", "noise_reference"] == "init"
    assert by_name.loc["no_dropout", "noise_sd"] == pytest.approx(noise["train"].sd)
    assert by_name.loc["qkv_bias", "noise_sd"] == pytest.approx(noise["init"].sd)
    assert (ranking["design"] == "paired").all()
    assert (ranking["n_intervention_seeds"] == 5).all()
    assert (ranking["n_baseline_runs"] == 12).all()  # 5 seeds x 2 train seeds + 2 repeats
    for row in ranking.itertuples():
        assert row.ci_low <= row.difference <= row.ci_high
        assert row.p_better_low <= row.p_better <= row.p_better_high
    assert by_name.loc["no_dropout", "p_better"] > 0.9 > by_name.loc["weight_decay", "p_better"]
    expected = by_name["difference"] / by_name["noise_sd"]
    np.testing.assert_allclose(by_name["effect_in_sd"], expected)


def test_paired_differences_average_train_seeds_within_each_init_seed():
    runs = study_runs(
        [PlantedIntervention("no_dropout", -0.01)], init_seeds=(1, 2, 3), train_seeds=(23, 67), baseline_repeats=3
    ).runs
    ranking = compare_to_baseline(runs, estimate_noise(runs), n_resamples=999)
    cells = runs.groupby(["intervention", "seed", "train_seed"])["test_loss"].mean()
    per_seed = (cells["no_dropout"] - cells["baseline"]).groupby(level="seed").mean()
    expected = stats.ttest_1samp(per_seed, 0.0)
    row = ranking.iloc[0]
    assert row["p_value"] == pytest.approx(expected.pvalue)
    assert row["difference"] == pytest.approx(per_seed.mean())
    assert row["n_intervention_seeds"] == 3


def test_arm_without_shared_seeds_is_compared_with_welch_and_init_noise():
    study = generate_study([PlantedIntervention("no_dropout", -0.02)], init_seeds=(1, 2, 3, 4), baseline_repeats=1)
    runs = study.runs.drop(columns="changes_init")  # as from MLflow: fingerprints only
    runs.loc[runs["intervention"] == "no_dropout", "seed"] += 100  # no seed in common
    runs = prepare_runs(runs, "s", "test").runs
    row = compare_to_baseline(runs, estimate_noise(runs), n_resamples=999).iloc[0]
    assert row["design"] == "welch"
    assert row["noise_reference"] == "init"
    assert "not comparable" in row["reference_reason"]
    per_seed = runs.groupby(["intervention", "seed"])["test_loss"].mean()
    expected = stats.ttest_ind(per_seed["no_dropout"], per_seed["baseline"], equal_var=False)
    assert row["p_value"] == pytest.approx(expected.pvalue)


def test_arm_with_one_seed_is_tested_against_its_own_seeds_baseline():
    study = generate_study([PlantedIntervention("no_dropout", -0.5)], init_seeds=(1, 2, 3))
    runs = study.runs[(study.runs["intervention"] == "baseline") | (study.runs["seed"] == 1)]
    runs = prepare_runs(runs, "s", "test").runs
    noise = estimate_noise(runs)
    row = compare_to_baseline(runs, noise, n_resamples=999).iloc[0]
    assert row["design"] == "prediction" and row["verdict"] == "better"
    # Seed 1's baseline: cells 23 (three exact repeats, averaged first) and 67.
    assert row["baseline_runs"] == "4 runs: s1/23 x3, s1/67"
    cells = runs[runs["seed"] == 1].groupby(["intervention", "train_seed"])["test_loss"].mean()
    assert row["difference"] == pytest.approx(cells["no_dropout"].mean() - cells["baseline"].mean())
    assert row["dof"] == noise["train"].dof and np.isnan(row["boot_low"])


def test_changes_init_flag_decides_when_there_are_no_fingerprints():
    study = generate_study(
        [PlantedIntervention("no_dropout", -0.01), PlantedIntervention("qkv_bias", 0.0, changes_init=True)]
    )
    runs = prepare_runs(study.runs.drop(columns="init_fingerprint"), "s", "test").runs
    ranking = compare_to_baseline(runs, estimate_noise(runs), n_resamples=999)
    reasons = ranking.set_index("intervention")[["noise_reference", "reference_reason"]]
    assert reasons.loc["no_dropout"].tolist() == ["train", "changes_init=false"]
    assert reasons.loc["qkv_bias"].tolist() == ["init", "changes_init=true"]


def test_missing_train_noise_falls_back_to_init_noise_and_says_so():
    runs = study_runs([PlantedIntervention("no_dropout", -0.01)], train_seeds=("none",), baseline_repeats=1).runs
    noise = estimate_noise(runs)
    assert np.isnan(noise["train"].sd) and np.isfinite(noise["init"].sd)
    row = compare_to_baseline(runs, noise, n_resamples=999).iloc[0]
    assert row["noise_reference"] == "init"
    assert "train-seed noise not measured" in row["reference_reason"]


# --- noise estimates ---------------------------------------------------------------------


def test_noise_estimates_separate_the_sources():
    noise = NoiseModel(init_sd=0.03, train_sd=0.008, repeat_sd=0.002)
    runs = study_runs(
        [PlantedIntervention("no_dropout", -0.01)],
        init_seeds=tuple(range(12)),
        train_seeds=(1, 2, 3, 4),
        baseline_repeats=8,
        noise=noise,
    ).runs
    estimates = estimate_noise(runs)
    assert estimates["init"].sd > 2 * estimates["train"].sd > 4 * estimates["repeat"].sd
    # Every run enters (2 arms x 4 train seeds x 12 init seeds), but the 8 levels re-use the
    # same 12 init draws (no_dropout keeps the baseline's), which give 11 dof, not 88.
    init = estimates["init"]
    assert (init.n_runs, init.n_groups, init.nominal_dof, init.dof) == (96, 8, 88, 11)
    assert estimates["repeat"].n_runs == 8 and estimates["repeat"].dof == 7
    # Train noise: 2 arms x 12 seeds, 4 train seeds each.
    assert estimates["train"].dof == 2 * 12 * 3


def test_variance_components_recover_planted_noise():
    noise = NoiseModel(init_sd=0.02, train_sd=0.006, repeat_sd=0.002)
    runs = study_runs(
        [PlantedIntervention("qkv_bias", 0.0, changes_init=True)],
        init_seeds=tuple(range(10)),
        train_seeds=(1, 2, 3, 4),
        baseline_repeats=10,
        noise=noise,
        rng_seed=3,
    ).runs
    table, note = variance_components(runs)
    sd = table.set_index("component")["sd"]
    assert sd["init"] == pytest.approx(noise.init_sd, rel=0.5)
    assert sd["train"] == pytest.approx(noise.train_sd, rel=0.35)
    assert sd["residual"] == pytest.approx(noise.repeat_sd, rel=0.5)
    assert "baseline, qkv_bias" in note


def test_variance_components_need_a_grid():
    runs = study_runs([PlantedIntervention("no_dropout", -0.01)], train_seeds=("none",)).runs
    table, note = variance_components(runs)
    assert table is None and "grid" in note


def test_checkpoint_noise_recovers_planted_sd():
    noise = NoiseModel(checkpoint_sd=0.01)
    histories = study_runs([PlantedIntervention("no_dropout", -0.01)], noise=noise, periods=12).histories
    estimate = checkpoint_noise(histories, final_periods=5)
    assert estimate.ci_low <= noise.checkpoint_sd <= estimate.ci_high
    assert estimate.n_groups == 14 and estimate.dof == 14 * 3


def test_checkpoint_noise_ignores_non_finite_values():
    histories = pd.DataFrame(
        {
            "run_id": ["r"] * 6,
            "metric": "train_loss_avg",
            "step": range(6),
            "value": [4.0, np.inf, 3.9, np.nan, 3.8, 3.81],
        }
    )
    estimate = checkpoint_noise(histories, final_periods=5)
    assert estimate.n_runs == 4 and estimate.dof == 2 and np.isfinite(estimate.sd)


# --- the whole comparison pipeline on many synthetic studies (slow) ----------------------


@pytest.mark.slow
def test_pipeline_aa_studies_rarely_give_verdicts():
    studies, decided_studies, decided_arms = 200, 0, 0
    for rep in range(studies):
        runs = study_runs(
            [PlantedIntervention("no_dropout", 0.0), PlantedIntervention("qkv_bias", 0.0, changes_init=True)],
            init_seeds=(1, 2, 3, 4),
            periods=3,
            rng_seed=1000 + rep,
        ).runs
        ranking = compare_to_baseline(runs, estimate_noise(runs), ALPHA, n_resamples=200)
        decided = int((ranking["verdict"] != "inconclusive").sum())
        decided_arms += decided
        decided_studies += decided > 0
    assert_at_most(decided_studies, studies, ALPHA)
    assert_at_most(decided_arms, 2 * studies, ALPHA)


@pytest.mark.slow
def test_pipeline_finds_a_planted_effect_at_the_stated_power():
    noise = NoiseModel(init_sd=0.02, train_sd=0.005, repeat_sd=0.002)
    single_run_sd = np.hypot(noise.train_sd, noise.repeat_sd)  # what train-seed noise measures
    effect, studies = -0.008, 200
    n_seeds = int(seeds_needed(effect, single_run_sd, paired=True))
    stated = float(power_at(effect, single_run_sd, n_seeds, paired=True))
    found = 0
    for rep in range(studies):
        runs = study_runs(
            [PlantedIntervention("no_dropout", effect)],
            noise=noise,
            init_seeds=tuple(range(n_seeds)),
            train_seeds=("none",),
            baseline_repeats=1,
            periods=3,
            rng_seed=2000 + rep,
        ).runs
        ranking = compare_to_baseline(runs, estimate_noise(runs), ALPHA, n_resamples=200)
        found += ranking["verdict"].iloc[0] == "better"
    assert_rate(found, studies, stated)
