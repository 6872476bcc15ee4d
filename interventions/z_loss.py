"""z-loss (PaLM, Chowdhery et al. 2022): penalise log Z = logsumexp(logits) so the softmax normaliser
stays near 1, which keeps output logits from drifting and tends to stabilise low-precision training."""

import torch

from harness.trial.plugins import Plugin, register


@register("z_loss")
class ZLoss(Plugin):
    def __init__(self, coefficient: float = 1e-4):
        if coefficient <= 0:
            raise ValueError(f"z_loss coefficient must be positive, got {coefficient}")
        self.coefficient = coefficient

    def loss(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_z = torch.logsumexp(logits.float(), dim=-1)
        return loss + self.coefficient * log_z.square().mean()
