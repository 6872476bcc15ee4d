"""Faithful to the study's own code where the study's facts (docs/study.md) are silent (gpjt/ddp-base-model-from-scratch @b314784):
checkpoint periods and `is_best`, the LR each step records, the fp16 precision path (autocast, GradScaler,
the fused optimizer's skip) on the CPU, the study's test-loss evaluation, MFU, and the code version a study
reuses runs by."""

import math

import mlflow
import pytest
import torch
import torch.nn.functional as F

from harness.data.loader import held_out_batches
from harness.tracking.version import code_version
from harness.trial import checkpoint
from harness.trial.flops import mfu
from harness.trial.plugins import Plugin
from harness.trial.trainer import PeriodStats, Trial, is_best_period
from tests.conftest import TINY, compose_config

LinearLR, CosineAnnealingLR = torch.optim.lr_scheduler.LinearLR, torch.optim.lr_scheduler.CosineAnnealingLR


def history(client, run_id: str, metric: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, metric)}


def reference_is_best(averages: list[float]) -> list[bool]:
    """ddp_train.py: `if best_loss is None or avg_train_loss < best_loss` (its average includes every loss)."""
    best, flags = None, []
    for average in averages:
        flags.append(best is None or average < best)
        best = average if flags[-1] else best
    return flags


def test_a_fp16_trial_records_periods_is_best_lr_and_test_losses_as_the_reference_code(
    tmp_path, tracking_uri, monkeypatch
):
    """A whole fp16_amp trial on the CPU. 7 steps, interval 3: the reference checkpoints after 0-based steps 0, 3
    and 6 (`step % 3 == 0`, and the last), so its periods are {0}, {1, 2, 3}, {4, 5, 6}; a non-finite loss keeps
    a period from being best. test_loss_amp is its test_loss.py: inference_mode, fp16 autocast, the mean of
    per-batch mean losses; test_loss stays full precision."""
    real_step = Trial.train_step

    def nan_loss_at_step_4(self, step):
        values = real_step(self, step)
        return torch.cat([torch.full((1,), math.nan), values[1:]]) if step == 4 else values

    monkeypatch.setattr(Trial, "train_step", nan_loss_at_step_4)
    cfg = compose_config(
        *TINY,
        "+intervention=lr_schedule",
        "optim.warmup_fraction=0.3",
        "trainer.max_steps=7",
        "trainer.checkpoint_interval=3",
        "trainer.device=cpu",
        "trainer.precision=fp16_amp",
        "trainer.keep_checkpoints=null",
    )
    trial = Trial(cfg, tmp_path / "run")
    result = trial.run()
    client = mlflow.MlflowClient(tracking_uri)
    run_id = result["run_id"]
    loss = history(client, run_id, "train_loss")  # at steps done: 1 … 7
    covered = {1: [1], 4: [2, 3, 4], 7: [5, 6, 7]}
    averages = history(client, run_id, "train_loss_avg")
    assert sorted(averages) == sorted(covered)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == [
        "step_000001",
        "step_000004",
        "step_000007",
    ]
    for end, steps in covered.items():
        finite = [loss[s] for s in steps if math.isfinite(loss[s])]
        assert averages[end] == pytest.approx(sum(finite) / len(finite), rel=1e-12)
        assert history(client, run_id, "train_loss_min")[end] == min(finite)
        assert history(client, run_id, "train_loss_max")[end] == max(finite)
    assert math.isnan(loss[5]) and history(client, run_id, "nonfinite_loss") == {1: 0, 4: 0, 7: 1}

    reference_averages = [sum(loss[s] for s in covered[end]) / len(covered[end]) for end in sorted(covered)]
    expected = reference_is_best(reference_averages)
    assert [history(client, run_id, "is_best")[end] for end in sorted(covered)] == [float(x) for x in expected]
    assert expected[-1] is False and averages[7] < averages[4]  # best without its NaN, but not by the reference's rule
    best_step = max(end for end, flag in zip(sorted(covered), expected) if flag)
    assert checkpoint.resolve(tmp_path / "run" / "checkpoints", "best").name == f"step_{best_step:06d}"

    # the LR logged at step n is the one 0-based step n − 1 used: torch's SequentialLR, as the reference built it
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    warmup = 7 * 30 // 100
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            LinearLR(optimizer, start_factor=1e-5, total_iters=warmup),
            CosineAnnealingLR(optimizer, T_max=7 - warmup, eta_min=cfg.optim.lr / 10),
        ],
        milestones=[warmup],
    )
    expected_lr = []
    for _ in range(7):
        expected_lr.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lr = history(client, run_id, "lr")
    assert [lr[n] for n in range(1, 8)] == pytest.approx(expected_lr, rel=1e-6)  # MLflow keeps float64

    model = trial.model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
        losses = [
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
            for x, y in held_out_batches(trial.test_tokens, cfg.data, cfg.model.context_length)
        ]
    assert result["test_loss_amp"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    with torch.no_grad():
        total = sum(
            F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").double().item()
            for x, y in held_out_batches(trial.test_tokens, cfg.data, cfg.model.context_length)
        )
    assert result["test_loss"] == pytest.approx(total / cfg.data.test_tokens, rel=1e-6)
    assert result["test_loss_amp"] != result["test_loss"] and abs(result["test_loss_amp"] - result["test_loss"]) < 0.01
    run = client.get_run(run_id)
    assert run.data.metrics["test_loss_amp"] == result["test_loss_amp"]
    assert run.data.tags["test_loss_amp_autocast"] == "torch.float16"
    assert run.data.tags["code_version"] == code_version()


def test_is_best_is_the_lowest_average_so_far_and_never_a_period_with_a_non_finite_loss():
    def period(*losses):
        stats = PeriodStats(exploding_threshold=10.0, grad_clip=None)
        for value in losses:
            stats.add(value, 1.0, 0.1)
        return stats.summary(step=0, tokens=1, flops_per_token=1.0, peak=None)

    earlier = []
    for losses, best in [
        ((5.0,), True),
        ((4.0, math.nan), False),
        ((math.nan,), False),
        ((4.5,), True),
        ((4.5,), False),
        ((4.6,), False),
        ((4.4, 4.3), True),
    ]:
        stats = period(*losses)
        stats["is_best"] = is_best_period(stats, earlier)
        assert stats["is_best"] is best, losses
        earlier.append(stats)


class OverflowingNorm(Plugin):
    """Kind (b): finite gradient elements (after unscaling) whose global L2 norm overflows to inf."""

    def __init__(self, step: int):
        self.step = step

    def after_backward(self, model, step):
        if step == self.step:
            model.final_norm.weight.grad.fill_(3e38)


def test_fp16_autocast_gradscaler_and_the_fused_skip_run_on_cpu(tmp_path, tracking_uri):
    """The baseline's own precision path: a planted inf gradient (kind c) is skipped and halves the scale; a
    norm overflow of finite elements (kind b) is skipped without touching the scale; Adam's step count holds."""
    trial = Trial(compose_config(*TINY, "trainer.device=cpu", "trainer.precision=fp16_amp"), tmp_path)
    assert trial.scaler.is_enabled() and trial.optimizer.defaults["fused"]
    with trial.precision.autocast():
        assert trial.model(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.float16
    weight = trial.model.final_norm.weight
    trial.plugins.active.append(OverflowingNorm(step=2))
    assert trial.train_step(0).tolist()[3] == 0.0 and trial.scaler.get_scale() == 65536.0

    def skipped_step(step: int, plant=None) -> list[float]:
        before = {k: v.clone() for k, v in trial.model.state_dict().items()}
        adam_steps = trial.optimizer.state[weight]["step"].clone()
        handle = weight.register_hook(plant) if plant else None
        values = trial.train_step(step).tolist()[:4]  # loss, norm, max |grad|, scale lowered
        if handle:
            handle.remove()
        assert all(torch.equal(before[k], v) for k, v in trial.model.state_dict().items())  # nothing moved
        assert torch.equal(trial.optimizer.state[weight]["step"], adam_steps)
        return values

    loss, norm, max_abs, lowered = skipped_step(1, plant=lambda grad: torch.full_like(grad, math.inf))
    assert math.isfinite(loss) and math.isinf(max_abs) and lowered == 1.0
    assert trial.scaler.get_scale() == 32768.0  # halved
    loss, norm, max_abs, lowered = skipped_step(2)
    assert math.isinf(norm) and math.isfinite(max_abs) and lowered == 0.0
    assert trial.scaler.get_scale() == 32768.0  # kind (b) leaves the scale alone

    adam_steps = trial.optimizer.state[weight]["step"].clone()
    trial.train_step(3)
    assert trial.optimizer.state[weight]["step"] == adam_steps + 1  # training goes on

    stats = PeriodStats(exploding_threshold=10.0, grad_clip=None)
    for values in ([2.0, 1.0, 0.1, 0.0], [2.0, math.nan, math.inf, 1.0], [2.0, math.inf, 3e38, 0.0]):
        stats.add(*values)
    summary = stats.summary(step=3, tokens=3, flops_per_token=1.0, peak=None)
    assert (summary["nonfinite_element"], summary["nonfinite_overflow"], summary["nonfinite_scaler_skips"]) == (1, 1, 1)


def test_mfu_is_per_device():
    assert mfu(100.0, 6e9, 1e12, devices=1) == pytest.approx(0.6)
    assert mfu(100.0, 6e9, 1e12, devices=8) == pytest.approx(0.6 / 8)
    stats = {devices: PeriodStats(exploding_threshold=10.0, grad_clip=None, devices=devices) for devices in (1, 8)}
    for s in stats.values():
        s.add(3.0, 1.0, 0.1)
        s.started -= 1.0  # a period of about one second
    one, eight = (stats[d].summary(step=1, tokens=8000, flops_per_token=6e9, peak=1e12) for d in (1, 8))
    assert eight["mfu"] == pytest.approx(one["mfu"] / 8, rel=1e-3)
