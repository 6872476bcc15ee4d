"""Tracking outages never stall training: a real `mlflow server` on 127.0.0.1 frozen, killed and restarted
while a real trial process trains against it; records buffered and flushed, or saved and replayed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from harness.tracking.store import UNSENT_FILE
from harness.trial import checkpoint
from tests.conftest import TINY, MlflowServer, run_harness

STEPS = 40
OUTAGE_TRIAL = [
    *TINY,
    f"trainer.max_steps={STEPS}",
    "trainer.checkpoint_interval=5",
    "tracking.log_interval=1",
    "tracking.heartbeat_interval=1",
]


def start_trial(directory: Path, uri: str, *args: str) -> tuple[subprocess.Popen, Path]:
    directory.mkdir(exist_ok=True)
    run_dir = directory / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", *OUTAGE_TRIAL, *args, f"hydra.run.dir={run_dir}"],
        cwd=directory,
        env=environment(uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, run_dir


def environment(uri: str) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "HYDRA_FULL_ERROR": "0"}


def latest_step(run_dir: Path) -> int:
    found = checkpoint.resolve(run_dir / "checkpoints")
    return int(found.name.removeprefix("step_")) if found else 0


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.time() + 300
    while latest_step(run_dir) < step:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"no checkpoint at step {step} after 300 s"
        time.sleep(0.02)


def assert_every_record_arrived(uri: str, run_dir: Path) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(uri)
    run_id = checkpoint.read_manifest(checkpoint.find(run_dir))["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("failure_reason")
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == list(range(1, STEPS + 1))
    assert [m.step for m in client.get_metric_history(run_id, "train_loss_avg")] == [*range(1, STEPS, 5), STEPS]
    assert "test_loss" in run.data.metrics and "train_seconds" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "charts", "samples", "checkpoints.json"} <= artifacts
    assert len(client.list_artifacts(run_id, "samples")) == len(range(1, STEPS, 5)) + 1
    return run


@pytest.mark.parametrize("backend_store_uri", ["sqlite", "postgresql"], indirect=True)
def test_a_frozen_server_never_stalls_training_and_every_record_arrives(tmp_path, backend_store_uri):
    """The server (its backend sqlite or PostgreSQL) stops answering (SIGSTOP: requests hang, the worst kind of
    outage) after the first checkpoint; the trial trains on to its end meanwhile, and everything arrives once the
    server answers again."""
    server = MlflowServer(tmp_path, backend_store_uri).start()
    try:
        trial, run_dir = start_trial(tmp_path, server.url)
        wait_for_step(trial, run_dir, 5)
        server.signal(signal.SIGSTOP)
        wait_for_step(trial, run_dir, STEPS)  # no stall: every later checkpoint is written while it is frozen
        time.sleep(1)
        assert trial.poll() is None  # waiting (tracking.flush_timeout) for the records, not exiting
        server.signal(signal.SIGCONT)
        out, err = trial.communicate(timeout=300)
        assert trial.returncode == 0, out + err
        assert_every_record_arrived(server.url, run_dir)
    finally:
        server.kill()


@pytest.mark.slow
def test_a_killed_server_restarted_mid_trial_gets_every_record_and_one_still_down_at_the_end_is_replayed(tmp_path):
    server = MlflowServer(tmp_path).start()
    try:
        first, run_dir = start_trial(tmp_path / "first", server.url)
        wait_for_step(first, run_dir, 5)
        server.kill()
        wait_for_step(first, run_dir, 10)  # trains on while the server is dead
        server.start()
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, out + err
        assert_every_record_arrived(server.url, run_dir)

        second, run_dir = start_trial(tmp_path / "second", server.url, "tracking.flush_timeout=2")
        wait_for_step(second, run_dir, 5)
        server.kill()
        out, err = second.communicate(timeout=300)
        assert second.returncode != 0 and f"python -m harness replay {run_dir}" in err
        assert (run_dir / UNSENT_FILE).is_file() and latest_step(run_dir) == STEPS
        checkpoint.verify(checkpoint.find(run_dir))  # the checkpoints are intact
        refused = run_harness(f"resume={run_dir}", cwd=tmp_path, env_uri=server.url, check=False)
        assert refused.returncode != 0 and "send them first: python -m harness replay" in refused.stderr

        server.start()
        replayed = subprocess.run(
            [sys.executable, "-m", "harness", "replay", str(run_dir)],
            capture_output=True,
            text=True,
            timeout=300,
            env=environment(server.url),
        )
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert "the run is FINISHED" in replayed.stdout and not (run_dir / UNSENT_FILE).exists()
        assert_every_record_arrived(server.url, run_dir)
    finally:
        server.kill()
