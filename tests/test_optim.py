import pytest
import torch

from harness.optim import OptimConfig, build_scheduler, lr_factor
from harness.plugins import Plugins
from tests.conftest import compose_config


def test_lr_schedule_at_the_seeds_step_count():
    cfg = compose_config("scale=gpt2_small", "+intervention=lr_schedule")
    total = cfg.trainer.max_steps
    assert total == 33_165 and int(cfg.optim.warmup_fraction * total) == 1_658
    lr = lambda step: cfg.optim.lr * lr_factor(step, total, cfg.optim)  # noqa: E731
    assert lr(0) == pytest.approx(1.4e-8)  # peak × start factor 1e-5
    assert lr(1_657) < lr(1_658) == pytest.approx(1.4e-3)  # warmup ends at the peak
    assert lr(1_659) < 1.4e-3
    assert lr(total - 1) == pytest.approx(1.4e-4)  # cosine reaches peak/10 at the last step
    assert all(lr(s) >= lr(s + 1) for s in range(1_658, total - 1, 97))


def test_baseline_lr_is_constant_and_scheduler_follows_the_factor():
    cfg = OptimConfig(lr=1.4e-3, schedule="warmup_cosine")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, 100, cfg, Plugins({}))
    seen = []
    for _ in range(100):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(1.4e-8) and seen[5] == pytest.approx(1.4e-3) and seen[99] == pytest.approx(1.4e-4)
    assert all(lr_factor(s, 100, OptimConfig()) == 1.0 for s in range(100))


def test_invalid_schedule_is_refused():
    with pytest.raises(ValueError, match="optim.schedule"):
        OptimConfig(schedule="cosine")


def schedule_of(intervention: str, total: int = 1000):
    cfg = compose_config(f"+intervention={intervention}").optim
    return [cfg.lr * lr_factor(step, total, cfg) for step in range(total)]


def test_linear_to_zero_schedule():
    lr = schedule_of("lr_linear_to_zero")
    assert lr[0] == pytest.approx(1.4e-8) and lr[50] == pytest.approx(1.4e-3)
    assert lr[999] == 0.0 and lr[50 + 949 // 2] == pytest.approx(0.7e-3, rel=2e-3)
    assert all(a >= b for a, b in zip(lr[50:], lr[51:]))


def test_warmup_stable_decay_schedule():
    lr = schedule_of("lr_wsd")
    assert lr[0] == pytest.approx(1.4e-8)
    assert all(x == pytest.approx(1.4e-3) for x in lr[50:800])  # plateau until the last 20%
    assert lr[801] < 1.4e-3 and lr[999] == 0.0
    assert all(a >= b for a, b in zip(lr[800:], lr[801:]))
