"""A trial's initial weights: seeded, built on the CPU (so they do not depend on the device), and fingerprinted."""

import hashlib
import random

import numpy as np
import torch

from harness.config.schema import TrialConfig
from harness.trial.model import GPTModel
from harness.trial.plugins import Plugins


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_model(cfg: TrialConfig, plugins: Plugins | None = None) -> GPTModel:
    """Seed, then build on the CPU so the initial weights do not depend on the device."""
    seed_everything(cfg.seed)
    return (plugins or Plugins(cfg.plugins)).build_model(GPTModel(cfg.model))


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every named tensor of the state dict (a tied matrix appears under both names)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
