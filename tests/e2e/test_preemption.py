"""Preemption and resume for real: a trial SIGTERMed or SIGUSR1ed mid-training checkpoints at the step boundary,
exits 128 + the signal without a traceback and resumes bit-identically; a SIGKILLed study continues its trial."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from harness.trial import checkpoint
from tests.conftest import TINY, final_weights, new_store, run_in_process
from tests.e2e.test_study_processes import runs

LONG = ["trainer.max_steps=30", "trainer.checkpoint_interval=20", "trainer.deterministic=true"]


def trial_command(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *TINY, *LONG, *args, f"hydra.run.dir={run_dir}"]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None and time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("signame", "backend_store_uri"),
    [("SIGTERM", "sqlite"), ("SIGUSR1", "sqlite"), ("SIGTERM", "postgresql")],
    indirect=["backend_store_uri"],
)
def test_a_signalled_trial_checkpoints_exits_with_its_signal_and_resumes_bit_identically(
    tmp_path, signame, backend_tracking_uri
):
    """Tracked to a sqlite file, or (SIGTERM) through an `mlflow server` on PostgreSQL, as on a cluster."""
    uri = backend_tracking_uri
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HYDRA_FULL_ERROR": "0"}
    cut = tmp_path / "cut"
    trial = subprocess.Popen(
        trial_command(cut), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(cut / "checkpoints" / "step_000001", trial)
    time.sleep(0.5)  # mid-training: soon enough that a fast machine has not finished its 30 steps
    trial.send_signal(getattr(signal, signame))
    stdout, stderr = trial.communicate(timeout=120)
    signum = getattr(signal, signame)
    assert trial.returncode == 128 + signum, stdout + stderr
    assert "Traceback" not in stderr and f"stopped: preempted by {signame} at step " in stderr

    [run] = runs(uri)
    step = int(run.data.tags["preempted"])
    assert run.info.status == "KILLED" and 1 <= step < 30, (run.info.status, step)
    assert run.data.tags["resumes_from"].endswith(f"step_{step:06d}")
    assert (cut / "checkpoints" / f"step_{step:06d}").is_dir()
    assert checkpoint.find(cut).name == f"step_{step:06d}"
    listed = run_in_process("runs", f"tracking.uri={uri}")
    assert "1 preempted runs" in listed.stdout and run.info.run_id in listed.stdout, listed.stdout
    assert f"python -m harness resume={cut.resolve()}" in listed.stdout

    # The resume and the uninterrupted twin need no process of their own (the signal was the process's part).
    run_in_process(f"resume={cut}", cwd=tmp_path, env_uri=uri)
    whole = tmp_path / "whole"
    run_in_process(*TINY, *LONG, f"hydra.run.dir={whole}", cwd=tmp_path, env_uri=uri)
    client = mlflow.MlflowClient(uri)
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.data.tags["resumed_from"] == f"step_{step:06d}"
    assert "failure_reason" not in after.data.tags and "preempted" not in after.data.tags
    cut_weights, whole_weights = final_weights(cut), final_weights(whole)
    assert cut_weights.keys() == whole_weights.keys()
    assert all(torch.equal(cut_weights[k], whole_weights[k]) for k in cut_weights)


def test_ctrl_c_ends_the_run_killed_without_a_traceback(tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HYDRA_FULL_ERROR": "0"}
    trial = subprocess.Popen(
        trial_command(tmp_path / "run"),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(tmp_path / "run" / "checkpoints" / "step_000001", trial)
    trial.send_signal(signal.SIGINT)
    stdout, stderr = trial.communicate(timeout=120)
    assert trial.returncode == 130 and "Traceback" not in stderr, stdout + stderr
    [run] = runs(uri)
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "interrupted (SIGINT)"
