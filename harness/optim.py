"""AdamW and the learning-rate schedules, each from a validated config."""

import math

import torch

from harness.config import OptimConfig
from harness.plugins import Plugins


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, plugins: Plugins) -> torch.optim.AdamW:
    """One parameter group, weight decay on all parameters (the seeds' baseline), unless a plugin regroups.

    The fused implementation (same update rule as the default) can skip a step on the device, which
    lets the trainer drop non-finite steps without waiting for the GPU.
    """
    groups = plugins.parameter_groups(model, [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of `cfg.lr` for the update at `step` (0-based)."""
    if cfg.schedule == "constant":
        return 1.0
    warmup_steps = int(cfg.warmup_fraction * total_steps)
    if step < warmup_steps:
        return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * step / warmup_steps
    decay_start = total_steps - int(cfg.decay_fraction * total_steps) if cfg.schedule == "wsd" else warmup_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - 1 - decay_start))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "warmup_cosine" else 1.0 - progress
    return cfg.final_lr_ratio + (1.0 - cfg.final_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig, plugins: Plugins):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: plugins.lr_factor(step, total_steps, lr_factor(step, total_steps, cfg)))
