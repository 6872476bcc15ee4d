"""AdamW and the learning-rate schedules, each from a validated config."""

import math
from fractions import Fraction

import torch

from harness.config.schema import OptimConfig
from harness.trial.plugins import Plugins


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, plugins: Plugins) -> torch.optim.AdamW:
    """One parameter group, weight decay on all parameters (the seeds' baseline), unless a plugin regroups.

    The fused implementation (same update rule as the default) can skip a step on the device, which
    lets the trainer drop non-finite steps without waiting for the GPU.
    """
    groups = plugins.parameter_groups(model, [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def whole_steps(fraction: float, total_steps: int) -> int:
    """floor(fraction × total_steps) of the fraction as written (0.05 is 5/100), so 5% of 33,165 steps is
    33,165 × 5 // 100 = 1,658 exactly as the reference code computes it, free of binary rounding."""
    return math.floor(Fraction(repr(fraction)) * total_steps)


def warmup_steps(total_steps: int, cfg: OptimConfig) -> int:
    return whole_steps(cfg.warmup_fraction, total_steps)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of `cfg.lr` for the update at `step` (0-based), in closed form.

    The same schedule as torch's `SequentialLR` of `LinearLR(start_factor, total_iters=warmup)` then
    `CosineAnnealingLR(T_max=total − warmup, eta_min=lr × final_lr_ratio)` (warmup_cosine, the seeds'
    lr_schedule), or a `LinearLR` decay (warmup_linear; wsd after a constant plateau): the decay spans
    total − start steps, so it reaches the final ratio one step after the last, as the reference's did.
    """
    if cfg.schedule == "constant":
        return 1.0
    warmup = warmup_steps(total_steps, cfg)
    if step < warmup:
        return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * step / warmup
    decay_start = total_steps - whole_steps(cfg.decay_fraction, total_steps) if cfg.schedule == "wsd" else warmup
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / (total_steps - decay_start)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "warmup_cosine" else 1.0 - progress
    return cfg.final_lr_ratio + (1.0 - cfg.final_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig, plugins: Plugins):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: plugins.lr_factor(step, total_steps, lr_factor(step, total_steps, cfg))
    )
