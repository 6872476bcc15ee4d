"""Records that stay true across real processes: a password in the tracking URI against a real `mlflow server`,
two resumes of one directory at once, SIGKILL + resume under another thread count, and Ctrl-C's reason."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from harness.tracking import liveness
from harness.trial import checkpoint
from tests.conftest import TINY, MlflowServer, final_weights, new_store, run_harness, run_in_process

SECRET = "S3cret"


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "server")
    (tmp_path / "server").mkdir()
    server.start()
    yield server
    server.kill()


def written_files(*directories: Path) -> list[Path]:
    return [path for directory in directories for path in directory.rglob("*") if path.is_file()]


def test_a_password_in_the_tracking_uri_is_written_nowhere(tmp_path, mlflow_server):
    uri = mlflow_server.url.replace("http://", f"http://alice:{SECRET}@")
    run_dir = tmp_path / "run"
    result = run_harness(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path, env_uri=uri)
    client = mlflow.MlflowClient(mlflow_server.url)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking.uri"] == mlflow_server.url
    assert mlflow_server.url in result.stderr + result.stdout  # the printed UI link, without the password
    records = [*run.data.params.values(), *run.data.tags.values(), result.stdout, result.stderr]
    assert not [text for text in records if SECRET in text]
    files = written_files(run_dir, tmp_path / "server" / "artifacts") + [tmp_path / "server" / "server.db"]
    assert any(path.name == "config.yaml" for path in files)
    assert not [path for path in files if SECRET.encode() in path.read_bytes()]

    on_command_line = run_harness(*TINY, f"tracking.uri={uri}", cwd=tmp_path, env_uri=uri, check=False)
    assert on_command_line.returncode == 2 and SECRET not in on_command_line.stderr
    assert "give credentials as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" in on_command_line.stderr


def start(*args: str, cwd: Path, uri: str, threads: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HYDRA_FULL_ERROR": "0"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_checkpoint(run_dir: Path, process: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "latest").exists():
        assert process.poll() is None and time.time() < deadline, process.stderr.read()
        time.sleep(0.05)


def only_run(uri: str):
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run


def test_a_second_resume_of_one_directory_is_refused_at_once_leaving_the_first_alone(tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
    run_dir = tmp_path / "run"
    first = start(
        *TINY, "trainer.max_steps=20000", "data.max_epochs=1000", f"hydra.run.dir={run_dir}", cwd=tmp_path, uri=uri
    )
    wait_for_checkpoint(run_dir, first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    mlflow.MlflowClient(uri).set_terminated(only_run(uri).info.run_id, "KILLED")

    resuming = start(f"resume={run_dir}", cwd=tmp_path, uri=uri)
    deadline = time.time() + 240
    while only_run(uri).info.status != "RUNNING":  # the first resume holds the lock and trains on
        assert resuming.poll() is None and time.time() < deadline, resuming.stderr.read()
        time.sleep(0.1)
    second = run_harness(f"resume={run_dir}", cwd=tmp_path, env_uri=uri, check=False)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"{run_dir} is being resumed by process {resuming.pid}" in lines[0]
    assert resuming.poll() is None and only_run(uri).info.status == "RUNNING"  # the first goes on untouched
    os.killpg(resuming.pid, signal.SIGINT)
    resuming.wait(timeout=120)
    run = only_run(uri)
    assert run.info.status == "KILLED" and run.data.tags[liveness.REASON_TAG] == "interrupted (SIGINT)"


def test_sigkill_and_resume_under_another_thread_count_is_bit_identical(tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
    longer = [*TINY, "trainer.max_steps=20", "trainer.checkpoint_interval=5", "model.d_model=64"]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the uninterrupted twin, in this process, computes as the killed trial does
    try:
        run_in_process(*longer, f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path, env_uri=uri)
    finally:
        torch.set_num_threads(threads)
    killed_dir = tmp_path / "killed"
    killed = start(*longer, f"hydra.run.dir={killed_dir}", cwd=tmp_path, uri=uri, threads=2)
    wait_for_checkpoint(killed_dir, killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    resumed = start(f"resume={killed_dir}", cwd=tmp_path, uri=uri, threads=1)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    expected, got = final_weights(tmp_path / "whole"), final_weights(killed_dir)
    assert checkpoint.find(killed_dir).name == "step_000020"
    assert all((expected[name] == got[name]).all() for name in expected)
