"""Learning-rate schedules against torch's own schedulers (the reference code used SequentialLR), and AdamW settings."""

import pytest
import torch

from harness.trial.optim import OptimConfig, build_scheduler, lr_factor, warmup_steps
from harness.trial.plugins import Plugins
from tests.conftest import compose_config

LinearLR, CosineAnnealingLR = torch.optim.lr_scheduler.LinearLR, torch.optim.lr_scheduler.CosineAnnealingLR
ConstantLR, SequentialLR = torch.optim.lr_scheduler.ConstantLR, torch.optim.lr_scheduler.SequentialLR


def used_lrs(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    """The LR each step uses: read before the step, as the trainer records it (and the reference code did)."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def harness_lrs(cfg: OptimConfig, total: int) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    return used_lrs(optimizer, build_scheduler(optimizer, total, cfg, Plugins({})), total)


def torch_lrs(peak: float, total: int, build) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    return used_lrs(optimizer, build(optimizer), total)


def max_relative_difference(ours: list[float], theirs: list[float]) -> float:
    assert len(ours) == len(theirs)
    return max(abs(a - b) / abs(b) if b else abs(a) for a, b in zip(ours, theirs))


def test_lr_schedule_is_torchs_sequential_linear_then_cosine_at_every_step_of_gpt2_small():
    """The reference code's scheduler, stepped 33,165 times (ddp_train.py: warmup = total × 5 // 100)."""
    cfg = compose_config("scale=gpt2_small", "+intervention=lr_schedule")
    total, peak = cfg.trainer.max_steps, cfg.optim.lr
    warmup = total * 5 // 100
    assert (total, warmup, peak) == (33_165, 1_658, 1.4e-3) and warmup_steps(total, cfg.optim) == warmup

    def reference(optimizer):
        return SequentialLR(
            optimizer,
            [
                LinearLR(optimizer, start_factor=0.00001, end_factor=1.0, total_iters=warmup),
                CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=peak / 10),
            ],
            milestones=[warmup],
        )

    theirs, ours = torch_lrs(peak, total, reference), harness_lrs(cfg.optim, total)
    assert max_relative_difference(ours, theirs) < 1e-11
    assert ours[0] == pytest.approx(1.4e-8) and ours[warmup] == pytest.approx(1.4e-3)
    assert ours[-1] > 1.4e-4 and ours[-1] == pytest.approx(1.4e-4, rel=1e-7)  # peak/10 one step after the last


def test_warmup_fraction_is_floored_exactly_as_integer_percent_arithmetic():
    for total in (100, 1000, 2020, 33_165, 99_999):
        for percent in (1, 5, 7, 29, 57):
            cfg = OptimConfig(schedule="warmup_cosine", warmup_fraction=percent / 100)
            assert warmup_steps(total, cfg) == total * percent // 100, (total, percent)


@pytest.mark.parametrize("final", [0.0, 0.1])
def test_warmup_linear_is_torchs_sequential_linear_then_linear(final):
    cfg = OptimConfig(lr=1.4e-3, schedule="warmup_linear", final_lr_ratio=final)
    total = 1000
    warmup = total * 5 // 100

    def reference(optimizer):
        return SequentialLR(
            optimizer,
            [
                LinearLR(optimizer, start_factor=1e-5, total_iters=warmup),
                LinearLR(optimizer, start_factor=1.0, end_factor=final, total_iters=total - warmup),
            ],
            milestones=[warmup],
        )

    ours = harness_lrs(cfg, total)
    assert max_relative_difference(ours, torch_lrs(cfg.lr, total, reference)) < 1e-11
    assert ours[-1] > 0 and ours[-1] == pytest.approx(cfg.lr * (final + (1 - final) / (total - warmup)))


def test_warmup_stable_decay_is_torchs_warmup_constant_then_linear():
    cfg = compose_config("+intervention=lr_wsd").optim
    total = 1000
    warmup, decay = total * 5 // 100, total * 20 // 100

    def reference(optimizer):
        return SequentialLR(
            optimizer,
            [
                LinearLR(optimizer, start_factor=1e-5, total_iters=warmup),
                ConstantLR(optimizer, factor=1.0, total_iters=0),
                LinearLR(optimizer, start_factor=1.0, end_factor=cfg.final_lr_ratio, total_iters=decay),
            ],
            milestones=[warmup, total - decay],
        )

    ours = harness_lrs(cfg, total)
    assert max_relative_difference(ours, torch_lrs(cfg.lr, total, reference)) < 1e-11
    assert all(x == cfg.lr for x in ours[warmup : total - decay])


def test_baseline_lr_is_constant():
    assert all(lr_factor(s, 100, OptimConfig()) == 1.0 for s in range(100))
    assert harness_lrs(OptimConfig(), 100) == [4e-4] * 100


def test_invalid_schedule_is_refused():
    with pytest.raises(ValueError, match="optim.schedule"):
        OptimConfig(schedule="cosine")
