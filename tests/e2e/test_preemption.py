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
from safetensors.torch import load_file

from harness.trial import checkpoint
from tests.conftest import TINY, run_in_process
from tests.e2e.test_study_processes import SWEEP_TINY, run_sweep, runs, sweep_command, sweep_env, table

LONG = ["trainer.max_steps=30", "trainer.checkpoint_interval=20", "trainer.deterministic=true"]


def trial_command(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *TINY, *LONG, *args, f"hydra.run.dir={run_dir}"]


def final_weights(run_dir: Path) -> dict:
    return load_file(str(checkpoint.find(run_dir) / checkpoint.MODEL_FILE))


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
    time.sleep(2.0)  # into the second period: the preemption checkpoint is not a periodic one
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

    resumed = subprocess.run(
        [sys.executable, "-m", "harness", f"resume={cut}"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    whole = tmp_path / "whole"
    subprocess.run(trial_command(whole), cwd=tmp_path, env=env, check=True, capture_output=True)
    client = mlflow.MlflowClient(uri)
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.data.tags["resumed_from"] == f"step_{step:06d}"
    assert "failure_reason" not in after.data.tags and "preempted" not in after.data.tags
    cut_weights, whole_weights = final_weights(cut), final_weights(whole)
    assert cut_weights.keys() == whole_weights.keys()
    assert all(torch.equal(cut_weights[k], whole_weights[k]) for k in cut_weights)


def test_ctrl_c_ends_the_run_killed_without_a_traceback(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
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


def test_a_sigkilled_study_resumes_its_trial_in_the_same_run_bit_identically(tmp_path):
    """A study SIGKILLed mid-trial: the next execution continues that trial's run from its latest checkpoint; the
    study ends with one FINISHED run whose weights equal an uninterrupted study's."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = ["hydra.sweeper.arms=[baseline]", "hydra.sweeper.seeds=[1]", *LONG[2:]]
    steps = ["trainer.max_steps=30", "trainer.checkpoint_interval=20"]
    first = subprocess.Popen(
        sweep_command(*study, *steps, sweep_dir=tmp_path / "first"),
        cwd=tmp_path,
        env=sweep_env(uri),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(tmp_path / "first" / "0" / "checkpoints" / "step_000021", first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(4.5)  # 4 heartbeat intervals: the killed execution's runs are stale

    plan = run_in_process("plan", "+sweep=quick", *SWEEP_TINY, *study, *steps, env_uri=uri)
    assert "resume: 1 trial continue an unfinished run:" in plan.stdout, plan.stdout + plan.stderr
    assert "baseline-s1: run " in plan.stdout and "from step_000021, 21 steps done" in plan.stdout
    second = run_sweep(*study, *steps, sweep_dir=tmp_path / "second", uri=uri)
    assert second.returncode == 0, second.stdout + second.stderr
    resumed = [r for r in runs(uri) if r.data.tags.get("resumed_from")]
    assert len(resumed) == 1, second.stdout + second.stderr
    [killed] = resumed
    assert f"baseline-s1 resumes run {killed.info.run_id} (KILLED) from step_000021" in second.stdout
    assert table(second.stdout) == {"baseline-s1": "FINISHED"}
    assert "resumed from step_000021" in second.stdout
    assert [r.info.status for r in runs(uri)] == ["FINISHED"]  # the same run, continued

    whole_uri = f"sqlite:///{tmp_path / 'whole.db'}"
    whole = run_sweep(*study, *steps, sweep_dir=tmp_path / "whole", uri=whole_uri)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    cut_weights, whole_weights = final_weights(tmp_path / "first" / "0"), final_weights(tmp_path / "whole" / "0")
    assert all(torch.equal(cut_weights[k], whole_weights[k]) for k in whole_weights)


def test_a_diverged_trial_is_a_result_and_not_run_again(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = [
        "hydra.sweeper.arms=[baseline]",
        "hydra.sweeper.seeds=[1]",
        "optim.lr=1e30",
        "trainer.divergence_patience=1",
    ]
    first = run_sweep(*study, sweep_dir=tmp_path / "first", uri=uri)
    assert first.returncode == 1 and table(first.stdout) == {"baseline-s1": "FAILED"}, first.stdout + first.stderr
    assert "baseline-s1 diverged (a result; rerun=true runs them again)" in first.stderr
    [diverged] = runs(uri)
    second = run_sweep(*study, sweep_dir=tmp_path / "second", uri=uri)
    assert f"baseline-s1 is not run again: its run {diverged.info.run_id} diverged" in second.stdout
    assert table(second.stdout) == {"baseline-s1": "FAILED"} and len(runs(uri)) == 1
