"""The trial engine on two ranks, spawned for real (gloo): it trains as one rank with gradient accumulation
and as one rank with the doubled micro-batch do. Resume after SIGKILL: tests/e2e/test_engine_resume.py."""

import mlflow
import numpy as np
import torch

from tests.conftest import TINY, final_weights, new_store, run_harness, run_in_process

NO_DROPOUT = [*TINY, "model.dropout=0.0", "trainer.max_steps=6", "trainer.checkpoint_interval=3"]


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
    uri = new_store(tmp_path / "mlflow.db")
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
