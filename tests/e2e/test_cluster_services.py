"""The cluster for real, on the services of `.ci/services.sh`: studies submitted to a single-node SLURM through the
repository's `hydra/launcher=slurm` (a job per trial, a 2-task job for a 2-rank trial, a time limit shorter than
the trial), the `srun torchrun` recipe, and a trial tracked by an `mlflow server` on PostgreSQL."""

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from tests.conftest import TINY, final_weights, free_port, new_store, run_harness, run_in_process
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
    "hydra.sweeper.analyze=false",  # the analysis has its own tests; here it would write <project>/reports
]


# One trial in 3 periods, which 2 ranks and 1 process train alike under +intervention=no_dropout (no per-rank
# random draws).
TWO_RANK_TRIAL = [*TINY, "trainer.max_steps=6", "trainer.checkpoint_interval=3"]


@pytest.fixture(scope="module")
def one_process_weights(tmp_path_factory) -> dict:
    """The final weights of `+intervention=no_dropout seed=1` trained in one process: what the 2-rank SLURM
    trials must equal, within the engine's tolerance for ranks vs accumulation (2e-6)."""
    directory = tmp_path_factory.mktemp("one_process")
    run_in_process(
        "+intervention=no_dropout",
        "seed=1",
        *TWO_RANK_TRIAL,
        f"hydra.run.dir={directory / 'run'}",
        cwd=directory,
        env_uri=new_store(directory / "mlflow.db"),
    )
    return final_weights(directory / "run")


def assert_same_training(weights: dict, reference: dict) -> None:
    assert weights.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(weights[key], tensor, rtol=0, atol=2e-6)


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


def accounting_once_ended(jobs: list[str], fields: str) -> list[str]:
    """SLURM's accounting lines (`fields`, `|`-separated) for `jobs` once none is still active. submitit returns
    when a job's result file is written; the job may still be RUNNING or COMPLETING for a moment after."""
    deadline = time.time() + 60
    while True:
        lines = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", f"{fields},State", *[f"--jobs={job}" for job in jobs]],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        active = [line for line in lines if line.rsplit("|", 1)[-1] in ("PENDING", "RUNNING", "COMPLETING")]
        if not active or time.time() > deadline:
            return lines
        time.sleep(0.5)


def test_a_study_submitted_to_slurm_finishes_every_trial_as_a_slurm_job(slurm_partition, tmp_path):
    sweep_dir = tmp_path / "study"
    tracking_uri = new_store(tmp_path / "mlflow.db")
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
    states = accounting_once_ended(list(logs), "JobID")
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


def test_a_two_rank_trial_runs_as_one_slurm_job_of_two_tasks(slurm_partition, one_process_weights, tmp_path):
    """`hydra.launcher.tasks_per_node=2`: one job, two tasks, each task one rank of the trial (gloo); one MLflow
    run, trained as one process trains it."""
    tracking_uri = new_store(tmp_path / "mlflow.db")
    run_harness(
        "+sweep=quick",
        *SLURM_CPU_JOB,
        "hydra.launcher.tasks_per_node=2",
        f"hydra.launcher.partition={slurm_partition}",
        *TWO_RANK_TRIAL,
        "hydra.sweeper.arms=[no_dropout]",
        "hydra.sweeper.seeds=[1]",
        f"hydra.sweep.dir={tmp_path / 'study'}",
        cwd=tmp_path,
        env_uri=tracking_uri,
    )
    [run] = trial_runs(tracking_uri)
    assert_finished_trial(run, TRIAL_TAGS)
    assert run.data.tags["world_size"] == "2", run.data.tags
    [log] = (tmp_path / "study" / ".submitit").glob("*/*_0_log.out")  # rank 0's task; rank 1's is *_1_log.out
    job = log.parent.name
    assert len(list(log.parent.glob("*_1_log.out"))) == 1, sorted(log.parent.iterdir())
    allocation = accounting_once_ended([job], "AllocCPUS")  # a CPU for each task (its tasks: the two logs above)
    assert allocation == ["2|COMPLETED"], allocation
    assert_same_training(final_weights(run.data.tags["run_dir"]), one_process_weights)


def test_the_srun_torchrun_recipe_trains_one_trial_on_two_tasks(slurm_partition, one_process_weights, tmp_path):
    """docs/studies.md's multi-node recipe, on one node: an sbatch script with 2 tasks, each `srun` task one
    torchrun agent of a 2-node rendezvous (1 process each) running `python -m harness`."""
    tracking_uri = new_store(tmp_path / "mlflow.db")
    trial = ["+intervention=no_dropout", "seed=1", *TWO_RANK_TRIAL]
    script = tmp_path / "trial.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --partition={slurm_partition} --nodes=1 --ntasks=2 --cpus-per-task=1 --mem=4G --time=5\n"
        "srun torchrun --nnodes=2 --nproc-per-node=1 --rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d "
        f"--rdzv-endpoint=$(scontrol show hostnames | head -1):{free_port()} -m harness {' '.join(trial)}\n"
    )
    submitted = subprocess.run(
        ["sbatch", "--wait", f"--output={tmp_path / 'job.out'}", str(script)],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr + output
    [run] = trial_runs(tracking_uri)
    assert_finished_trial(run, [t for t in TRIAL_TAGS if t != "study"])
    assert run.data.tags["world_size"] == "2" and "2 ranks × 1 micro-steps" in output, output
    assert output.count(f"run {run.info.run_id}") == 1, output  # rank 0 alone reports the run
    assert_same_training(final_weights(run.data.tags["run_dir"]), one_process_weights)


def release_requeued(process: subprocess.Popen) -> None:
    """While `process` runs: start each requeued job at once, with a 10-minute limit. SLURM holds a requeued batch
    job for 120 s before it is eligible again (Reason=BeginTime), and on a loaded 2-core machine a 2-minute job
    spends most of its time starting the trial; the requeue and the resume are what the test proves."""
    while process.poll() is None:
        pending = subprocess.run(
            ["squeue", "-h", "-t", "PD", "-o", "%i %r"], capture_output=True, text=True, timeout=30
        ).stdout.split("\n")
        for job in (line.split()[0] for line in pending if line.endswith("BeginTime")):
            subprocess.run(
                ["scontrol", "update", f"JobId={job}", "StartTime=now", "TimeLimit=10"], capture_output=True, timeout=30
            )
        time.sleep(1)


def job_trial_pid(study_dir: Path) -> int | None:
    """The process of a study's SLURM job that runs the trial (`python -u -m submitit.core._submit FOLDER`, not
    the `srun` that started it), or None once it has ended."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if "submitit.core._submit" in argv and str(study_dir) in argv[-2] and "srun" not in Path(argv[0]).name:
            return int(proc.name)
    return None


def signal_state(pid: int) -> tuple[str, bool] | None:
    """`pid`'s state letter (`T`: stopped) and whether a USR2 is pending; None once it has ended."""
    try:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except FileNotFoundError:
        return None
    pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
    return status["State"].split()[0], bool(pending & (1 << (signal.SIGUSR2 - 1)))


def hold_the_trial_until_slurm_warns_it(study_dir: Path, process: subprocess.Popen) -> None:
    """Once the job's trial has saved its first checkpoint (its handler is in place), SIGSTOP it until SLURM's
    time-limit warning (submitit's USR2) comes, then SIGCONT: however fast this machine trains, the warning
    finds the trial still training. SLURM sends a signalled step SIGCONT itself; a warning delivered before the
    stop (a slow start) ends the hold after 75 s, more than the warning can take."""
    deadline = time.time() + 300
    while not list(study_dir.glob("*/checkpoints/latest")):
        assert process.poll() is None and time.time() < deadline, "the trial saved no checkpoint"
        time.sleep(0.05)
    pid = job_trial_pid(study_dir)
    if pid is None:
        return
    os.kill(pid, signal.SIGSTOP)
    held = time.time()
    while (state := signal_state(pid)) is not None and state[0] != "T" and time.time() < held + 10:
        time.sleep(0.01)  # the stop takes effect asynchronously
    while (state := signal_state(pid)) is not None and state == ("T", False) and time.time() < held + 75:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def test_a_slurm_trial_past_its_time_limit_checkpoints_requeues_and_finishes_bit_identically(slurm_partition, tmp_path):
    """`timeout_min=2`, `signal_delay_s=60`: SLURM sends submitit's USR2 at the first time-limit pass that finds at
    most 90 s left, 30-60 s after the job starts (docs/cluster.md). The trial is held (SIGSTOP) from its first
    checkpoint until the warning is pending, so it is still training: it checkpoints at the next step boundary,
    submitit requeues the job, and the requeued trial continues the same run. Its uninterrupted twin trains
    in this process while the requeued job waits and resumes."""
    long = ["trainer.max_steps=100", "trainer.checkpoint_interval=50", "trainer.deterministic=true"]
    study = [*TINY, *long, "hydra.sweeper.arms=[baseline]", "hydra.sweeper.seeds=[1]", "hydra.sweeper.analyze=false"]
    tracking_uri, whole_uri = new_store(tmp_path / "mlflow.db"), new_store(tmp_path / "whole.db")
    slurm = [
        *SLURM_CPU_JOB,
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=60",
        "hydra.launcher.max_num_timeout=8",
        f"hydra.launcher.partition={slurm_partition}",
        f"hydra.sweep.dir={tmp_path / 'study'}",
    ]
    log = tmp_path / "study.log"
    with open(log, "w") as out:
        submitted = subprocess.Popen(
            [sys.executable, "-m", "harness", "+sweep=quick", *study, *slurm],
            cwd=tmp_path,
            env={**os.environ, "HYDRA_FULL_ERROR": "0", "MLFLOW_TRACKING_URI": tracking_uri},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    releasing = threading.Thread(target=release_requeued, args=(submitted,), daemon=True)
    releasing.start()
    hold_the_trial_until_slurm_warns_it(tmp_path / "study", submitted)
    run_in_process("+sweep=quick", *study, f"hydra.sweep.dir={tmp_path / 'whole'}", cwd=tmp_path, env_uri=whole_uri)
    submitted.wait(timeout=600)
    releasing.join()
    output = log.read_text()
    assert submitted.returncode == 0, output
    [run] = trial_runs(tracking_uri)
    assert_finished_trial(run, TRIAL_TAGS)
    assert int(run.data.tags["preemptions"]) >= 1 and run.data.tags["resumed_from"].startswith("step_"), run.data.tags
    assert "resumed from step_" in output and "preempted " in output, output
    assert "done (1 KILLED)" not in output, output  # while requeued, the progress line says "1 preempted"
    [uninterrupted_run] = trial_runs(whole_uri)
    cut, uninterrupted = final_weights(run.data.tags["run_dir"]), final_weights(uninterrupted_run.data.tags["run_dir"])
    assert cut.keys() == uninterrupted.keys() and all(torch.equal(cut[k], uninterrupted[k]) for k in cut)
