"""Studies for real: Hydra's basic launcher and submitit's local executor, a killed and resumed study, a
failing trial, two processes writing one sqlite store at once, and a real `mlflow server` on 127.0.0.1."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import yaml

from harness.tracking import ensure_store
from harness.version import code_version
from tests.conftest import TINY

SWEEP_TINY = [*TINY, "trainer.max_steps=2", "trainer.checkpoint_interval=2", "hydra.sweeper.progress_interval=0.5"]
FAILS_AT_START = "3"  # the seed whose trial fails as it builds its model (a negative seed is refused up front)
# `python -m harness`, with a runtime failure planted in the trial of seed FAILS_AT_START (the basic launcher runs
# every trial in this process).
HARNESS_FAILING_ONE_SEED = f"""
import sys
from harness import trainer
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


def run_sweep(*args: str, sweep_dir: Path, uri: str, timeout: int = 300,
              harness: tuple = ("-m", "harness")) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(*args, sweep_dir=sweep_dir, harness=harness), cwd=sweep_dir.parent,
                          env=sweep_env(uri), capture_output=True, text=True, timeout=timeout)


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


def test_killed_study_reruns_only_the_missing_trials_and_a_failing_trial_stops_no_other(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    study = ["hydra.sweeper.arms=[baseline]", f"hydra.sweeper.seeds=[1,2,{FAILS_AT_START}]"]
    failing = ("-c", HARNESS_FAILING_ONE_SEED)
    first = subprocess.Popen(sweep_command(*study, sweep_dir=tmp_path / "first", harness=failing), cwd=tmp_path,
                             env=sweep_env(uri), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 240
    while not (db.exists() and any(r.info.status == "FINISHED" for r in runs(uri))):
        assert first.poll() is None and time.time() < deadline, "the study ended before its first trial finished"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # midway: the first trial FINISHED, the second is starting
    first.wait()
    # baseline-s2 also FINISHED once, long ago, by other code: that run must not be reused
    client = mlflow.MlflowClient(uri)
    killed_parent = runs(uri, parents=True)[0]
    record = yaml.safe_load(Path(client.download_artifacts(killed_parent.info.run_id, "study.yaml", str(tmp_path)))
                            .read_text())
    s2_hash = next(trial["config_hash"] for trial in record["trials"] if trial["name"] == "baseline-s2")
    older = client.create_run(killed_parent.info.experiment_id, tags={
        "study": "quick", "config_hash": s2_hash, "code_version": "0ld", "seed": "2",
        "mlflow.parentRunId": killed_parent.info.run_id}).info.run_id
    client.set_terminated(older, "FINISHED")

    result = run_sweep(*study, sweep_dir=tmp_path / "second", uri=uri, harness=failing)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 trials: 1 already FINISHED (skipped), 2 to run with the basic launcher" in result.stdout
    assert f"code version {code_version()}" in result.stdout  # the skipped run was made by this very code
    assert (f"baseline-s2 runs again: its FINISHED run {older} was made by code version 0ld, not by this one "
            f"({code_version()}); reuse_other_code_versions=true would reuse it") in result.stdout
    assert table(result.stdout) == {"baseline-s1": "SKIPPED", "baseline-s2": "FINISHED", "baseline-s3": "FAILED"}
    assert "RuntimeError: planted failure" in result.stdout
    assert "trial 2 of 2: 1 done (1 FINISHED), 0 running | elapsed" in result.stdout
    assert "all 2 trials done (1 FAILED, 1 FINISHED) | elapsed" in result.stdout and ", ETA " in result.stdout
    assert "1 of 3 trials of study quick did not finish (baseline-s3)" in result.stderr
    assert sorted(p.name for p in (tmp_path / "second").iterdir() if p.is_dir()) == ["0", "1"]  # only the missing

    trials = runs(uri)
    assert Counter(r.data.tags["seed"] for r in trials if r.info.status == "FINISHED") == {"1": 1, "2": 2}
    first_parent, second_parent = sorted(runs(uri, parents=True), key=lambda r: r.info.start_time)
    assert (first_parent.info.status, second_parent.info.status) == ("RUNNING", "FAILED")  # SIGKILL left it running
    children = [r for r in trials if r.data.tags["mlflow.parentRunId"] == second_parent.info.run_id]
    assert [(r.data.tags["seed"], r.info.status) for r in children] == [("2", "FINISHED")]
    assert all(r.data.tags["study"] == "quick" for r in trials)
    summary = mlflow.MlflowClient(uri).download_artifacts(second_parent.info.run_id, "summary.md", str(tmp_path))
    assert "baseline-s3" in Path(summary).read_text() and second_parent.data.metrics["trials_skipped"] == 1
    assert integrity(db) == "ok"


WRITER = """
import sys, time
from pathlib import Path
import mlflow
from harness.tracking import Tracker

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
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, uri, name, str(tmp_path / "ready")],
                                env=sweep_env(uri), stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for writer in writers:
        assert writer.wait(timeout=240) == 0, writer.stderr.read()
    client = mlflow.MlflowClient(uri)
    found = runs(uri)
    assert sorted(r.info.run_name for r in found) == sorted(f"{w}-{t}" for w in "ab" for t in range(3))
    assert all(r.info.status == "FINISHED" and r.data.tags["complete"] == "true" for r in found)
    assert all(len(client.get_metric_history(r.info.run_id, "train_loss")) == 60 for r in found)
    assert integrity(db) == "ok"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real tracking server with a database backend, on loopback only; `timeout` ends it even if the
    test process dies."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        ["timeout", "300", sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.25)
    yield url
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    log.close()


def test_submitit_local_jobs_record_a_study_in_a_real_mlflow_server(tmp_path, mlflow_server):
    """Real submitit local executor, one process per trial, both writing to a real tracking server."""
    sweep_dir = tmp_path / "sweep"
    result = run_sweep("hydra.sweeper.arms=[baseline,no_dropout]", "hydra.sweeper.seeds=[1]",
                       "hydra/launcher=submitit_local", sweep_dir=sweep_dir, uri=mlflow_server)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "to run with the submitit_local launcher; parent run" in result.stdout and mlflow_server in result.stdout
    assert table(result.stdout) == {"baseline-s1": "FINISHED", "no_dropout-s1": "FINISHED"}
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 2
    [parent] = runs(mlflow_server, parents=True)
    trials = runs(mlflow_server)
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert {r.data.tags["intervention"]: r.info.status for r in trials} == {"baseline": "FINISHED",
                                                                             "no_dropout": "FINISHED"}
    assert parent.info.status == "FINISHED" and all(r.data.metrics["test_loss"] > 0 for r in trials)
    summary = mlflow.MlflowClient(mlflow_server).download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))
    assert "no_dropout-s1" in Path(summary).read_text()  # artifacts travel through the server too


@pytest.mark.slow
def test_submitit_task_per_rank_trains_one_trial_on_two_ranks(tmp_path):
    """`tasks_per_node` = GPUs on SLURM: here 2 CPU tasks with gloo, each task one rank of the trial."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep("hydra.sweeper.arms=[baseline]", "hydra.sweeper.seeds=[1]", "hydra/launcher=submitit_local",
                       "hydra.launcher.tasks_per_node=2", sweep_dir=tmp_path / "sweep", uri=uri)
    assert result.returncode == 0, result.stdout + result.stderr
    [trial] = runs(uri)
    assert trial.data.tags["world_size"] == "2" and trial.info.status == "FINISHED"
