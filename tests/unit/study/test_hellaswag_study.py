"""A tiny study at smoke scale with HellaSwag on the bundled fixture: every trial records its scores and per-example
record, `evaluate DIR hellaswag=true` scores a trial after the fact into its own run, and the analysis reports
verdicts on both metrics with their noise."""

import mlflow
import pytest

from analysis.__main__ import main as analyze
from analysis.load import load_mlflow_study
from analysis.study import Settings, analyse
from harness.trial.trainer import Trial
from tests.conftest import TINY, compose_config, run_in_process
from tests.fixtures.hellaswag import write_fixture

TRIAL_TINY = [
    *TINY,
    "model.context_length=64",
    "trainer.max_steps=2",
    "trainer.checkpoint_interval=2",
    "tracking.heartbeat_interval=1",
]
STUDY_TINY = [
    *TRIAL_TINY,
    "hydra.sweeper.progress_interval=0.5",
    "hydra.sweeper.analyze=false",  # the tests run the analysis themselves, into tmp_path
]


@pytest.fixture(scope="module")
def study(store, tmp_path_factory):
    """The quick sweep (baseline, no_dropout, lr_schedule × seeds 42, 22), HellaSwag scored on 24 fixture examples."""
    root = tmp_path_factory.mktemp("study")
    fixture = root / "hellaswag_val.jsonl"
    write_fixture(fixture, count=24)
    sweep_dir = root / "sweep"
    out = run_in_process(
        "+sweep=quick",
        *STUDY_TINY,
        "eval.hellaswag=true",
        f"eval.hellaswag_path={fixture}",
        "eval.hellaswag_batch_size=32",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=root,
        env_uri=store,
    )
    client = mlflow.MlflowClient(store)
    runs = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if r.data.tags.get("study") == "quick" and "seed" in r.data.tags  # the trials, not the parent or its analysis
    ]
    return root, fixture, sweep_dir, runs, out


def test_every_trial_of_the_study_records_hellaswag_and_its_per_example_record(study):
    _, _, _, runs, _ = study
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        assert 0 <= run.data.metrics["hellaswag_acc_norm"] <= 1 and run.data.metrics["hellaswag_examples"] == 24
        record = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/hellaswag/final.json")
        assert len(record["choice_norm"]) == 24 and record["acc_norm"] == run.data.metrics["hellaswag_acc_norm"]


def test_evaluate_scores_a_trial_after_the_fact_and_the_analysis_picks_it_up(study, store, tmp_path):
    root, fixture, sweep_dir, runs, _ = study
    client = mlflow.MlflowClient(store)
    # a scored trial: its own score is kept; the new one, from the same weights, is the same
    run_dir = next(sweep_dir.rglob("config.yaml")).parent  # a trial's run directory holds its saved config
    out = run_in_process("evaluate", str(run_dir), "hellaswag=true", f"hellaswag_path={fixture}", env_uri=store)
    run_id = next(word for word in out.stdout.split("  ") if word.startswith("run ")).removeprefix("run ")
    own, again = (client.get_run(run_id).data.metrics[f"{p}hellaswag_acc_norm"] for p in ("", "checkpoint_"))
    assert own == again and len(client.get_metric_history(run_id, "hellaswag_acc_norm")) == 1
    assert any(f.path.startswith("hellaswag/evaluated_step_") for f in client.list_artifacts(run_id, "hellaswag"))
    # a trial of the study that was not scored: unscored in the analysis until evaluate scores it
    plain = Trial(compose_config(*TRIAL_TINY, "study=quick", "seed=67"), tmp_path / "plain").run()
    before = analyse(load_mlflow_study("quick", store), Settings(n_resamples=100)).accuracy
    assert plain["run_id"] in before.unscored
    run_in_process("evaluate", str(tmp_path / "plain"), "hellaswag=true", f"hellaswag_path={fixture}", env_uri=store)
    after = analyse(load_mlflow_study("quick", store), Settings(n_resamples=100)).accuracy
    assert after.unscored == [] and "2 vs 3 runs" in after.sampling.set_index("intervention").iloc[0]["paired_method"]
    refused = run_in_process("evaluate", str(run_dir), "hellaswag=true", f"hellaswag_path={root / 'none'}", check=False)
    assert refused.returncode == 2 and "python -m harness prepare dataset=hellaswag out=" in refused.stderr


@pytest.mark.parametrize("metric", ["test_loss", "hellaswag_acc_norm"])
def test_the_analysis_reports_verdicts_on_both_metrics_with_their_noise(study, store, tmp_path, capsys, metric):
    out = tmp_path / "report"
    assert (
        analyze(
            ["study=quick", f"tracking_uri={store}", f"metric={metric}", f"out={out}", "resamples=100", "log=false"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert ("verdicts on hellaswag_acc_norm" in printed) == (metric == "hellaswag_acc_norm")
    report = (out / "report.md").read_text()
    assert "## Ranking" in report and "## HellaSwag (hellaswag_acc_norm)" in report
    assert (
        "Sampling noise of the examples" in report and "paired t over 24 examples (2 vs " in report
    )  # 2 or 3 baseline runs
    assert (out / "ranking_hellaswag_acc_norm.csv").is_file() and (out / "metric_agreement.csv").is_file()
