"""The trial engine in-process: batch checks, refused resumes, non-finite steps, divergence. Spawned ranks:
tests/e2e/test_engine_processes.py; resume after SIGKILL: tests/e2e/test_engine_resume.py."""

import math

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from harness.trial import checkpoint
from harness.trial.charts import write_charts
from harness.trial.trainer import DivergenceError, PeriodStats, Trial
from tests.conftest import TINY, compose_config, run_in_process


def test_batch_that_does_not_divide_fails_up_front(tmp_path):
    result = run_in_process(
        *TINY, "trainer.nproc_per_node=3", cwd=tmp_path, env_uri=f"sqlite:///{tmp_path}/m.db", check=False
    )
    assert result.returncode != 0
    assert (
        "trainer.global_batch_size=4: must be divisible by trainer.micro_batch_size × trainer.nproc_per_node = 2 × 3"
        in result.stderr
    )


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
