"""Sequential studies in-process: rounds through the study sweeper, Hydra's basic launcher and a sqlite MLflow store,
an execution that finishes and one that runs nothing, the settings and the budget. A SIGKILL in the middle of a
round: tests/e2e/test_sequential_processes.py.

Two planted effects make decisions reachable with 2-step trials: `weight_tying` draws its head from the N(0,1)
embeddings (test loss ~26 against ~11, t ~ 60 over two seeds), `lr_schedule` trains at 3.5 times the baseline's
lr (about -0.009, consistent over seeds: t ~ 16 over two seeds, ~ 23 over three). With Pocock spending and
max_seeds 3 the boundaries are 33 (look 2, at alpha/2) and 7.4 (look 3, at alpha once weight_tying is rejected):
weight_tying is decided at look 2, lr_schedule at look 3.
"""

from pathlib import Path

import mlflow
import pytest

from harness.study.design import StudyConf, sequential_schedule, study_trials
from harness.study.outcomes import PlannedTrial
from harness.study.sequential import SequentialStudy
from harness.study.store import StudyStore
from tests.conftest import new_store
from tests.e2e.test_study_processes import run_sweep_in_process, runs, table

SEQUENTIAL = [
    "hydra.sweeper.arms=[baseline,lr_schedule,weight_tying]",
    "hydra.sweeper.seeds=[1,2,3]",
    "hydra.sweeper.sequential=true",
    "hydra.sweeper.spending=pocock",
]


def artifact(uri: str, run_id: str, path: str, folder: Path) -> str:
    return Path(mlflow.MlflowClient(uri).download_artifacts(run_id, path, str(folder))).read_text()


def summary(stdout: str) -> dict[str, str]:
    """trial -> status from the summary table at the end (the looks print tables too)."""
    return table(stdout[stdout.rindex("[study quick] FINISHED (") :])


@pytest.mark.slow
def test_sequential_study_uninterrupted_then_again_runs_nothing_and_decides_the_same(tmp_path):
    """Three rounds in one execution: round 3 runs only the baseline and the arm still open, and the study stops
    with nothing open. The same command again runs no trial and logs the same looks."""
    uri = new_store(tmp_path / "mlflow.db")
    first = run_sweep_in_process(*SEQUENTIAL, sweep_dir=tmp_path / "first", uri=uri)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "sequential: round 3, init seed 3 for baseline, lr_schedule: 2 trials, 0 already FINISHED" in first.stdout
    assert "sequential study stopped: nothing open" in first.stdout
    assert "Trials: 8 in 3 rounds" in first.stdout and "with max_seeds=3 for every arm runs 9" in first.stdout
    assert set(summary(first.stdout).values()) == {"FINISHED"} and len(summary(first.stdout)) == 8
    [first_parent] = runs(uri, parents=True)
    looks_before = [
        artifact(uri, first_parent.info.run_id, f"sequential/look_{k}.md", tmp_path / "first") for k in (1, 2, 3)
    ]
    again = run_sweep_in_process(*SEQUENTIAL, sweep_dir=tmp_path / "again", uri=uri)
    assert again.returncode == 0, again.stdout + again.stderr
    assert set(summary(again.stdout).values()) == {"SKIPPED"} and len(summary(again.stdout)) == 8
    [parent] = runs(uri, parents=True)  # the same plan and settings: the first execution's parent, reused
    assert parent.data.tags["sequential.decision.lr_schedule"] == "better (look 3)"
    assert parent.data.tags["sequential.decision.weight_tying"] == "worse (look 2)"
    assert parent.data.tags["sequential.stop_reason"] == "nothing open"
    assert looks_before == [
        artifact(uri, parent.info.run_id, f"sequential/look_{k}.md", tmp_path / "again") for k in (1, 2, 3)
    ]
    assert len(runs(uri)) == 8


# --- the settings and the budget, in-process ---------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(max_seeds=5), "hydra.sweeper.max_seeds=5: a setting of sequential studies; add hydra.sweeper.sequential"),
        (dict(sequential=True, arms=["no_dropout", "qkv_bias"]), "needs the baseline and at least one other arm"),
        (dict(sequential=True, seeds=[1]), "max_seeds=1: at least 2"),
        (dict(sequential=True, first_seeds=4, max_seeds=3), "first_seeds=4: between 1 and max_seeds (3)"),
        (dict(sequential=True, spending="haybittle"), "spending=haybittle: one of obrien_fleming, pocock"),
        (dict(sequential=True, alpha=0.0), "alpha=0.0: between 0 and 1"),
        (
            dict(sequential=True, budget_trials=0, budget_gpu_hours=-1.0),
            "budget_trials=0: at least 1; hydra.sweeper.budget_gpu_hours=-1.0: more than 0",
        ),
        (
            dict(sequential=True, budget_trials=3, train_seeds=[None, 23]),
            "budget_trials=3: the first round alone has 4",
        ),
        (dict(sequential=True, arms=[], factorial={"factors": ["no_dropout", "qkv_bias"]}), "factorial"),
        (dict(sequential=True, repeats=[{"seed": 2, "runs": 2}]), "runs exact repeats in its first round"),
    ],
)
def test_bad_sequential_settings_fail_before_anything_runs(settings, message):
    from harness.study.design import FactorialConf, RepeatConf

    settings = {"arms": ["baseline", "no_dropout"], "seeds": [1, 2]} | settings
    if "factorial" in settings:
        settings["factorial"] = FactorialConf(**settings["factorial"])
    settings["repeats"] = [RepeatConf(**r) for r in settings.get("repeats", [])]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        study_trials(StudyConf(**settings))


def test_the_interventions_study_runs_sequentially_from_the_command_line():
    """`make sweep STUDY=interventions ARGS="hydra.sweeper.sequential=true hydra.sweeper.max_seeds=8"`."""
    from tests.unit.study.test_design import shipped_study

    study, _ = shipped_study("interventions", "hydra.sweeper.sequential=true", "hydra.sweeper.max_seeds=8")
    assert sequential_schedule(study) == [42, 22, 67, 1, 2, 3, 4, 5]
    assert [t.name for t in study_trials(study)] == [f"{arm}-s42" for arm in study.arms]


def test_round_one_is_the_first_seeds_of_a_schedule_that_goes_on_past_the_listed_seeds():
    conf = StudyConf(
        arms=["baseline", "qkv_bias"],
        seeds=[42, 22, 67],
        train_seeds=[None, 23],
        sequential=True,
        max_seeds=6,
        first_seeds=2,
    )
    assert sequential_schedule(conf) == [42, 22, 67, 1, 2, 3]
    assert [t.name for t in study_trials(conf)] == [
        "baseline-s42",
        "qkv_bias-s42",
        "baseline-s42-t23",
        "qkv_bias-s42-t23",
        "baseline-s22",
        "qkv_bias-s22",
        "baseline-s22-t23",
        "qkv_bias-s22-t23",
    ]
    assert sequential_schedule(StudyConf(seeds=[3, 1], sequential=True)) == [3, 1]  # max_seeds: the listed seeds


@pytest.fixture
def store(tracking_uri):
    yield StudyStore(tracking_uri, "harness", "seq")
    mlflow.set_tracking_uri(None)  # the Tracker inside set it for the whole process


def finished_run(store: StudyStore, intervention: str, seed: int, loss: float, seconds: float, world: int, config: str):
    client = store.client
    run = client.create_run(
        store.experiment_id,
        tags={
            "study": "seq",
            "intervention": intervention,
            "seed": str(seed),
            "train_seed": "none",
            "init_fingerprint": f"init{seed}",
            "config_hash": config,
            "world_size": str(world),
            "code_version": "v",
        },
    )
    client.log_metric(run.info.run_id, "test_loss", loss)
    client.log_metric(run.info.run_id, "train_seconds", seconds)
    client.set_terminated(run.info.run_id, "FINISHED")
    return client.get_run(run.info.run_id)


def test_gpu_hour_budget_counts_what_ran_and_estimates_the_next_round_from_it(store):
    """Round 1 (3 trials, 8 GPUs x 0.5 h each: 12 GPU-hours) ran; round 2 has 3 trials, one FINISHED earlier at
    2 GPU-hours: it would cost 2 + 2 x 4 = 10 GPU-hours. A budget of 21 refuses it, 22 lets it run. The stop
    is logged on the parent run with what remains open."""
    from harness.study.design import TrialSpec

    arms = {"baseline": (), "no_dropout": ("no_dropout",), "qkv_bias": ("qkv_bias",)}
    planned = [
        PlannedTrial(
            TrialSpec(arm, 1, None),
            [],
            f"{name}1",
            earlier_run=finished_run(store, name, 1, 3.0 + 0.1 * i, 1800, 8, f"{name}1"),
        )
        for i, (name, arm) in enumerate(arms.items())
    ]
    early = finished_run(store, "baseline", 2, 3.0, 900, 8, "baseline2")

    def plan(trials):  # round 2's trials, the baseline's FINISHED earlier
        return [
            PlannedTrial(t, [], f"{t.intervention}{t.seed}", earlier_run=early if not t.arm else None) for t in trials
        ]

    def study(budget: float):
        parent = store.client.create_run(store.experiment_id, tags={"study": "seq", "study_parent": "true"})
        conf = StudyConf(arms=list(arms), seeds=[1, 2, 3], sequential=True, budget_gpu_hours=budget)
        return SequentialStudy(conf, "seq", store, parent.info.run_id, plan), parent.info.run_id

    refused, parent_id = study(21.0)
    assert refused.next_round(list(planned), [], {}) == []
    assert refused.stop_reason == (
        "budget spent: budget_gpu_hours=21, the study has spent 12 GPU-hours and round 2 "
        "(3 trials) would need about 10 more at the 4 GPU-hours per trial observed so far"
    )
    description = refused.report("", interrupted=False)
    assert "Still open, with the further init seeds" in description
    logged = store.client.get_run(parent_id).data
    assert logged.tags["sequential.stop_reason"] == refused.stop_reason
    assert (
        logged.metrics["sequential.gpu_hours_spent"] == 12.0 and logged.params["sequential.budget_gpu_hours"] == "21.0"
    )

    allowed, _ = study(22.0)
    pending = []
    to_run = allowed.next_round(list(planned), pending, {})
    assert [p.trial.name for p in to_run] == [p.trial.name for p in pending] == ["no_dropout-s2", "qkv_bias-s2"]
    assert allowed.stop_reason is None and allowed.round == 2
