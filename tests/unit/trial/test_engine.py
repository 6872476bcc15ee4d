"""The trial engine: ranks and accumulation, exact resume after SIGKILL, non-finite steps, divergence."""

import math
import os
import signal
import time

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from harness.trial import checkpoint
from harness.trial.charts import write_charts
from harness.trial.trainer import DivergenceError, PeriodStats, Trial
from tests.conftest import TINY, compose_config, run_harness, run_in_process, start_harness

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


def test_batch_that_does_not_divide_fails_up_front(tmp_path):
    result = run_in_process(
        *TINY, "trainer.nproc_per_node=3", cwd=tmp_path, env_uri=f"sqlite:///{tmp_path}/m.db", check=False
    )
    assert result.returncode != 0
    assert (
        "trainer.global_batch_size=4: must be divisible by trainer.micro_batch_size × trainer.nproc_per_node = 2 × 3"
        in result.stderr
    )


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


@pytest.mark.slow
def test_resume_with_changed_overrides_is_refused(tmp_path, tracking_uri):
    run_in_process(*TINY, f"hydra.run.dir={tmp_path}/a", cwd=tmp_path, env_uri=tracking_uri)
    result = run_in_process(
        *TINY, "optim.lr=1e-3", f"resume={tmp_path}/a", cwd=tmp_path, env_uri=tracking_uri, check=False
    )
    assert result.returncode != 0 and "optim.lr: 0.0004 → 0.001" in result.stderr


def test_planted_huge_learning_rate_stops_the_trial_and_keeps_the_last_good_checkpoint(
    tmp_path, tracking_uri, monkeypatch
):
    real_step = Trial.train_step

    def plant_after_first_checkpoint(self, step):
        if step == 5:  # checkpoints after steps 1 and 5 (0-based steps 0 and 4: step % 4 == 0)
            self.scheduler.base_lrs = [1e30]
            self.optimizer.param_groups[0]["lr"] = 1e30
        return real_step(self, step)

    monkeypatch.setattr(Trial, "train_step", plant_after_first_checkpoint)
    cfg = compose_config(
        *TINY,
        "trainer.max_steps=30",
        "trainer.checkpoint_interval=4",
        "trainer.divergence_patience=3",
        "tracking.log_interval=1",
    )
    with pytest.raises(DivergenceError, match="non-finite for the last 3 steps"):
        Trial(cfg, tmp_path / "run").run()
    run = mlflow.MlflowClient(tracking_uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(tracking_uri).search_experiments()]
    )[0]
    assert run.info.status == "FAILED" and "DivergenceError" in run.data.tags["failure_reason"]
    good = checkpoint.find(tmp_path / "run")
    assert good.name == "step_000005"
    assert all(torch.isfinite(t).all() for t in load_file(str(good / checkpoint.MODEL_FILE)).values())


def test_non_finite_gradients_skip_the_update_in_fp32(tmp_path, tracking_uri):
    trial = Trial(compose_config(*TINY, "trainer.precision=fp32"), tmp_path)
    trial.train_step(0)
    before = {k: v.clone() for k, v in trial.model.state_dict().items()}
    adam_steps = trial.optimizer.state[trial.model.final_norm.weight]["step"].clone()
    handle = trial.model.final_norm.weight.register_hook(lambda g: g * float("nan"))
    loss, norm, max_abs, scale_lowered = trial.train_step(1).tolist()[:4]
    handle.remove()
    assert math.isfinite(loss) and math.isnan(norm) and math.isnan(max_abs) and scale_lowered == 0.0
    assert all(torch.equal(before[k], v) for k, v in trial.model.state_dict().items())  # nothing moved
    assert torch.equal(trial.optimizer.state[trial.model.final_norm.weight]["step"], adam_steps)
    trial.train_step(2)
    assert not torch.equal(before["final_norm.weight"], trial.model.final_norm.weight)  # training goes on


def test_non_finite_kinds_are_counted_separately():
    stats = PeriodStats(exploding_threshold=10.0, grad_clip=3.5)
    for loss, norm, max_abs in [
        (2.0, 1.0, 0.1),
        (2.0, 5.0, 0.5),
        (2.0, 50.0, 5.0),
        (2.1, math.inf, 1e30),
        (math.nan, math.nan, math.nan),
        (2.0, math.inf, math.inf),
    ]:
        stats.add(loss, norm, max_abs)
    s = stats.summary(step=6, tokens=600, flops_per_token=1.0, peak=None)
    assert (s["nonfinite_exploding"], s["nonfinite_overflow"], s["nonfinite_element"]) == (1, 1, 2)
    assert s["clip_fraction"] == pytest.approx(2 / 6) and s["grad_norm_max"] == 50.0
    assert s["train_loss_max"] == 2.1 and s["nonfinite_scaler_skips"] == 0


def test_charts_survive_infinite_and_nan_values(tmp_path):
    history = {
        "step": [1, 2, 3, 4],
        "loss": [3.0, math.inf, math.nan, 2.5],
        "grad_norm": [1.0, math.inf, math.nan, 2.0],
        "lr": [1e-3] * 4,
    }
    periods = [{"step": 4, "train_loss_avg": 2.75, "train_loss_min": 2.5, "train_loss_max": 3.0}]
    paths = write_charts(history, periods, tmp_path, grad_clip=3.5)
    assert [p.name for p in paths] == ["loss.png", "grad_norm.png", "lr.png"] and all(
        p.stat().st_size > 1000 for p in paths
    )


def test_deterministic_mode_runs_and_matches_on_cpu(tmp_path, tracking_uri):
    plain = Trial(compose_config(*TINY), tmp_path / "plain").run()
    strict = Trial(compose_config(*TINY, "trainer.deterministic=true"), tmp_path / "strict")
    from harness.trial.launch import set_determinism

    set_determinism(True)
    try:
        assert strict.run()["test_loss"] == plain["test_loss"]
    finally:
        set_determinism(False)
