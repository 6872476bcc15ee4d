"""Studies for real: Hydra's basic launcher and submitit's local executor, a killed and resumed study, a
failing trial, two executions of one study at once (on sqlite and on an `mlflow server` on PostgreSQL), two
processes writing one sqlite store at once, and a real `mlflow server` on 127.0.0.1."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import yaml

from harness.tracking.store import ensure_store
from harness.tracking.version import code_version
from harness.trial import checkpoint
from tests.conftest import TINY, MlflowServer, new_store, run_in_process

SWEEP_TINY = [
    *TINY,
    "trainer.max_steps=2",
    "trainer.checkpoint_interval=2",
    "hydra.sweeper.progress_interval=0.5",
    "tracking.heartbeat_interval=1",
    "hydra.sweeper.analyze=false",  # the test that a study ends with its analysis turns it back on
]
FAILS_AT_START = "3"  # the seed whose trial fails as it builds its model (a negative seed is refused up front)
# `python -m harness`, with a runtime failure planted in the trial of seed FAILS_AT_START (the basic launcher runs
# every trial in this process).
HARNESS_FAILING_ONE_SEED = f"""
import sys
from harness.trial import trainer
from harness.__main__ import main

build_model = trainer.build_model

def build_or_fail(cfg, plugins=None):
    if cfg.seed == {FAILS_AT_START}:
        raise RuntimeError("planted failure")
    return build_model(cfg, plugins)

trainer.build_model = build_or_fail
sys.argv[0] = "harness"
main()
"""


def sweep_command(*args: str, sweep_dir: Path, harness: tuple = ("-m", "harness")) -> list[str]:
    return [sys.executable, *harness, "+sweep=quick", *SWEEP_TINY, *args, f"hydra.sweep.dir={sweep_dir}"]


def sweep_env(uri: str) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "HYDRA_FULL_ERROR": "0"}


def run_sweep(
    *args: str, sweep_dir: Path, uri: str, timeout: int = 300, harness: tuple = ("-m", "harness")
) -> subprocess.CompletedProcess:
    return subprocess.run(
        sweep_command(*args, sweep_dir=sweep_dir, harness=harness),
        cwd=sweep_dir.parent,
        env=sweep_env(uri),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_sweep(*args: str, sweep_dir: Path, uri: str, harness: tuple = ("-m", "harness")) -> subprocess.Popen:
    """`run_sweep` in the background, in its own session (so a test can SIGKILL its whole group)."""
    return subprocess.Popen(
        sweep_command(*args, sweep_dir=sweep_dir, harness=harness),
        cwd=sweep_dir.parent,
        env=sweep_env(uri),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def run_sweep_in_process(*args: str, sweep_dir: Path, uri: str) -> subprocess.CompletedProcess:
    """`run_sweep` through `harness.__main__.main` in this process (the basic launcher runs every trial here)."""
    return run_in_process(
        "+sweep=quick",
        *SWEEP_TINY,
        *args,
        f"hydra.sweep.dir={sweep_dir}",
        cwd=sweep_dir.parent,
        env_uri=uri,
        check=False,
    )


def plant_failure_at_start(monkeypatch) -> None:
    """In this process, what HARNESS_FAILING_ONE_SEED plants in its own."""
    from harness.trial import trainer

    build_model = trainer.build_model

    def build_or_fail(cfg, plugins=None):
        if cfg.seed == int(FAILS_AT_START):
            raise RuntimeError("planted failure")
        return build_model(cfg, plugins)

    monkeypatch.setattr(trainer, "build_model", build_or_fail)


def table(stdout: str) -> dict[str, str]:
    """trial → status, from the summary table the sweep prints."""
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[1].strip(): cells[2].strip() for cells in rows[1:]}


def runs(uri: str, parents: bool = False) -> list:
    ensure_store(uri)  # the sweep may be creating the store right now
    client = mlflow.MlflowClient(uri)
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [r for r in found if (r.data.tags.get("study_parent") == "true") == parents]


def integrity(db: Path) -> str:
    with sqlite3.connect(db) as connection:
        return connection.execute("PRAGMA integrity_check").fetchone()[0]


def test_killed_study_reruns_only_the_missing_trials_and_a_failing_trial_stops_no_other(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    uri = new_store(db)
    study = ["hydra.sweeper.arms=[baseline]", f"hydra.sweeper.seeds=[1,2,{FAILS_AT_START}]"]
    failing = ("-c", HARNESS_FAILING_ONE_SEED)
    first = start_sweep(*study, sweep_dir=tmp_path / "first", uri=uri, harness=failing)
    deadline = time.time() + 240
    while not (db.exists() and any(r.info.status == "FINISHED" for r in runs(uri))):
        assert first.poll() is None and time.time() < deadline, "the study ended before its first trial finished"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # midway: the first trial FINISHED, the second is starting
    first.wait()
    # baseline-s2 also FINISHED once, long ago, by other code: that run must not be reused
    client = mlflow.MlflowClient(uri)
    killed_parent = runs(uri, parents=True)[0]
    record = yaml.safe_load(
        Path(client.download_artifacts(killed_parent.info.run_id, "study.yaml", str(tmp_path))).read_text()
    )
    s2_hash = next(trial["config_hash"] for trial in record["trials"] if trial["name"] == "baseline-s2")
    older = client.create_run(
        killed_parent.info.experiment_id,
        tags={
            "study": "quick",
            "config_hash": s2_hash,
            "code_version": "0ld",
            "seed": "2",
            "mlflow.parentRunId": killed_parent.info.run_id,
        },
    ).info.run_id
    client.set_terminated(older, "FINISHED")
    time.sleep(4.5)  # 4 heartbeat intervals: the killed execution's runs are stale

    plant_failure_at_start(monkeypatch)
    result = run_sweep_in_process(*study, sweep_dir=tmp_path / "second", uri=uri)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 trials: 1 already FINISHED (skipped), 2 to run with the basic launcher" in result.stdout
    assert f"code version {code_version()}" in result.stdout  # the skipped run was made by this very code
    assert (
        f"baseline-s2 runs again: its FINISHED run {older} was made by code version 0ld, not by this one "
        f"({code_version()}); reuse_other_code_versions=true would reuse it"
    ) in result.stdout
    assert table(result.stdout) == {"baseline-s1": "SKIPPED", "baseline-s2": "FINISHED", "baseline-s3": "FAILED"}
    assert "RuntimeError: planted failure" in result.stdout
    assert "trial 2 of 2: 1 done (1 FINISHED), 0 running | elapsed" in result.stdout
    assert "all 2 trials done (1 FAILED, 1 FINISHED) | elapsed" in result.stdout and ", ETA " in result.stdout
    assert "1 of 3 trials of study quick did not finish (baseline-s3)" in result.stderr
    assert sorted(p.name for p in (tmp_path / "second").iterdir() if p.is_dir()) == ["0", "1"]  # only the missing

    trials = runs(uri)
    assert Counter(r.data.tags["seed"] for r in trials if r.info.status == "FINISHED") == {"1": 1, "2": 2}
    # The second execution marked the killed one's parent KILLED, then reused it (same trials, same code): one tree.
    [parent] = runs(uri, parents=True)
    assert f"marked run {parent.info.run_id} (study quick) KILLED: its process died" in result.stdout
    assert f"reusing parent run {parent.info.run_id} (KILLED before)" in result.stdout
    assert parent.info.status == "FAILED" and parent.data.tags["executions"] == "2"
    assert "failure_reason" not in parent.data.tags  # the killed execution's reason is not this one's
    assert not [r for r in trials if r.info.status == "RUNNING"]  # the killed trial's run too
    children = [r for r in trials if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    # seed 1 by the first execution; seed 2 by the old code and by the second; seed 3 failed as it was built, no run
    assert Counter(r.data.tags["seed"] for r in children if r.info.status == "FINISHED") == {"1": 1, "2": 2}
    assert all(r.data.tags["study"] == "quick" for r in trials)
    summary = mlflow.MlflowClient(uri).download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))
    assert "baseline-s3" in Path(summary).read_text() and parent.data.metrics["trials_skipped"] == 1
    assert "| baseline-s3 |" in parent.data.tags["mlflow.note.content"].split("### Trials")[1]
    assert integrity(db) == "ok"


@pytest.mark.parametrize("backend_store_uri", ["sqlite", "postgresql"], indirect=True)
def test_two_executions_of_a_study_started_together_run_each_trial_once(
    tmp_path, backend_store_uri, backend_tracking_uri
):
    """Two `make sweep STUDY=quick` (the command it runs) started at the same moment with their default output
    directories, on one store (a sqlite file, or an `mlflow server` on PostgreSQL): each trial runs once, by one
    of them; the other reports it; every checkpoint belongs to its own run. (Before: one shared directory, 11
    FINISHED runs for 6 trials.)"""
    uri = backend_tracking_uri
    four_trials = ["hydra.sweeper.arms=[baseline,no_dropout]"]  # 2 arms x seeds 42, 22
    command = [sys.executable, "-m", "harness", "+sweep=quick", *SWEEP_TINY, *four_trials]
    executions = [
        subprocess.Popen(
            command, cwd=tmp_path, env=sweep_env(uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [e.communicate(timeout=900) for e in executions]
    for execution, (out, err) in zip(executions, outputs):
        assert execution.returncode == 0, out + err
    first, second = (table(out) for out, _ in outputs)
    assert len(first) == len(second) == 4
    assert all(sorted([first[name], second[name]]) == ["FINISHED", "SKIPPED"] for name in first), (first, second)
    assert len(list((tmp_path / "multirun").glob("*/*"))) == 2  # one output directory per execution

    trials = runs(uri)
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert len(finished) == len({r.data.tags["config_hash"] for r in finished}) == 4
    assert all(r.data.tags.get("withdrawn") == "true" for r in trials if r.info.status != "FINISHED")
    for run in finished:
        manifest = checkpoint.verify(checkpoint.find(Path(run.data.tags["run_dir"])))
        assert manifest["run_id"] == run.info.run_id
    assert {p.info.status for p in runs(uri, parents=True)} == {"FINISHED"}
    if backend_store_uri.startswith("sqlite:"):
        assert integrity(tmp_path / "mlflow.db") == "ok"


WRITER = """
import sys, time
from pathlib import Path
import mlflow
from harness.tracking.tracker import Tracker

uri, name, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
(folder / name).touch()
while len(list(folder.iterdir())) < 2:  # both writers start together, on a store neither has created
    time.sleep(0.01)
for trial in range(3):
    tracker = Tracker(uri, "harness")
    tracker.start(f"{name}-{trial}", {"study": "concurrent", "writer": name}, {"trial": trial})
    for step in range(1, 61):
        tracker.log_metrics({"train_loss": 10.0 / step, "lr": 1e-3}, step)
        if step % 5 == 0:
            tracker.flush()
    tracker.set_tags({"complete": "true"})
    tracker.end("FINISHED")
"""


def test_two_processes_write_one_sqlite_store_at_once_without_losing_a_run(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    (tmp_path / "ready").mkdir()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, uri, name, str(tmp_path / "ready")],
            env=sweep_env(uri),
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for writer in writers:
        assert writer.wait(timeout=240) == 0, writer.stderr.read()
    client = mlflow.MlflowClient(uri)
    found = runs(uri)
    assert sorted(r.info.run_name for r in found) == sorted(f"{w}-{t}" for w in "ab" for t in range(3))
    assert all(r.info.status == "FINISHED" and r.data.tags["complete"] == "true" for r in found)
    assert all(len(client.get_metric_history(r.info.run_id, "train_loss")) == 60 for r in found)
    assert integrity(db) == "ok"


@pytest.fixture
def mlflow_server(tmp_path):
    """A real tracking server with a database backend, on loopback only."""
    server = MlflowServer(tmp_path).start()
    yield server.url
    server.kill()


def test_submitit_local_jobs_record_a_study_in_a_real_mlflow_server(tmp_path, mlflow_server):
    """Real submitit local executor, one process per trial, both writing to a real tracking server."""
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(
        "hydra.sweeper.arms=[baseline,no_dropout]",
        "hydra.sweeper.seeds=[1]",
        "hydra/launcher=submitit_local",
        sweep_dir=sweep_dir,
        uri=mlflow_server,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "to run with the submitit_local launcher; parent run" in result.stdout and mlflow_server in result.stdout
    assert table(result.stdout) == {"baseline-s1": "FINISHED", "no_dropout-s1": "FINISHED"}
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 2
    [parent] = runs(mlflow_server, parents=True)
    trials = runs(mlflow_server)
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert {r.data.tags["intervention"]: r.info.status for r in trials} == {
        "baseline": "FINISHED",
        "no_dropout": "FINISHED",
    }
    assert parent.info.status == "FINISHED" and all(r.data.metrics["test_loss"] > 0 for r in trials)
    summary = mlflow.MlflowClient(mlflow_server).download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))
    assert "no_dropout-s1" in Path(summary).read_text()  # artifacts travel through the server too


@pytest.mark.slow
def test_submitit_task_per_rank_trains_one_trial_on_two_ranks(tmp_path):
    """`tasks_per_node` = GPUs on SLURM: here 2 CPU tasks with gloo, each task one rank of the trial."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep(
        "hydra.sweeper.arms=[baseline]",
        "hydra.sweeper.seeds=[1]",
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        sweep_dir=tmp_path / "sweep",
        uri=uri,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [trial] = runs(uri)
    assert trial.data.tags["world_size"] == "2" and trial.info.status == "FINISHED"
