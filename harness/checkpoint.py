"""Atomic checkpoints: `step_NNNNNN/` directories plus `latest` and `best` pointer files.

A checkpoint is written into a temporary directory and renamed into place, and a pointer is replaced
atomically after it, so a crash at any moment leaves every pointer naming a whole checkpoint.
"""

import json
import os
import random
import shutil
import zipfile
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


def staging_dir(directory: Path, step: int) -> Path:
    return Path(directory) / f".step_{step:06d}.tmp"


def begin(directory: Path, step: int) -> Path:
    """Rank 0: an empty staging directory that every rank then writes its RNG state into."""
    tmp = staging_dir(directory, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_rank_rng(directory: Path, step: int, rank: int) -> None:
    torch.save(rng_state(), staging_dir(directory, step) / f"rng_rank{rank}.pt")


def commit(directory: Path, step: int, model: torch.nn.Module, state: dict, is_best: bool) -> Path:
    """Rank 0: add weights and state, rename into `step_<step>/`, then point `latest` (and `best`) at it."""
    tmp = staging_dir(directory, step)
    save_model(model, str(tmp / MODEL_FILE))  # stores a tied matrix once
    torch.save(state, tmp / STATE_FILE)
    final = Path(directory) / f"step_{step:06d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _point(Path(directory) / "latest", final.name)
    if is_best:
        _point(Path(directory) / "best", final.name)
    return final


def _point(pointer: Path, target: str) -> None:
    tmp = pointer.with_name(pointer.name + ".tmp")
    tmp.write_text(target + "\n")
    os.replace(tmp, pointer)


def resolve(directory: Path, which: str = "latest") -> Optional[Path]:
    pointer = Path(directory) / which
    return Path(directory) / pointer.read_text().strip() if pointer.exists() else None


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as saved; the message names the file."""


def damaged_files(checkpoint: Path) -> list[str]:
    """What is wrong with each file of the checkpoint (missing, truncated, not its format), read without loading it."""
    checkpoint = Path(checkpoint)
    problems = [_safetensors_problem(checkpoint / MODEL_FILE)]
    problems += [_zip_problem(path) for path in [checkpoint / STATE_FILE, *sorted(checkpoint.glob("rng_rank*.pt"))]]
    return [problem for problem in problems if problem]


def require_intact(checkpoint: Path) -> None:
    problems = damaged_files(checkpoint)
    if problems:
        raise CheckpointError("; ".join(problems))


def _safetensors_problem(path: Path) -> Optional[str]:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors it lists, up to the last byte."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_bytes = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_bytes)) if 8 + header_bytes <= size else None
    except (OSError, ValueError):
        header = None
    tensors = [entry for name, entry in header.items() if name != "__metadata__"] if isinstance(header, dict) else None
    if tensors is None or not all(isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2
                                  for entry in tensors):
        return f"{path} is not a readable safetensors file (its header is cut off or damaged)"
    end = max((entry["data_offsets"][1] for entry in tensors), default=0)
    if size != 8 + header_bytes + end:
        return f"{path} is truncated or damaged: {size:,} bytes where its header needs {8 + header_bytes + end:,}"
    return None


def _zip_problem(path: Path) -> Optional[str]:
    """torch.save writes a zip archive, whose directory is at its end: a cut-off file has none."""
    if not path.is_file():
        return f"{path} is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"{path} is truncated or damaged ({error})"
    return None


def load(checkpoint: Path, model: torch.nn.Module, rank: int = 0) -> dict:
    """Weights into `model`; returns the trial state with this rank's RNG state under "rng"."""
    require_intact(checkpoint)
    load_model(model, str(checkpoint / MODEL_FILE))
    state = torch.load(checkpoint / STATE_FILE, weights_only=False, map_location="cpu")
    rng_file = checkpoint / f"rng_rank{rank}.pt"
    if not rng_file.exists():
        raise FileNotFoundError(f"{checkpoint} has no RNG state for rank {rank}: was it saved with fewer ranks?")
    state["rng"] = torch.load(rng_file, weights_only=False, map_location="cpu")
    return state


def find(path: Path, which: Optional[str] = None) -> Path:
    """`path` itself if it is a checkpoint, else the `which` (default latest) checkpoint of a run directory
    or of its `checkpoints/` directory."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        if which:
            raise ValueError(f"{path} is one checkpoint; `{which}` picks a checkpoint of a run directory")
        return path
    which = which or "latest"
    for directory in (path / "checkpoints", path):
        if (directory / which).is_file():
            found = resolve(directory, which)
            if not (found / MODEL_FILE).is_file():
                raise FileNotFoundError(f"{directory / which} points at {found}, which holds no {MODEL_FILE}")
            return found
    raise FileNotFoundError(f"no `{which}` checkpoint in {path}: expected a run directory with "
                            f"checkpoints/{which}, or a step_NNNNNN checkpoint directory")
