"""Sequential studies: boundaries, the decisions after each round, and the proof by simulation.

The simulations drive thousands of studies through the real decision path (the fixed analysis's plans
and tests at every look, then the group-sequential Holm procedure), vectorised; the replay test shows
that :func:`sequential_decisions` on one study's run table takes the same decisions.  Rates are
checked against binomial bands that a correct method leaves with probability 0.999; every RNG is
seeded.
"""

import numpy as np
import pandas as pd
import pytest
from scipy import special, stats
from scipy.stats import multivariate_normal

from analysis.compare import decide_studies
from analysis.sequential.boundaries import normal_boundaries, paired_t_boundaries, spent_alpha, t_cdf
from analysis.sequential.procedure import last_look, round_seeds, sequential_decisions
from analysis.sequential.simulate import SequentialDesign
from analysis.sequential.table import (
    SCHEDULE,
    TRAIN_SD,
    compare_designs,
    planted_effects,
    seeds_like_study,
    simulated_losses,
)
from tests.conftest import assert_at_most, assert_rate

ALPHA = 0.05
MAX_SEEDS = 8
NAMES = ["gradient_clipping", "lr_schedule", "no_amp", "no_dropout", "qkv_bias", "weight_decay", "weight_tying"]


@pytest.fixture(scope="module")
def design():
    """The seeds-like study with max_seeds 8, planned once for every simulation here."""
    _, runs = seeds_like_study(MAX_SEEDS)
    return SequentialDesign(runs, SCHEDULE, MAX_SEEDS)


def round_runs(runs: pd.DataFrame, decided_at: dict[str, int], losses) -> pd.DataFrame:
    """The runs a sequential study ran: each arm until its decision, the baseline until the last."""
    position = runs["seed"].map({seed: i + 1 for i, seed in enumerate(SCHEDULE)})
    last = max(decided_at.values()) if all(decided_at.values()) else MAX_SEEDS
    until = runs["intervention"].map(lambda name: decided_at.get(name) or MAX_SEEDS)
    kept = np.where(runs["intervention"] == "baseline", position <= last, position <= until)
    return runs[kept].assign(test_loss=np.asarray(losses)[kept]).reset_index(drop=True)


# --- boundaries --------------------------------------------------------------------------------


@pytest.mark.parametrize("spending", ["obrien_fleming", "pocock"])
def test_normal_boundaries_are_the_published_lan_demets_ones(spending):
    """5 equal looks, two-sided 0.05: gsDesign's sfLDOF boundaries; Pocock's nearly flat ones; and both
    spend alpha(t) exactly."""
    fractions = np.arange(1, 6) / 5
    boundaries = normal_boundaries(fractions, ALPHA, spending=spending)
    if spending == "obrien_fleming":
        np.testing.assert_allclose(boundaries, [4.8769, 3.3570, 2.6803, 2.2898, 2.0310], atol=2e-4)
    else:
        assert (np.diff(boundaries) < 0).all() and boundaries[0] - boundaries[-1] < 0.06
        assert spent_alpha(0.5, ALPHA, spending) == pytest.approx(ALPHA * np.log(1 + (np.e - 1) / 2))
    correlation = np.sqrt(np.minimum.outer(fractions, fractions) / np.maximum.outer(fractions, fractions))
    for look in (2, 3, 5):  # scipy's multivariate normal (its quasi-Monte Carlo seeded), independently of the recursion
        inside = multivariate_normal(np.zeros(look), correlation[:look, :look], seed=0).cdf(
            boundaries[:look], lower_limit=-boundaries[:look]
        )
        assert 1 - inside == pytest.approx(spent_alpha(fractions[look - 1], ALPHA, spending), abs=2e-5)
    assert spent_alpha(1.0, ALPHA, spending) == pytest.approx(ALPHA)
    assert spent_alpha(0.0, ALPHA, spending) == 0


def test_closed_form_t_cdf_matches_scipy():
    x = np.concatenate([np.linspace(-60, 60, 4001), [-np.inf, np.inf, 1e9, -1e9]])
    for dof in range(1, 41):
        np.testing.assert_allclose(t_cdf(dof, x), special.stdtr(dof, x), rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "level, spending", [(ALPHA, "obrien_fleming"), (ALPHA / 7, "obrien_fleming"), (ALPHA, "pocock")]
)
def test_paired_t_boundaries_spend_exactly_and_the_nominal_transfer_does_not(level, spending):
    """Monte Carlo on 400,000 null paths of per-seed differences, paired looks at 2..8 of 8 seeds.

    The exact boundaries cross first at each look with the spending function's increment and
    spend alpha in all.  The textbook transfer (a t-test's p-value against the nominal level of
    the normal-theory boundary) crosses more often: the symptom the exact boundaries fix.
    """
    seeds = np.arange(2, MAX_SEEDS + 1)
    increments = np.diff(spent_alpha(seeds / MAX_SEEDS, level, spending), prepend=0.0)
    exact = paired_t_boundaries(seeds, increments)
    nominal = stats.t.isf(stats.norm.sf(normal_boundaries(seeds / MAX_SEEDS, level, spending=spending)), seeds - 1)
    paths = 400_000
    differences = np.random.default_rng(21).normal(size=(paths, MAX_SEEDS))
    sums, squares = differences.cumsum(axis=1), (differences**2).cumsum(axis=1)
    mean = sums[:, seeds - 1] / seeds
    sd = np.sqrt((squares[:, seeds - 1] - seeds * mean**2) / (seeds - 1))
    statistic = np.abs(mean / (sd / np.sqrt(seeds)))
    first = (statistic >= exact).argmax(axis=1)
    crossed = (statistic >= exact).any(axis=1)
    assert_rate(int(crossed.sum()), paths, level)
    for look in np.flatnonzero(increments * paths >= 200):  # looks with a measurable increment
        assert_rate(int((crossed & (first == look)).sum()), paths, increments[look])
    inflated = int((statistic >= nominal).any(axis=1).sum())
    assert inflated > stats.binom.isf(0.001, paths, level)
    assert (np.diff(exact) < 0).all() and exact[-1] > nominal[-1]


def test_paired_t_boundaries_handle_gaps_and_levels_at_once():
    """A missing look (seeds 2, 4, 5) and several levels in one call give the single-call values."""
    levels = ALPHA / np.arange(1, 4)
    increments = np.diff(spent_alpha(np.array([2, 4, 5])[:, None] / 5, levels), axis=0, prepend=0.0)
    together = paired_t_boundaries((2, 4, 5), increments)
    for column in range(3):
        alone = paired_t_boundaries((2, 4, 5), increments[:, column])
        np.testing.assert_allclose(together[column], alone)
    assert (np.diff(together, axis=0) > 0).all()  # a lower level, a higher boundary
    with pytest.raises(ValueError, match="increasing seed counts from 2"):
        paired_t_boundaries((1, 2), [0.01, 0.01])


# --- one study, round by round -----------------------------------------------------------------


def test_look_one_tests_against_the_noise_study_and_can_conclude_nothing():
    """Round 1: every arm at seed 42, the baseline at seed 42 with train seeds none, 23, 67.

    The same-init arms get the prediction t against train-seed noise (2 dof); its boundary is
    the marginal t quantile of the alpha O'Brien-Fleming spends at 1/8 at the Holm level
    alpha/7 (3e-16): tens of millions of noise SDs, so look 1 decides nothing however large the
    effect.  qkv_bias needs init-seed noise, which one baseline seed cannot give.
    """
    study, runs = seeds_like_study(MAX_SEEDS, {"lr_schedule": -50 * TRAIN_SD})
    first_round = runs[runs["seed"] == SCHEDULE[0]]
    look = sequential_decisions(first_round, SCHEDULE, 1, MAX_SEEDS)
    table = look.table.set_index("intervention")
    assert (table["decision"] == "open").all()
    assert look.stop_reason is None and look.next_seed == SCHEDULE[1]
    assert look.next_round == ["baseline"] + NAMES
    lr = table.loc["lr_schedule"]
    assert lr["method"] == "prediction t vs train-seed noise" and lr["dof"] == 2
    assert lr["level"] == pytest.approx(ALPHA / 7)
    spent = spent_alpha(1 / MAX_SEEDS, ALPHA / 7)
    assert lr["boundary"] == pytest.approx(stats.t.isf(spent / 2, 2))
    assert lr["difference"] < 0 and lr["rci_low"] < 0 < lr["rci_high"]
    assert lr["more_seeds"] >= 1 and not lr["beyond_max_seeds"]
    qkv = table.loc["qkv_bias"]
    assert qkv["method"] == "no test" and np.isnan(qkv["difference"])
    assert np.isnan(qkv["more_seeds"])  # nothing to estimate from
    assert look.baseline.seeds == 1 and look.baseline.noise["train"][1] == 2
    assert look.baseline.next_seed == 22
    assert look.baseline.more_seeds == table["more_seeds"].max()  # NaN-safe: qkv_bias's is NaN
    assert np.isnan(look.baseline.noise["init"][0])
    assert not look.missing
    text = look.markdown()
    assert "next round: init seed 22 for baseline, gradient_clipping" in text
    assert "| qkv_bias | open | - | 0 | n/a | [n/a, n/a] | - | - | - | no test | unknown |" in text
    assert "Lan-DeMets O'Brien-Fleming" in text


def test_replay_takes_the_simulated_decisions_and_ignores_unscheduled_runs(design):
    """Studies simulated in bulk, then one replayed from the run table its rounds made."""
    study, runs = seeds_like_study(MAX_SEEDS, planted_effects(NAMES[:4], 4.0))
    losses = simulated_losses(study, runs, 40, 31)
    simulated = design.simulate(losses)
    staggered = [r for r in range(40) if len(set(simulated.decided_at[r][simulated.decided_at[r] > 0])) >= 2]
    assert staggered and (simulated.decision == "better").any()
    rep = staggered[0]
    decided_at = dict(zip(simulated.interventions, simulated.decided_at[rep]))
    ran = round_runs(runs, decided_at, losses[rep])
    assert len(ran) == simulated.trials[rep]
    ran_seeds = ran.groupby("intervention")["seed"].nunique()
    assert ran_seeds[simulated.interventions].tolist() == simulated.seeds[rep].tolist()
    look = sequential_decisions(ran, SCHEDULE, last_look(MAX_SEEDS), MAX_SEEDS)
    table = look.table.set_index("intervention").loc[simulated.interventions]
    assert table["decision"].tolist() == simulated.decision[rep].tolist()
    decided_at_look = table["decided_at_look"].fillna(0).astype(int)
    assert decided_at_look.tolist() == simulated.decided_at[rep].tolist()
    np.testing.assert_allclose(table["rci_low"], simulated.ci_low[rep])
    decided = table[table["decision"] != "open"]
    assert (decided["rci_high"] < 0).all()
    assert (decided["seeds"] == decided["decided_at_look"]).all()
    assert look.stop_reason in ("max_seeds reached", "nothing open") and look.next_seed is None
    counts = look.counts()
    all_decided = (simulated.decided_at[rep] > 0).all()
    assert counts["look"] == (simulated.decided_at[rep].max() if all_decided else MAX_SEEDS)
    assert counts["n_better"] == (simulated.decision[rep] == "better").sum()
    assert sum(counts[key] for key in ("n_better", "n_worse", "n_no_effect", "n_open")) == 7

    # A run the design did not schedule (a decided arm at a later seed) changes nothing.
    arm, at = min(((name, when) for name, when in decided_at.items() if 0 < when < MAX_SEEDS), key=lambda item: item[1])
    extra = runs[(runs["intervention"] == arm) & (runs["seed"] == SCHEDULE[at])]
    extra = extra.assign(test_loss=extra["test_loss"] + 1.0)
    again = sequential_decisions(pd.concat([ran, extra]), SCHEDULE, last_look(MAX_SEEDS), MAX_SEEDS)
    pd.testing.assert_frame_equal(again.table, look.table)


def test_a_missing_run_is_listed_and_holds_the_arms_back():
    """Round 2 without the baseline's seed-22 run: nothing pairs, so no arm is tested again."""
    _, runs = seeds_like_study(MAX_SEEDS)
    two_rounds = runs[runs["seed"].isin(SCHEDULE[:2])]
    without = two_rounds[~((two_rounds["intervention"] == "baseline") & (two_rounds["seed"] == SCHEDULE[1]))]
    look = sequential_decisions(without, SCHEDULE, 2, MAX_SEEDS)
    assert look.missing == [("baseline", SCHEDULE[1])]
    assert "Scheduled without a finished run: baseline seed 22" in look.markdown()
    table = look.table.set_index("intervention")
    assert (table.drop(index="qkv_bias")["seeds"] == 1).all()
    complete = sequential_decisions(two_rounds, SCHEDULE, 2, MAX_SEEDS).table
    assert (complete["seeds"] == 2).all()
    assert (complete["method"] == "paired t over 2 init seeds").all()


def test_first_seeds_two_starts_with_paired_tests():
    _, runs = seeds_like_study(4)
    look = sequential_decisions(runs[runs["seed"].isin(SCHEDULE[:2])], SCHEDULE, 1, 4, first_seeds=2)
    assert (look.table["method"] == "paired t over 2 init seeds").all()
    assert look.next_seed == SCHEDULE[2] and last_look(4, first_seeds=2) == 3
    assert round_seeds(SCHEDULE, 1, 2) == [42, 22] and round_seeds(SCHEDULE, 3, 2) == [1]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(look=9), "has looks 1 to 8"),
        (dict(look=0), "has looks 1 to 8"),
        (dict(seeds=SCHEDULE[:5]), "lists 5 init seeds; max_seeds=8"),
        (dict(seeds=(42, 42) + SCHEDULE[2:]), "repeats a seed"),
        (dict(alpha=1.5), "alpha=1.5"),
        (dict(min_effect=-0.1), "min_effect=-0.1"),
        (dict(first_seeds=9), "first_seeds=9"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(arguments, message):
    _, runs = seeds_like_study(2)
    settings = dict(seeds=SCHEDULE, look=1, max_seeds=MAX_SEEDS) | arguments
    with pytest.raises(ValueError, match=message):
        sequential_decisions(runs, **settings)


# --- proof by simulation ------------------------------------------------------------------------


@pytest.mark.parametrize("spending", ["obrien_fleming", "pocock"])
def test_aa_sequential_studies_keep_the_study_wide_error_at_alpha(design, spending):
    """No effects: 2,000 seeds-like studies looked at after every round.

    A better/worse verdict on any of the seven interventions in at most alpha of the studies
    (Holm over the seven, alpha spent over eight looks), whichever the spending function; the
    fixed design on the same studies for comparison.  Every study runs to max_seeds: with
    min_effect 0 nothing stops a null arm.
    """
    result = compare_designs(design, None, 0.0, 2000, rng_seed=41, spending=spending)
    assert_at_most(round(result["false"] * 2000), 2000, ALPHA)
    assert 0 < result["false"]  # verdicts are reachable at all
    assert_at_most(round(result["fixed_false"][MAX_SEEDS] * 2000), 2000, ALPHA)
    assert result["trials"] > 0.99 * result["fixed_trials"][MAX_SEEDS]


@pytest.mark.parametrize("effect_sd", [1.0, 2.0, 4.0])
def test_planted_effects_power_and_trials_against_the_fixed_design(design, effect_sd):
    """All seven interventions better by 1, 2 or 4 noise SDs; 1,000 studies, both designs.

    On the same studies the sequential design's power lies between the fixed design's with
    max_seeds - 1 and with max_seeds seeds (the price of looking early is less than one seed, and
    no design that may stop early can beat the fixed one with the same maximum), it spends fewer
    trials than the fixed design with max_seeds, and a quarter fewer at 4 SD.
    """
    repetitions = 1000
    result = compare_designs(design, None, effect_sd, repetitions, rng_seed=int(50 + effect_sd))
    arms = repetitions * len(NAMES)
    tolerance = 3 * np.sqrt(0.25 / arms)  # binomial SE of a power, at most
    power, fixed = result["power"], result["fixed_power"]
    assert fixed[MAX_SEEDS - 1] - tolerance <= power <= fixed[MAX_SEEDS] + tolerance
    assert result["trials"] < result["fixed_trials"][MAX_SEEDS]
    if effect_sd == 4.0:
        assert power > 0.99 and result["trials"] < 0.8 * result["fixed_trials"][MAX_SEEDS]
    if effect_sd == 1.0:
        assert power < 0.3  # 8 seeds are far too few for 1 SD: the study runs to the end
        assert result["trials"] > 0.97 * result["fixed_trials"][MAX_SEEDS]


def test_pocock_stops_large_effects_sooner_and_finds_small_ones_less_often(design):
    """The same 1,000 studies per effect under both spending functions.  Pocock spends more alpha
    early, so at 4 SDs its studies stop sooner than O'Brien-Fleming's (fewer trials, the same
    power); it leaves less for the last looks, so at 2 SDs it finds fewer effects.  Neither beats
    the fixed design with max_seeds."""
    arms = 1000 * len(NAMES)
    tolerance = 3 * np.sqrt(0.25 / arms)
    large = {
        spending: compare_designs(design, None, 4.0, 1000, rng_seed=81, spending=spending)
        for spending in ("obrien_fleming", "pocock")
    }
    assert large["pocock"]["trials"] < large["obrien_fleming"]["trials"] - 2
    assert large["pocock"]["power"] > 0.99
    moderate = {
        spending: compare_designs(design, None, 2.0, 1000, rng_seed=82, spending=spending)
        for spending in ("obrien_fleming", "pocock")
    }
    assert moderate["pocock"]["power"] < moderate["obrien_fleming"]["power"] - 0.1
    for result in (*large.values(), *moderate.values()):
        assert result["power"] <= result["fixed_power"][MAX_SEEDS] + tolerance


def test_no_meaningful_effect_needs_the_interval_inside_min_effect(design):
    """min_effect = 3 train SDs: null arms that keep the baseline's init stop once the interval
    is inside +-min_effect (never with min_effect 0); arms whose true effect is exactly
    min_effect are called "no meaningful effect" in at most alpha of studies."""
    min_effect = 3 * TRAIN_SD
    study, runs = seeds_like_study(MAX_SEEDS)
    null = design.simulate(simulated_losses(study, runs, 500, 61), ALPHA, min_effect)
    stopped = null.decision == "no meaningful effect"
    assert stopped[:, null.interventions.index("lr_schedule")].mean() > 0.5
    assert (null.ci_low[stopped] > -min_effect).all() and (null.ci_high[stopped] < min_effect).all()
    assert (null.decided_at[stopped] < MAX_SEEDS).any()
    assert null.trials.mean() < 66

    edge = {name: min_effect for name in NAMES if name != "qkv_bias"}
    study, runs = seeds_like_study(MAX_SEEDS, edge)
    at_edge = design.simulate(simulated_losses(study, runs, 2000, 62), ALPHA, min_effect)
    columns = [at_edge.interventions.index(name) for name in edge]
    wrong = (at_edge.decision[:, columns] == "no meaningful effect").any(axis=-1)
    assert_at_most(int(wrong.sum()), 2000, ALPHA)


def test_fixed_design_is_the_fixed_analysis_verdict_path(design):
    """SequentialDesign.fixed gives decide_studies' verdicts on the same runs."""
    study, runs = seeds_like_study(MAX_SEEDS, planted_effects(NAMES[:2], 3.0))
    losses = simulated_losses(study, runs, 50, 71)
    decisions, trials = design.fixed(losses, 5)
    at_five = runs["seed"].isin(SCHEDULE[:5]).to_numpy()
    _, expected = decide_studies(runs[at_five], losses[:, at_five])
    np.testing.assert_array_equal(decisions.verdict, expected.verdict)
    np.testing.assert_allclose(decisions.p_holm, expected.p_holm)
    assert trials == at_five.sum() == 5 * 8 + 2
