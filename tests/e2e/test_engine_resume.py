"""A trial SIGKILLed after a checkpoint, for real, resumes bit-identically to an uninterrupted one, into the same
MLflow run."""

import os
import signal
import time

import mlflow
import pytest
import torch

from harness.trial import checkpoint
from tests.conftest import TINY, final_weights, new_store, run_in_process, start_harness


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param([], id="dropout"),
        pytest.param(["+intervention=[no_dropout,lr_schedule]"], id="no_dropout_lr", marks=pytest.mark.slow),
    ],
)
def test_resume_after_sigkill_is_bit_identical_to_uninterrupted(tmp_path, variant):
    uri = new_store(tmp_path / "mlflow.db")
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
