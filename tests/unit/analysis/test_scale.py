"""The many-arms path (sparse noise designs, one-pass plans, batched bootstrap, P(better), seeds needed) gives what
the per-arm computation gives. Its time and memory at 10,000 arms are a benchmark (make bench-analysis), not a test."""

import numpy as np
import pytest

from analysis.compare import compare_to_baseline, decide, noise_arrays, plan_comparisons
from analysis.load import prepare_runs
from analysis.noise import estimate_noise, init_identity, noise_groups
from analysis.stats import bootstrap_interval, power_at, probability_better
from analysis.synthetic import NoiseModel, PlantedIntervention, generate_study


def scan_seeds_needed(effect, noise_sd, paired, alpha=0.05, power=0.8):
    """The per-arm scan: the first number of seeds from 2 up with enough power."""
    if not (np.isfinite(effect) and np.isfinite(noise_sd)) or noise_sd <= 0:
        return np.nan
    candidates = np.arange(2, 10_001)
    reached = np.flatnonzero(power_at(effect, noise_sd, candidates, paired, alpha) >= power)
    return float(candidates[reached[0]]) if reached.size else np.inf


def dense_pooled_sd_and_dof(runs, kind):
    """Pooled SD with dense centring and covariance matrices (quadratic in the runs)."""
    grouped = noise_groups(runs, kind)
    membership = np.eye(grouped["group"].max() + 1)[grouped["group"]]
    centring = np.eye(len(grouped)) - membership @ (membership / membership.sum(axis=0)).T
    deviations = grouped["test_loss"].to_numpy() @ centring
    nominal = len(grouped) - membership.shape[1]
    dof = float(nominal)
    if kind == "init":
        draws = init_identity(runs).loc[grouped.index].to_numpy()
        product = centring @ (draws[:, None] == draws[None, :]).astype(float)
        dof = round(float(np.trace(product) ** 2 / np.trace(product @ product)), 9)
    return np.sqrt(np.square(deviations).sum() / nominal), dof


@pytest.fixture(scope="module")
def many_arms():
    arms = [PlantedIntervention(f"arm{i:03d}", 0.01 * (i % 7 - 3), changes_init=i % 3 == 0) for i in range(300)]
    study = generate_study(arms, init_seeds=(42, 22, 67), train_seeds=(23, "none"), noise=NoiseModel(), rng_seed=3)
    return prepare_runs(study.runs, "many", "synthetic", study.histories).runs


def test_noise_estimates_match_the_dense_computation(many_arms):
    noise = estimate_noise(many_arms)
    for kind in ("init", "train", "repeat"):
        sd, dof = dense_pooled_sd_and_dof(many_arms, kind)
        assert noise[kind].sd == pytest.approx(sd, rel=1e-12) and noise[kind].dof == pytest.approx(dof, rel=1e-9)


def test_300_arms_give_what_each_arm_gives_alone(many_arms):
    noise = estimate_noise(many_arms)
    ranking = compare_to_baseline(many_arms, noise, n_resamples=999).set_index("intervention")
    assert len(ranking) == 300 and set(ranking["design"]) == {"paired"}
    plans = plan_comparisons(many_arms, {"train", "init"})
    losses = many_arms["test_loss"].to_numpy()
    tests = decide(plans, losses, noise_arrays(noise)).tests
    for plan, test in list(zip(plans, tests, strict=True))[::37]:
        row = ranking.loc[plan.intervention]
        treated, control = plan.replicates(losses)
        dense_treated, dense_control = losses @ plan.treated.toarray().T, losses @ plan.control.toarray().T
        np.testing.assert_allclose(treated, dense_treated, rtol=1e-14)
        np.testing.assert_allclose(control, dense_control, rtol=1e-14)
        assert (row["boot_low"], row["boot_high"]) == bootstrap_interval((treated - control,), 0.05, 999, 0)
        assert (row["p_better"], row["p_better_low"], row["p_better_high"]) == pytest.approx(
            tuple(float(v) for v in probability_better(test)), rel=1e-9
        )
        expected = scan_seeds_needed(row["difference"], row["noise_sd"], True)
        assert row["seeds_needed"] == expected


def test_per_arm_figures_are_left_out_beyond_the_cap_with_a_note(tmp_path):
    from analysis.report import MAX_FIGURE_ARMS, write_report
    from analysis.study import Settings, analyse

    arms = [PlantedIntervention(f"arm{i:03d}", 0.0) for i in range(MAX_FIGURE_ARMS + 1)]
    study = generate_study(arms, init_seeds=(42, 22), train_seeds=("none",), baseline_repeats=1, periods=4)
    analysis = analyse(prepare_runs(study.runs, "capped", "synthetic", study.histories), Settings(n_resamples=100))
    files = write_report(analysis, tmp_path)
    assert [path.name for path in files.figures] == ["noise.png"]
    assert f"{MAX_FIGURE_ARMS + 1} interventions: the training-loss and forest figures" in files.markdown.read_text()


def test_the_thin_evidence_note_names_a_bounded_number_of_arms(many_arms):
    from analysis.report import MAX_LISTED_ARMS, thin_evidence_note

    ranking = compare_to_baseline(many_arms, estimate_noise(many_arms), n_resamples=100)
    thin = ranking.assign(thin_evidence=True, warning="thin evidence: 2.0 dof < 3")
    note = thin_evidence_note(thin)
    assert "\n" not in note and note.count("(2.0 dof < 3)") == MAX_LISTED_ARMS
    assert f"and {300 - MAX_LISTED_ARMS} more (ranking.csv: thin_evidence)" in note
