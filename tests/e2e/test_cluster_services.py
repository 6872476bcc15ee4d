"""Smoke tests of the cluster services from `.ci/services.sh`: a study submitted to a real single-node SLURM
through the repository's `hydra/launcher=slurm`, and a trial tracked by a real `mlflow server` on PostgreSQL."""

import math
import os
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from tests.conftest import TINY, run_harness
from tests.e2e.conftest import libpq_uri

TRIAL_TAGS = [
    "intervention",
    "seed",
    "train_seed",
    "data_seed",
    "init_fingerprint",
    "config_hash",
    "code_version",
    "study",
    "scale",
]
# CPU-sized jobs for the launcher's per-GPU defaults: one task of one CPU, a little memory, a short time limit.
SLURM_CPU_JOB = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.tasks_per_node=1",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=5",
]


def trial_runs(tracking_uri: str) -> list:
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("harness/smoke")
    assert experiment is not None, f"no experiment harness/smoke in {tracking_uri}"
    runs = client.search_runs([experiment.experiment_id])
    return [r for r in runs if r.data.tags.get("study_parent") != "true" and r.data.tags.get("analysis") != "true"]


def assert_finished_trial(run, tags: list[str]) -> None:
    assert run.info.status == "FINISHED", (run.info.run_id, run.info.status)
    assert math.isfinite(run.data.metrics["test_loss"]), run.data.metrics
    missing = [t for t in tags if not run.data.tags.get(t)]
    assert not missing, f"run {run.info.run_id} lacks tags {missing}"


def test_a_study_submitted_to_slurm_finishes_every_trial_as_a_slurm_job(slurm_partition, tmp_path):
    sweep_dir = tmp_path / "study"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_harness(
        "+sweep=quick",
        *SLURM_CPU_JOB,
        f"hydra.launcher.partition={slurm_partition}",
        *TINY,
        "hydra.sweeper.arms=[baseline]",
        "hydra.sweeper.seeds=[1,2]",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
        env_uri=tracking_uri,
    )
    assert "with the slurm launcher" in result.stdout, result.stdout
    runs = trial_runs(tracking_uri)
    assert sorted(r.data.tags["seed"] for r in runs) == ["1", "2"], [r.data.tags for r in runs]
    for run in runs:
        assert_finished_trial(run, TRIAL_TAGS)
        assert run.data.tags["study"] == "quick"
    # Each trial ran in its own SLURM job: submitit's folder per job id holds the log in which the trial printed
    # its run id, and SLURM's accounting has the job COMPLETED.
    logs = {p.parent.name: p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_0_log.out")}
    assert len(logs) == 2, sorted(logs)
    for run in runs:
        assert len([job for job, log in logs.items() if f"run {run.info.run_id}" in log]) == 1, (run.info, logs)
    states = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", *[f"--jobs={job}" for job in logs]],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    assert sorted(states) == sorted(f"{job}|COMPLETED" for job in logs), states


def test_a_trial_tracked_by_an_mlflow_server_on_postgresql_is_stored_there(
    postgres_mlflow_server, postgres_uri, tmp_path
):
    result = run_harness(
        f"tracking.uri={postgres_mlflow_server}",
        *TINY,
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env_uri="sqlite:///never-used.db",
    )
    [run] = trial_runs(postgres_mlflow_server)
    assert_finished_trial(run, [t for t in TRIAL_TAGS if t != "study"])  # a single trial is in no study
    assert f"run {run.info.run_id}" in result.stdout, result.stdout
    assert run.data.tags["intervention"] == "baseline"
    assert not (tmp_path / "never-used.db").exists()
    # The server's records are PostgreSQL's rows.
    import psycopg2

    with psycopg2.connect(libpq_uri(postgres_uri)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cursor.fetchall() == [("FINISHED",)]
        cursor.execute("SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = 'test_loss'", (run.info.run_id,))
        [(test_loss,)] = cursor.fetchall()
    assert test_loss == pytest.approx(run.data.metrics["test_loss"])


def release_requeued(process: subprocess.Popen) -> None:
    """While `process` runs: start each requeued job at once. SLURM holds a requeued batch job for 120 s before it
    is eligible again (Reason=BeginTime); the test does not wait for that."""
    while process.poll() is None:
        pending = subprocess.run(
            ["squeue", "-h", "-t", "PD", "-o", "%i %r"], capture_output=True, text=True, timeout=30
        ).stdout.split("\n")
        for job in (line.split()[0] for line in pending if line.endswith("BeginTime")):
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, timeout=30)
        time.sleep(1)


@pytest.mark.slow  # its 60 steps must outlast SLURM's first signal (60-90 s): true only on a loaded machine
def test_a_slurm_trial_past_its_time_limit_checkpoints_requeues_and_finishes_bit_identically(slurm_partition, tmp_path):
    """`timeout_min=2`, `signal_delay_s=30`: SLURM sends submitit's USR2 at the first time-limit pass that finds at
    most 60 s left (60-90 s after the start, docs/cluster.md). The trial checkpoints at the next step boundary,
    submitit requeues the job, and the requeued trial continues the same run; an uninterrupted twin trains
    meanwhile under the basic launcher."""
    from safetensors.torch import load_file

    from harness.trial import checkpoint

    long = ["trainer.max_steps=60", "trainer.checkpoint_interval=30", "trainer.deterministic=true"]
    study = [*TINY, *long, "hydra.sweeper.arms=[baseline]", "hydra.sweeper.seeds=[1]"]
    tracking_uri, whole_uri = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'whole.db'}"
    command = [sys.executable, "-m", "harness", "+sweep=quick", *study]
    slurm = [
        *SLURM_CPU_JOB,
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=30",
        "hydra.launcher.max_num_timeout=8",
        f"hydra.launcher.partition={slurm_partition}",
        f"hydra.sweep.dir={tmp_path / 'study'}",
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    submitted = subprocess.Popen(
        [*command, *slurm],
        cwd=tmp_path,
        env={**env, "MLFLOW_TRACKING_URI": tracking_uri},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    whole = subprocess.Popen(
        [*command, f"hydra.sweep.dir={tmp_path / 'whole'}"],
        cwd=tmp_path,
        env={**env, "MLFLOW_TRACKING_URI": whole_uri},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    release_requeued(submitted)
    output = submitted.stdout.read()
    assert submitted.returncode == 0 and whole.wait(timeout=300) == 0, output
    [run] = trial_runs(tracking_uri)
    assert_finished_trial(run, TRIAL_TAGS)
    assert int(run.data.tags["preemptions"]) >= 1 and run.data.tags["resumed_from"].startswith("step_"), run.data.tags
    assert "resumed from step_" in output and "preempted " in output, output
    [uninterrupted_run] = trial_runs(whole_uri)
    cut = load_file(str(checkpoint.find(run.data.tags["run_dir"]) / checkpoint.MODEL_FILE))
    uninterrupted = load_file(str(checkpoint.find(uninterrupted_run.data.tags["run_dir"]) / checkpoint.MODEL_FILE))
    assert cut.keys() == uninterrupted.keys() and all(torch.equal(cut[k], uninterrupted[k]) for k in cut)
