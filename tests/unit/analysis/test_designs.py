"""The designs users can afford: one run per intervention at one init seed, plus a noise study.

Deterministic checks on the reproduced study's own design (docs/study.md), then simulations of thousands of
studies through the real verdict path (``decide_studies``: noise estimates, plans, tests, Holm,
verdicts), vectorised so that they run in seconds.  Rates are checked against binomial bands
that a correct method leaves with probability 0.999; every RNG is seeded.
"""

import io

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.__main__ import main
from analysis.compare import compare_to_baseline, decide_studies
from analysis.load import prepare_runs
from analysis.noise import (
    declared_noise_reference,
    estimate_noise,
    noise_designs,
    noise_levels,
    pooled_variance,
)
from analysis.stats import THIN_DOF, prediction_test, t_test_power
from analysis.synthetic import (
    SEEDS_BASELINE_CELLS,
    SEEDS_BASELINE_LOSS,
    SEEDS_INTERVENTION_CELLS,
    SEEDS_NOISE,
    NoiseModel,
    PlantedIntervention,
    generate_study,
    seeds_interventions,
)
from tests.conftest import assert_at_most, assert_rate

ALPHA = 0.05
GRID_3X3 = tuple((seed, train_seed) for seed in (42, 22, 67) for train_seed in ("none", 23, 67))

# The seeds' design with plausible losses: seeds 22 and 67 sit clearly above seed 42, and
# no_amp and weight_tying are slightly worse than the seed-42 baseline they share init with.
SEEDS_CSV = """intervention,seed,train_seed,changes_init,test_loss
baseline,42,none,false,3.691526
baseline,22,none,false,3.708930
baseline,67,none,false,3.714520
baseline,42,23,false,3.695810
baseline,42,67,false,3.688240
baseline,22,23,false,3.713410
baseline,67,23,false,3.709870
gradient_clipping,42,none,false,3.678120
no_dropout,42,none,false,3.667340
qkv_bias,42,none,true,3.669050
lr_schedule,42,none,false,3.603210
weight_decay,42,none,false,3.653480
weight_tying,42,none,true,3.694580
no_amp,42,none,false,3.695790
"""


def seeds_runs() -> pd.DataFrame:
    return prepare_runs(pd.read_csv(io.StringIO(SEEDS_CSV)), "seeds", "test").runs


def seeds_study(interventions, baseline_cells=GRID_3X3, noise=SEEDS_NOISE, **options):
    return generate_study(
        interventions,
        baseline_cells=baseline_cells,
        intervention_cells=SEEDS_INTERVENTION_CELLS,
        baseline_repeats=1,
        noise=noise,
        baseline_loss=SEEDS_BASELINE_LOSS,
        periods=3,
        **options,
    )


def simulate(study, repetitions: int, rng_seed: int, min_effect: float = 0.0):
    """Plans and decisions for ``repetitions`` fresh studies of the design of ``study``."""
    runs = prepare_runs(study.runs, "simulated", "synthetic").runs
    losses = study.simulate(repetitions, np.random.default_rng(rng_seed))
    losses = losses[:, pd.Index(study.runs["run_id"]).get_indexer(runs["run_id"])]
    plans, decisions = decide_studies(runs, losses, ALPHA, min_effect)
    return {plan.intervention: i for i, plan in enumerate(plans)}, plans, decisions, runs, losses


# --- the seeds' design, deterministically ----------------------------------------------------


def test_seeds_design_gives_verdicts_with_intervals_against_the_right_baseline():
    runs = seeds_runs()
    ranking = compare_to_baseline(runs, estimate_noise(runs), n_resamples=999)
    rows = ranking.set_index("intervention")
    assert (rows["design"] == "prediction").all()
    assert rows[["ci_low", "ci_high", "p_value", "p_holm", "dof"]].notna().all().all()
    assert set(rows["verdict"]) >= {"better", "inconclusive"}

    losses = runs.set_index(["intervention", "seed", "train_seed"])["test_loss"]
    seed42 = losses["baseline"][42]  # the 3 baseline runs sharing no_amp's initial weights
    for name in ("no_amp", "gradient_clipping", "lr_schedule"):
        row = rows.loc[name]
        assert row["baseline_runs"] == "3 runs: s42/none, s42/23, s42/67"
        assert row["baseline_loss"] == pytest.approx(seed42.mean())
        assert row["difference"] == pytest.approx(losses[name][42]["none"] - seed42.mean())
        assert row["method"] == "prediction t vs train-seed noise" and row["dof"] == 4
    # The sign case: no_amp is worse than the seed-42 baseline although better than the
    # mean over all init seeds (which seeds 22 and 67 pull up).
    assert losses["no_amp"][42]["none"] < losses["baseline"].mean()
    assert rows.loc["no_amp", "difference"] > 0
    # qkv_bias draws its own weights: the baseline's init seeds at its train-seed level.
    qkv = rows.loc["qkv_bias"]
    assert qkv["baseline_runs"] == "3 runs: s42/none, s22/none, s67/none"
    assert qkv["method"] == "prediction t vs init-seed noise" and qkv["noise_reference"] == "init"
    assert qkv["thin_evidence"] and qkv["warning"] == "thin evidence: 2.0 dof < 3"
    # weight_tying has its own fingerprint, but the registry declares train-seed noise.
    tying = rows.loc["weight_tying"]
    assert (tying["noise_reference"], tying["reference_rule"]) == ("train", "registry")
    assert tying["baseline_runs"] == "3 runs: s42/none, s42/23, s42/67"


def test_prediction_test_is_the_hand_calculation():
    runs = seeds_runs()
    noise = estimate_noise(runs)
    row = compare_to_baseline(runs, noise, n_resamples=999).set_index("intervention").loc["no_dropout"]
    baseline = runs[(runs["intervention"] == "baseline") & (runs["seed"] == 42)]["test_loss"]
    run = runs[runs["intervention"] == "no_dropout"]["test_loss"].iloc[0]
    standard_error = noise["train"].sd * np.sqrt(1 / 1 + 1 / 3)
    t = (run - baseline.mean()) / standard_error
    assert row["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), 4))
    half = stats.t.isf(ALPHA / 2, 4) * standard_error
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(
        (run - baseline.mean() - half, run - baseline.mean() + half)
    )


def test_prediction_test_is_vectorised_and_broadcasts_the_noise():
    rng = np.random.default_rng(0)
    treated, control = rng.normal(size=(5, 2)), rng.normal(size=(5, 4))
    sd, dof = rng.uniform(0.5, 2, size=5), np.array([1.0, 2.0, 3.5, 4.0, 30.0])
    batch = prediction_test(treated, control, sd, dof)
    for i in range(5):
        one = prediction_test(treated[i], control[i], sd[i], dof[i])
        assert float(one.p_value) == pytest.approx(batch.p_value[i])
        assert float(one.ci_low) == pytest.approx(batch.ci_low[i])
    assert np.isnan(prediction_test(treated, control, sd, 0.0).p_value).all()


def test_noise_estimates_use_every_run_and_count_init_draws_once():
    runs = seeds_runs()
    noise, levels = estimate_noise(runs), noise_levels(runs)
    train_levels = levels[levels["noise"] == "train"]
    init_levels = levels[levels["noise"] == "init"]
    assert train_levels["runs"].tolist() == ["s42/none, s42/23, s42/67", "s22/none, s22/23", "s67/none, s67/23"]
    assert init_levels["level"].tolist() == ["train_seed none", "train_seed 23"]
    for kind, table in (("train", train_levels), ("init", init_levels)):
        pooled = np.sqrt(((table["n"] - 1) * table["sd"] ** 2).sum() / (table["n"] - 1).sum())
        assert noise[kind].sd == pytest.approx(pooled)  # a user can redo it from the levels
        assert noise[kind].nominal_dof == (table["n"] - 1).sum()
        np.testing.assert_allclose(table["sd"], table["population_sd"] * np.sqrt(table["n"] / (table["n"] - 1)))
    assert (noise["train"].n_runs, noise["train"].dof) == (7, 4)
    # Both init levels start from the same three init draws: 2 dof, not 4.
    assert (noise["init"].n_runs, noise["init"].nominal_dof, noise["init"].dof) == (6, 4, 2)


@pytest.mark.parametrize("noise", [SEEDS_NOISE, NoiseModel(init_sd=0.006, train_sd=0.006, repeat_sd=0.0)])
def test_init_noise_dof_are_conservative_and_tight_when_init_noise_dominates(noise):
    """The dof of the pooled init variance, checked against its simulated spread."""
    study = seeds_study(seeds_interventions(), noise=noise)
    runs = prepare_runs(study.runs, "s", "test").runs
    design = noise_designs(runs)["init"]
    variances = pooled_variance(design, study.simulate(20_000, np.random.default_rng(1)))
    implied_dof = 2 * variances.mean() ** 2 / variances.var()  # of a scaled chi-square
    assert variances.mean() == pytest.approx(noise.init_sd**2 + noise.train_sd**2, rel=0.03)
    assert (design.nominal_dof, design.dof) == (6, 2)
    assert implied_dof >= design.dof
    if noise is SEEDS_NOISE:  # init noise dominates: the true dof are barely above 2
        assert implied_dof < 2.5


def test_registry_declaration_overrides_the_fingerprint_rule():
    assert declared_noise_reference("weight_tying") == "train"
    assert declared_noise_reference("no_dropout+weight_tying") == "train"
    assert declared_noise_reference("qkv_bias+weight_tying") is None  # fingerprints decide
    assert declared_noise_reference("no_dropout") is None
    assert declared_noise_reference("not_registered") is None


def test_arm_without_a_baseline_run_at_its_init_seed_is_judged_against_init_noise():
    runs = seeds_runs()
    runs.loc[runs["intervention"] == "no_dropout", "seed"] = 7  # a seed the baseline never ran
    row = compare_to_baseline(runs, estimate_noise(runs), n_resamples=999).set_index("intervention").loc["no_dropout"]
    assert row["method"] == "prediction t vs init-seed noise"
    assert "no baseline run at its init seed" in row["reference_reason"]
    assert row["baseline_runs"] == "3 runs: s42/none, s22/none, s67/none"


def test_same_init_arm_pairs_init_seeds_without_a_shared_cell():
    study = generate_study(
        [PlantedIntervention("no_dropout", -0.01)],
        init_seeds=(1, 2, 3),
        baseline_cells=[(s, t) for s in (1, 2, 3) for t in ("none", 23)],
        intervention_cells=[(s, 99) for s in (1, 2, 3)],
        baseline_repeats=1,
    )
    runs = prepare_runs(study.runs, "s", "test").runs
    row = compare_to_baseline(runs, estimate_noise(runs), n_resamples=999).iloc[0]
    assert row["design"] == "paired" and row["dof"] == 2 and row["thin_evidence"]
    cells = runs.groupby(["intervention", "seed"])["test_loss"].mean()
    per_seed = cells["no_dropout"] - cells["baseline"]
    assert row["p_value"] == pytest.approx(stats.ttest_1samp(per_seed, 0.0).pvalue)


# --- simulations of thousands of studies through the real verdict path -------------------------


def test_aa_seeds_design_keeps_the_study_wide_error_at_alpha():
    """(a) No true effects, the seeds' design: 7 interventions once at seed 42, 3x3 baseline grid.

    Study-wide: the share of studies with any better/worse verdict (Holm across the seven) is at
    most alpha.  Per comparison: each unadjusted test rejects at most alpha of the time, the
    train-seed ones at exactly alpha (the test is exact), the init-seed one (qkv_bias, 2 dof
    counted conservatively) below it.
    """
    repetitions = 4000
    index, plans, decisions, _, _ = simulate(seeds_study(seeds_interventions()), repetitions, 11)
    assert {plan.design for plan in plans} == {"prediction"}
    assert plans[index["qkv_bias"]].reference == "init"
    assert plans[index["weight_tying"]].reference == "train"
    decided = decisions.verdict != "inconclusive"
    assert_at_most(int(decided.any(axis=-1).sum()), repetitions, ALPHA)
    rejected = (decisions.p_value < ALPHA).sum(axis=0)
    for name, column in index.items():
        if name == "qkv_bias":
            assert_at_most(int(rejected[column]), repetitions, ALPHA)
        else:
            assert_rate(int(rejected[column]), repetitions, ALPHA)
    assert decided.sum() > 0  # verdicts are reachable at all


def test_aa_seeds_design_with_the_seeds_own_baseline_grid():
    """(a) again with the seeds' exact 7-run baseline noise study (4 train dof, 2 init dof)."""
    repetitions = 4000
    study = seeds_study(seeds_interventions(), baseline_cells=SEEDS_BASELINE_CELLS)
    index, _, decisions, _, _ = simulate(study, repetitions, 12)
    assert_at_most(int((decisions.verdict != "inconclusive").any(axis=-1).sum()), repetitions, ALPHA)
    rejected = (decisions.p_value < ALPHA).sum(axis=0)
    assert_rate(int(rejected[index["no_dropout"]]), repetitions, ALPHA)
    assert_at_most(int(rejected[index["qkv_bias"]]), repetitions, ALPHA)
    assert decisions.thin_evidence[:, index["qkv_bias"]].all()
    assert not decisions.thin_evidence[:, index["no_dropout"]].any()


def test_planted_effect_of_four_train_sds_is_found_at_the_stated_power():
    """(b) One intervention, -4 train-seed SDs, run once at seed 42 against a 3x3 grid.

    Per comparison (alone in its study, Holm changes nothing): the prediction test's power is
    exact, from the noncentral t with the train estimate's 6 dof.  With six null interventions
    beside it Holm divides alpha by seven, and the same effect is found far less often.
    """
    repetitions, sd = 4000, SEEDS_NOISE.single_run_train_sd
    study = seeds_study([PlantedIntervention("no_dropout", -4 * sd)])
    _, _, decisions, _, _ = simulate(study, repetitions, 13)
    stated = float(t_test_power(4 / np.sqrt(1 + 1 / 3), 6, ALPHA))
    assert stated >= 0.8
    assert_rate(int((decisions.verdict[:, 0] == "better").sum()), repetitions, stated)
    assert (decisions.verdict[:, 0] != "worse").all()


@pytest.mark.parametrize("offset", [+10, -10])
def test_same_init_effect_keeps_its_sign_whatever_the_other_init_seeds_do(offset):
    """(c) -1 train-seed SD at seed 42, with the baseline's seeds 22 and 67 far above or below."""
    repetitions, sd = 4000, SEEDS_NOISE.single_run_train_sd
    init_sd = np.hypot(SEEDS_NOISE.init_sd, sd)
    study = seeds_study(
        [PlantedIntervention("no_dropout", -sd)],
        baseline_cells=SEEDS_BASELINE_CELLS,
        init_offsets={22: offset * init_sd, 67: offset * init_sd},
    )
    _, _, decisions, runs, losses = simulate(study, repetitions, 14)
    difference = decisions.difference[:, 0]
    # Unbiased: the mean estimate is the planted -1 SD, within 4 standard errors.
    standard_error = sd * np.sqrt(1 + 1 / 3) / np.sqrt(repetitions)
    assert abs(difference.mean() + sd) < 4 * standard_error
    assert_rate(int((difference < 0).sum()), repetitions, stats.norm.cdf(1 / np.sqrt(1 + 1 / 3)))
    covered = (decisions.ci_low[:, 0] <= -sd) & (-sd <= decisions.ci_high[:, 0])
    assert_rate(int(covered.sum()), repetitions, 1 - ALPHA)
    # The premise: against the mean of every baseline run the sign follows the other seeds.
    arm = (runs["intervention"] == "no_dropout").to_numpy()
    naive = losses[:, arm].mean(axis=-1) - losses[:, ~arm].mean(axis=-1)
    assert np.sign(naive.mean()) == -np.sign(offset)


def test_aa_paired_design_still_controls_the_error():
    """Every arm at every cell of 3 init seeds x 2 train seeds: the paired t over init seeds."""
    repetitions = 4000
    study = generate_study(
        seeds_interventions(),
        init_seeds=(42, 22, 67),
        train_seeds=(23, 67),
        baseline_repeats=1,
        noise=SEEDS_NOISE,
        periods=3,
    )
    index, plans, decisions, _, _ = simulate(study, repetitions, 15)
    assert {plan.design for plan in plans} == {"paired"}
    assert_at_most(int((decisions.verdict != "inconclusive").any(axis=-1).sum()), repetitions, ALPHA)
    rejected = (decisions.p_value < ALPHA).sum(axis=0)
    for column in index.values():
        assert_rate(int(rejected[column]), repetitions, ALPHA)
    assert (decisions.dof == 2).all() and decisions.thin_evidence.all()


# --- the command line on the seeds' design -----------------------------------------------------


def test_seeds_design_csv_through_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "seeds.csv"
    path.write_text(SEEDS_CSV)
    assert main([f"csv={path}", f"out={tmp_path / 'out'}", "resamples=999"]) == 0
    printed = capsys.readouterr().out
    assert "too few seeds" not in printed
    assert "prediction t vs train-seed noise" in printed and "3 runs: s42/none, s42/23" in printed
    assert f"(!) Thin evidence: 1 of 7 verdicts rest on fewer than {THIN_DOF}" in printed
    ranking = pd.read_csv(tmp_path / "out" / "ranking.csv").set_index("intervention")
    assert ranking["ci_low"].notna().all() and ranking["p_holm"].notna().all()
    assert ranking["thin_evidence"].tolist().count(True) == 1
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "> **(!) Thin evidence" in markdown and "prediction t" in markdown
    assert "| qkv_bias | prediction t vs init-seed noise | 2.0 |" in markdown
    assert "population SD (ddof=0)" in markdown
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'class="warning"' in html and "thin evidence: 2.0 dof" in html
    assert (tmp_path / "out" / "noise_levels.csv").exists()
