"""Studies as config: the shipped designs, fractional factorials, bad input, and which trials a rerun skips."""

import itertools
from collections import Counter

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from harness.paths import PROJECT_ROOT
from harness.study.design import (
    FactorialConf,
    RepeatConf,
    StudyConf,
    TrialSpec,
    factorial_design,
    study_arms,
    study_trials,
)
from harness.study.outcomes import PlannedTrial
from harness.study.run import check_command_line, skip_finished
from harness.study.store import StudyStore
from interventions import REGISTRY

SEVEN = ["gradient_clipping", "no_dropout", "qkv_bias", "lr_schedule", "weight_decay", "weight_tying", "no_amp"]
POSITIVE = ["gradient_clipping", "no_dropout", "qkv_bias", "lr_schedule", "weight_decay"]


def shipped_study(name: str, *overrides: str) -> tuple[StudyConf, str]:
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"+sweep={name}", *overrides], return_hydra_config=True)
    study = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StudyConf), cfg.hydra.sweeper))
    return study, cfg.study


def cells(trials: list[TrialSpec]) -> Counter:
    return Counter((t.intervention, t.seed, t.train_seed) for t in trials)


def test_interventions_study_is_the_baseline_and_each_seed_intervention_on_three_seeds():
    study, tag = shipped_study("interventions")
    trials = study_trials(study)
    assert tag == "interventions" and len(trials) == 24
    assert set(cells(trials)) == {(arm, seed, None) for arm in ["baseline", *SEVEN] for seed in (42, 22, 67)}
    assert [t.seed for t in trials[:8]] == [42] * 8  # seed-major: a study cut short holds whole seeds


def test_noise_study_crosses_init_and_train_seeds_and_repeats_one_pair_exactly():
    trials = study_trials(shipped_study("noise")[0])
    expected = {("baseline", s, t): 1 for s in (42, 22, 67) for t in (23, 67)} | {("baseline", 42, 23): 3}
    assert cells(trials) == expected
    assert [t.name for t in trials if t.repeat] == ["baseline-s42-t23#1", "baseline-s42-t23#2"]


def test_stacked_study_is_the_baseline_the_stack_and_its_parts():
    trials = study_trials(shipped_study("stacked")[0])
    stack = REGISTRY["stacked_best"].components
    assert {t.intervention for t in trials} == {"baseline", "+".join(sorted(stack)), *stack}
    assert len(trials) == 18


def test_factorial_study_is_a_resolution_five_half_fraction_over_the_positive_interventions():
    study, _ = shipped_study("factorial")
    arms = study_arms(study)
    assert len(arms) == 16 and () in arms and len(study_trials(study)) == 32
    assert factorial_design(POSITIVE, 5).describe().startswith("2^(5-1) fractional factorial, resolution V")
    assert shipped_study("factorial", "hydra.sweeper.factorial.resolution=null")[0].factorial.resolution is None


def test_every_shipped_study_composes_and_names_its_trials_uniquely():
    for path in sorted((PROJECT_ROOT / "conf" / "sweep").glob("*.yaml")):
        study, tag = shipped_study(path.stem)
        assert tag == path.stem and study.description
        names = [t.name for t in study_trials(study)]
        assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "k, resolution, runs",
    [
        (5, None, 32),
        (5, 5, 16),
        (5, 4, 16),
        (5, 3, 8),
        (6, 4, 16),
        (7, 4, 16),
        (7, 3, 8),
        (8, 5, 64),
        (4, 9, 16),
    ],
)
def test_factorial_design_is_the_smallest_fraction_with_the_stated_resolution(k, resolution, runs):
    """Resolution R means every R−1 factors see each level combination equally often, and some R do not."""
    design = factorial_design([f"f{i}" for i in range(k)], resolution)
    applied = design.combinations()
    assert len(applied) == runs == len(set(applied))

    def balanced(size: int) -> bool:
        return all(
            len(set(Counter(tuple(f in arm for f in subset) for arm in applied).values())) == 1
            and len(Counter(tuple(f in arm for f in subset) for arm in applied)) == 2**size
            for subset in itertools.combinations([f"f{i}" for i in range(k)], size)
        )

    stated = design.resolution
    if stated is None:
        assert runs == 2**k
    else:
        assert stated >= resolution and balanced(stated - 1) and not balanced(stated)


@pytest.mark.parametrize(
    "conf, message",
    [
        (StudyConf(arms=["baseline", "no_dropot"]), "unknown intervention 'no_dropot'"),
        (
            StudyConf(arms=["stacked_best", "gradient_clipping+lr_schedule+no_dropout+weight_decay"]),
            "apply the same interventions",
        ),
        (StudyConf(factorial=FactorialConf(["stacked_best", "no_dropout"])), "share components"),
        (StudyConf(factorial=FactorialConf(["no_dropout", "qkv_bias"], resolution=2)), "below III"),
        (StudyConf(arms=["baseline"], seeds=[42, 42]), "without duplicates"),
        (StudyConf(arms=["baseline"], repeats=[RepeatConf(runs=1)]), "at least 2 runs"),
        (StudyConf(), "no arms"),
    ],
)
def test_bad_studies_fail_before_anything_runs(conf, message):
    with pytest.raises(ValueError, match=message):
        study_trials(conf)


def test_unknown_study_lists_the_studies():
    with pytest.raises(MissingConfigException) as error:
        shipped_study("no_such_study")
    assert "Available options in 'sweep'" in str(error.value)
    for name in ("factorial", "interventions", "noise", "quick", "stacked"):
        assert f"\t{name}\n" in str(error.value) + "\n"


@pytest.mark.parametrize(
    "argument, message",
    [
        ("seed=1", "change hydra.sweeper.seeds"),
        ("+intervention=no_dropout", "change hydra.sweeper.arms"),
        ("resume=outputs/x", "run the same command again"),
        ("optim.lr=1e-3,2e-3", "value sweeps do not combine"),
    ],
)
def test_command_line_cannot_override_what_the_study_sets_per_trial(argument, message):
    with pytest.raises(ValueError, match=message):
        check_command_line(["+sweep=quick", argument])


def test_trial_names_and_overrides():
    trial = TrialSpec(("stacked_best",), 42, 23, repeat=1)
    assert trial.name == "gradient_clipping+lr_schedule+no_dropout+weight_decay-s42-t23#1"
    assert trial.overrides() == ["+intervention=stacked_best", "seed=42", "train_seed=23"]
    assert TrialSpec(("qkv_bias", "no_dropout"), 1, None).overrides() == [
        "+intervention=[qkv_bias,no_dropout]",
        "seed=1",
        "train_seed=null",
    ]
    assert TrialSpec((), 67, None).overrides() == ["seed=67", "train_seed=null"]


@pytest.fixture
def store(tracking_uri):
    yield StudyStore(tracking_uri, "harness", "mine")
    mlflow.set_tracking_uri(None)  # the Tracker inside set it for the whole process


def test_only_finished_runs_of_the_same_study_are_skipped_one_per_requested_run(store):
    """Real sqlite store: FINISHED runs are reused, FAILED and KILLED ones are not, other studies never, and a
    computation asked for three times (exact repeats) with one FINISHED run still runs twice."""
    for study, config, status in [
        ("mine", "a", "FINISHED"),
        ("mine", "b", "FAILED"),
        ("mine", "c", "KILLED"),
        ("other", "d", "FINISHED"),
        ("mine", "r", "FINISHED"),
    ]:
        run = store.client.create_run(
            store.experiment_id, tags={"study": study, "config_hash": config, "code_version": "v1"}
        )
        store.client.set_terminated(run.info.run_id, status)
    cells = [(1, "a", 0), (2, "b", 0), (3, "c", 0), (4, "d", 0), (5, "r", 0), (5, "r", 1), (5, "r", 2)]
    trials = [PlannedTrial(TrialSpec((), seed, None, repeat), [], config) for seed, config, repeat in cells]
    skip_finished(trials, store.finished_runs(), "v1")
    assert [t.earlier_run is not None for t in trials] == [True, False, False, False, True, False, False]


def test_a_finished_run_is_reused_only_by_the_same_code_version_unless_asked(store):
    """Runs of one computation made by other code (another commit, other uncommitted edits, or before the
    tag existed) run again, and the trial says why; reuse_other_code_versions reuses them."""
    made = {}
    for config, version in [("a", "v1"), ("b", "v0"), ("c", None), ("d", "v0"), ("d", "v1")]:
        tags = {"study": "mine", "config_hash": config} | ({"code_version": version} if version else {})
        run = store.client.create_run(store.experiment_id, tags=tags)
        store.client.set_terminated(run.info.run_id, "FINISHED")
        made[config, version] = run.info.run_id

    def plan(**options):
        trials = [PlannedTrial(TrialSpec((), seed, None), [], config) for seed, config in enumerate("abcd")]
        skip_finished(trials, store.finished_runs(), "v1", **options)
        return trials

    trials = plan()
    assert [t.earlier_run.info.run_id if t.earlier_run else None for t in trials] == [
        made["a", "v1"],
        None,
        None,
        made["d", "v1"],
    ]
    assert trials[1].rerun_reason == (
        f"its FINISHED run {made['b', 'v0']} was made by code version v0, not by this "
        "one (v1); reuse_other_code_versions=true would reuse it"
    )
    assert "code version (not recorded)" in trials[2].rerun_reason
    assert trials[0].rerun_reason == trials[3].rerun_reason == ""
    reused = plan(reuse_other_code_versions=True)
    assert [t.earlier_run.info.run_id for t in reused][:3] == [made["a", "v1"], made["b", "v0"], made["c", None]]
    assert all(t.rerun_reason == "" for t in reused)
