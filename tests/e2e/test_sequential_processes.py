"""A sequential study SIGKILLed in the middle of a round, for real (a study process and its sqlite MLflow store),
then resumed in-process until its trial budget stops it. The planted effects that make decisions reachable with
2-step trials: tests/unit/study/test_sequential.py."""

import io
import os
import signal
import time
from collections import Counter

import mlflow
import pandas as pd
import pytest

from analysis.load import load_mlflow_study
from analysis.sequential.procedure import sequential_decisions
from tests.conftest import new_store
from tests.e2e.test_study_processes import integrity, run_sweep_in_process, runs, start_sweep
from tests.unit.study.test_sequential import SEQUENTIAL, artifact


def test_sequential_study_runs_rounds_stops_and_resumes_after_sigkill(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = new_store(db)
    killed = start_sweep(*SEQUENTIAL, sweep_dir=tmp_path / "killed", uri=uri)
    deadline = time.time() + 400
    while not (db.exists() and sum(r.info.status == "FINISHED" for r in runs(uri)) >= 4):
        assert killed.poll() is None and time.time() < deadline, "the study ended before round 2 began"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)  # in round 2: round 1 (3 trials) and one of round 2 FINISHED
    killed.wait()
    finished_before = {r.data.tags["config_hash"]: r.info.run_id for r in runs(uri) if r.info.status == "FINISHED"}
    assert len(finished_before) in (4, 5)
    time.sleep(4.5)  # 4 heartbeat intervals: the killed execution's runs are stale

    budget = run_sweep_in_process(*SEQUENTIAL, "hydra.sweeper.budget_trials=6", sweep_dir=tmp_path / "budget", uri=uri)
    assert budget.returncode == 0, budget.stdout + budget.stderr
    out = budget.stdout
    assert "3 trials: 3 already FINISHED (skipped), 0 to run" in out  # round 1
    assert (
        f"sequential: round 2, init seed 2 for baseline, lr_schedule, weight_tying: 3 trials, "
        f"{len(finished_before) - 3} already FINISHED (skipped), {6 - len(finished_before)} to run"
    ) in out
    reason = "budget spent: budget_trials=6, the study has run 6 trials and round 3 needs 2 more"
    assert f"sequential study stopped: {reason}" in out
    assert f"**Sequential study** (stopped after look 2: {reason};" in out
    assert "Still open, with the further init seeds each would need for 80% power at its level: lr_schedule" in out
    assert "| weight_tying | worse | 2 | 2 |" in out

    # No FINISHED trial ran twice, the killed one's run is marked KILLED, nothing runs any more.
    trials = runs(uri)
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert len(finished) == len({r.data.tags["config_hash"] for r in finished}) == 6
    assert set(finished_before.values()) <= {r.info.run_id for r in finished}
    assert Counter(r.info.status for r in trials) - Counter(FINISHED=6) <= Counter(KILLED=1)
    assert integrity(db) == "ok"

    # Each execution's parent run holds its looks; the resumed one recomputed the killed one's look 1.
    parents = {p.data.tags["sweep_dir"].rsplit("/", 1)[-1]: p for p in runs(uri, parents=True)}
    assert {name: p.info.status for name, p in parents.items()} == {"killed": "KILLED", "budget": "FINISHED"}
    parent, client = parents["budget"], mlflow.MlflowClient(uri)
    tags = parent.data.tags
    assert tags["sequential"] == "true" and tags["sequential.look"] == "2" and tags["sequential.stop_reason"] == reason
    assert tags["sequential.decision.weight_tying"] == "worse (look 2)"
    assert tags["sequential.decision.lr_schedule"] == "open" and tags["sequential.open"] == "lr_schedule"
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "sequential.n_open")] == [1, 2]
    assert [m.value for m in client.get_metric_history(parent.info.run_id, "sequential.n_worse")] == [0, 1]
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "sequential")] == [
        "sequential/look_1.csv",
        "sequential/look_1.md",
        "sequential/look_2.csv",
        "sequential/look_2.md",
    ]
    assert artifact(uri, parents["killed"].info.run_id, "sequential/look_1.md", tmp_path / "killed") == artifact(
        uri, parent.info.run_id, "sequential/look_1.md", tmp_path / "budget"
    )
    assert f"stopped after look 2: {reason}" in tags["mlflow.note.content"]
    metrics = parent.data.metrics
    assert metrics["sequential.trials_spent"] == 6 and metrics["sequential.n_open"] == 1
    hours = sum(r.data.metrics["train_seconds"] * int(r.data.tags["world_size"]) for r in finished) / 3600
    assert metrics["sequential.gpu_hours_spent"] == pytest.approx(hours)

    # The decisions are those of the analysis on the store's runs.
    look = sequential_decisions(load_mlflow_study("quick", uri).runs, [1, 2, 3], 2, 3, spending="pocock")
    logged = pd.read_csv(io.StringIO(artifact(uri, parent.info.run_id, "sequential/look_2.csv", tmp_path)))
    assert logged["decision"].tolist() == look.table["decision"].tolist() == ["open", "worse"]
    pd.testing.assert_series_equal(logged["rci_high"], look.table["rci_high"])
