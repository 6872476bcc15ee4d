"""The trial engine with real processes: two spawned ranks train as one rank with accumulation does, and a trial
SIGKILLed after a checkpoint resumes bit-identically to an uninterrupted one."""

import os
import signal
import time

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from harness.trial import checkpoint
from tests.conftest import TINY, run_harness, run_in_process, start_harness

NO_DROPOUT = [*TINY, "model.dropout=0.0", "trainer.max_steps=6", "trainer.checkpoint_interval=3"]


def final_weights(run_dir) -> dict:
    return load_file(str(checkpoint.find(run_dir) / checkpoint.MODEL_FILE))


def train_losses(uri: str) -> dict[str, list[float]]:
    """Per-step train_loss of every run in the store, keyed by the run's world size and batch shape."""
    client = mlflow.MlflowClient(uri)
    out = {}
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        key = f"w{run.data.tags['world_size']}-b{run.data.params['trainer.micro_batch_size']}"
        history = sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
        out[key] = [m.value for m in history]
    return out


def test_ranks_accumulation_and_micro_batch_give_the_same_training(tmp_path):
    """2 ranks × micro B (real gloo launch), 1 rank × micro B × 2 accumulation, 1 rank × micro 2B."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_harness(*NO_DROPOUT, "trainer.nproc_per_node=2", f"hydra.run.dir={tmp_path}/ranks", cwd=tmp_path, env_uri=uri)
    run_in_process(*NO_DROPOUT, f"hydra.run.dir={tmp_path}/accum", cwd=tmp_path, env_uri=uri)
    run_in_process(
        *NO_DROPOUT, "trainer.micro_batch_size=4", f"hydra.run.dir={tmp_path}/wide", cwd=tmp_path, env_uri=uri
    )
    per_step = train_losses(uri)
    assert set(per_step) == {"w2-b2", "w1-b2", "w1-b4"}  # one MLflow run per trial, however many ranks
    for key in ("w2-b2", "w1-b4"):
        assert len(per_step[key]) == 6
        np.testing.assert_allclose(per_step[key], per_step["w1-b2"], rtol=0, atol=2e-6)
    reference = final_weights(tmp_path / "accum")
    for name in ("ranks", "wide"):
        weights = final_weights(tmp_path / name)
        for key, tensor in reference.items():
            torch.testing.assert_close(weights[key], tensor, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param([], id="dropout"),
        pytest.param(["+intervention=[no_dropout,lr_schedule]"], id="no_dropout_lr", marks=pytest.mark.slow),
    ],
)
def test_resume_after_sigkill_is_bit_identical_to_uninterrupted(tmp_path, variant):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    trial = [*TINY, *variant, "trainer.max_steps=24", "trainer.checkpoint_interval=4", "seed=5", "train_seed=9"]
    run_in_process(*trial, f"hydra.run.dir={tmp_path}/whole", cwd=tmp_path, env_uri=uri)

    killed_dir = tmp_path / "killed"
    proc = start_harness(*trial, f"hydra.run.dir={killed_dir}", cwd=tmp_path, uri=uri)
    deadline = time.time() + 120
    while not (killed_dir / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, "trial ended before its first checkpoint"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reached = checkpoint.resolve(killed_dir / "checkpoints").name
    assert reached != "step_000024", "the kill came too late to test anything"

    run_in_process(f"resume={killed_dir}", f"hydra.run.dir={tmp_path}/resume_log", cwd=tmp_path, env_uri=uri)
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(killed_dir)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), f"resumed from {reached} differs"

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}  # resume continued the killed run
    assert runs[0].data.metrics["test_loss"] == runs[1].data.metrics["test_loss"]
