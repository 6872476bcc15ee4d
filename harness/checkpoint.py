"""Atomic checkpoints: `step_NNNNNN/` directories plus `latest` and `best` pointer files.

A checkpoint is written into a temporary directory and renamed into place, and a pointer is replaced
atomically after it, so a crash at any moment leaves every pointer naming a whole checkpoint.
"""

import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_model, save_model

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: Path, step: int, model: torch.nn.Module, state: dict, is_best: bool) -> Path:
    """Write `step_<step>/` (model weights + `state`), then point `latest` (and `best`) at it."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:06d}"
    tmp = directory / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))  # stores a tied matrix once
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _point(directory / "latest", final.name)
    if is_best:
        _point(directory / "best", final.name)
    return final


def _point(pointer: Path, target: str) -> None:
    tmp = pointer.with_name(pointer.name + ".tmp")
    tmp.write_text(target + "\n")
    os.replace(tmp, pointer)


def resolve(directory: Path, which: str = "latest") -> Optional[Path]:
    pointer = Path(directory) / which
    return Path(directory) / pointer.read_text().strip() if pointer.exists() else None


def load(checkpoint: Path, model: torch.nn.Module) -> dict:
    load_model(model, str(checkpoint / MODEL_FILE))
    return torch.load(checkpoint / STATE_FILE, weights_only=False)
