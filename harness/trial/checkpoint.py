"""Checkpoints: `step_NNNNNN/` directories, each with a sha256 manifest, plus `latest` and `best` pointer files.

A checkpoint is written into a staging directory `.step_NNNNNN.tmp/`: every file and then the directory are
fsynced, the directory is renamed into place and its parent fsynced, and only then are the pointers replaced
(each fsynced the same way). A crash or a full disk at any moment leaves every pointer naming a whole,
verifiable checkpoint. `manifest.json` records the sha256 and size of every file; `verify` checks them before
anything is loaded, so a flipped bit is an error naming the file, never a silently different trial.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import socket
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from harness.trial.disk import checkpoint_size, format_bytes, kept_at_most, retention  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
STEP_DIR = re.compile(r"step_(\d+)")
STAGING_DIR = re.compile(r"\.step_\d+\.tmp")
POINTERS = ("latest", "best")


class CheckpointError(ValueError):
    """A checkpoint that could not be written, or cannot be read as saved; the message names the file."""


def rng_state() -> dict:
    """Every RNG's state as tensors and primitives only, so that it loads with `weights_only=True`."""
    version, words, gauss = random.getstate()
    numpy = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "bit_generator": numpy["bit_generator"],
            "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
            "pos": int(numpy["state"]["pos"]),
            "has_gauss": int(numpy["has_gauss"]),
            "gauss": float(numpy["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    np.random.set_state(
        {
            "bit_generator": numpy["bit_generator"],
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def staging_dir(directory: Path, step: int) -> Path:
    return Path(directory) / f".step_{step:06d}.tmp"


def step_dir(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:06d}"


# --- writing ----------------------------------------------------------------------------------------


def begin(directory: Path, step: int) -> Path:
    """Rank 0: an empty staging directory that every rank then writes its RNG state into."""
    tmp = staging_dir(directory, step)
    shutil.rmtree(tmp, ignore_errors=True)
    with _writing(directory, step, tmp):
        tmp.mkdir(parents=True)
    return tmp


def save_rank_rng(directory: Path, step: int, rank: int) -> None:
    _save_torch(rng_state(), staging_dir(directory, step) / f"rng_rank{rank}.pt", directory, step)


COMMIT_PARTS = 4  # what `commit` reports through `starting`: weights, state, manifest, pointers


def commit(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    state: dict,
    is_best: bool,
    starting: Callable[[str], None] = lambda part: None,
) -> Path:
    """Rank 0: add weights, state and manifest, rename into `step_NNNNNN/`, then point `latest` (and `best`)
    at it; `starting(part)` is called as each of the COMMIT_PARTS begins (for a progress bar). On any failure
    (a full disk included) the staging directory is removed and the pointers are as they were."""
    directory, tmp, final = Path(directory), staging_dir(directory, step), step_dir(directory, step)
    try:
        starting(MODEL_FILE)
        with _writing(directory, step, tmp / MODEL_FILE):
            save_model(model, str(tmp / MODEL_FILE))  # stores a tied matrix once
            _fsync_file(tmp / MODEL_FILE)
        starting(STATE_FILE)
        _save_torch(state, tmp / STATE_FILE, directory, step)
        starting(f"{MANIFEST_FILE} (sha256)")
        files = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        manifest = {
            "step": step,
            "run_id": state.get("run_id"),
            "config_hash": state.get("config_hash"),
            "world_size": state.get("world_size"),
            "files": files,
        }
        with _writing(directory, step, tmp / MANIFEST_FILE):
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
            _fsync_file(tmp / MANIFEST_FILE)
            _fsync_dir(tmp)
        starting("pointers")
        shutil.rmtree(final, ignore_errors=True)  # a copy the pointers never reached (killed before them)
        os.replace(tmp, final)
        _fsync_dir(directory)
        for pointer in ("latest", "best") if is_best else ("latest",):
            with _writing(directory, step, directory / pointer):
                _point(directory / pointer, final.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists() and resolve(directory, "latest") != final:  # renamed, but no pointer reached it
            shutil.rmtree(final, ignore_errors=True)
        raise
    return final


class _KeepsError:
    """A file wrapper that remembers what interrupted a write, a full disk's OSError or Ctrl-C's
    KeyboardInterrupt: torch.save reports either as an opaque 'unexpected pos' RuntimeError."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        return self._call(self.file.write, data)

    def flush(self) -> None:
        self._call(self.file.flush)

    def _call(self, method, *args):
        try:
            return method(*args)
        except (OSError, KeyboardInterrupt) as error:
            self.error = error
            raise


def _save_torch(obj, path: Path, directory: Path, step: int) -> None:
    with _writing(directory, step, path), open(path, "wb") as raw:
        file = _KeepsError(raw)
        try:
            torch.save(obj, file)
            file.flush()
        except Exception as error:
            if file.error is None or file.error is error:
                raise
            raise file.error from error
        os.fsync(raw.fileno())


@contextlib.contextmanager
def _writing(directory: Path, step: int, path: Path):
    """Turns a full disk into a CheckpointError that says so and what is still intact."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _disk_full(directory, step, path) from error
    except Exception as error:  # safetensors reports the OS error in its message
        if "os error 28" not in str(error) and "No space left on device" not in str(error):
            raise
        raise _disk_full(directory, step, path) from error


def _disk_full(directory: Path, step: int, path: Path) -> CheckpointError:
    latest = resolve(directory, "latest")
    kept = f"`latest` still names {latest.name}" if latest else "no earlier checkpoint exists"
    free = shutil.disk_usage(existing_parent(directory)).free
    return CheckpointError(
        f"no space left on the device writing {path.name} of checkpoint step {step} in "
        f"{directory} ({format_bytes(free)} free): {kept}; the partial checkpoint is removed"
    )


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _point(pointer: Path, target: str) -> None:
    tmp = pointer.with_name(pointer.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(target + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, pointer)
    _fsync_dir(pointer.parent)


def repoint_best(directory: Path, best_steps: list[int]) -> None:
    """After a resume: point `best` at the newest checkpoint on disk among `best_steps` (the best periods up to the
    resumed step), as an uninterrupted trial's is; a kill between `commit`'s two pointer writes leaves it behind."""
    on_disk = [step_dir(directory, step) for step in best_steps if step_dir(directory, step).is_dir()]
    if on_disk and resolve(directory, "best") != on_disk[-1]:
        _point(Path(directory) / "best", on_disk[-1].name)


# --- retention and cleaning ---------------------------------------------------------------------------


def prune(directory: Path, keep_every: int | None, interval: int) -> list[Path]:
    """Delete the checkpoints no pointer names, except every `keep_every`-th: checkpoints are written after steps
    1, interval+1, 2·interval+1, … (and the last), and the K-th kept ones are those after steps 1,
    K·interval+1, 2K·interval+1, …. `keep_every=None` keeps everything."""
    if keep_every is None:
        return []
    keep = {p.name for p in (resolve(directory, which) for which in POINTERS) if p is not None}
    removed = []
    for path in sorted(Path(directory).iterdir()):
        match = STEP_DIR.fullmatch(path.name)
        if not match or path.name in keep or (keep_every and (int(match[1]) - 1) % (keep_every * interval) == 0):
            continue
        shutil.rmtree(path)
        removed.append(path)
    if removed:
        _fsync_dir(directory)
    return removed


def clean_staging(directory: Path) -> list[Path]:
    """Remove staging directories left by a trial that died while writing a checkpoint."""
    directory = Path(directory)
    stale = [p for p in directory.iterdir() if STAGING_DIR.fullmatch(p.name)] if directory.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    for pointer in POINTERS:
        Path(directory, pointer + ".tmp").unlink(missing_ok=True)
    return stale


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About what one checkpoint takes: the weights (a tied matrix once) and AdamW's two moments of each."""
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return checkpoint_size(sum(unique.values()))


def disk_plan(
    directory: Path, per_checkpoint: int, max_steps: int, interval: int, keep_every: int | None
) -> tuple[str, bool]:
    """A line saying how much disk the trial's checkpoints need and have, and whether they fit."""
    directory = Path(directory)
    existing = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) if directory.is_dir() else 0
    count = kept_at_most(max_steps, interval, keep_every)
    needed = max(0, count * per_checkpoint - existing)
    probe = existing_parent(directory)
    free = shutil.disk_usage(probe).free
    line = (
        f"checkpoints: ~{format_bytes(per_checkpoint)} each; keeping {retention(keep_every)} "
        f"(trainer.keep_checkpoints), up to {count} on disk at once: {format_bytes(needed)} more needed, "
        f"{format_bytes(free)} free in {probe}"
    )
    return line, free >= needed


def existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    return path if path.exists() else next(p for p in path.parents if p.exists())


# --- reading ------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(checkpoint: Path) -> dict | None:
    path = Path(checkpoint) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        manifest["files"].items()
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path} is not a readable checkpoint manifest ({error})") from None
    return manifest


def verify(checkpoint: Path) -> dict | None:
    """Check every file against the manifest; returns the manifest (None for a checkpoint saved before
    manifests existed, with a warning)."""
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)
    if manifest is None:
        log.warning("%s has no %s (saved by an older harness): its files cannot be verified", checkpoint, MANIFEST_FILE)
        return None
    for name, expected in manifest["files"].items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        if path.stat().st_size != expected["bytes"] or sha256(path) != expected["sha256"]:
            raise CheckpointError(
                f"{path} does not match the sha256 in {checkpoint / MANIFEST_FILE}: the file is "
                f"corrupt (changed on disk or copied partially); use another checkpoint"
            )
    return manifest


def resolve(directory: Path, which: str = "latest") -> Path | None:
    """The checkpoint a pointer names: always a `step_NNNNNN` directory of `directory` itself (None: no pointer)."""
    pointer = Path(directory) / which
    if not pointer.exists():
        return None
    target = pointer.read_text().strip()
    if not STEP_DIR.fullmatch(target):
        raise CheckpointError(
            f"{pointer} names {target[:200]!r}: a pointer must name a step_NNNNNN checkpoint inside {directory} "
            f"(its own run's); write the name of one of that folder's checkpoints into it"
        )
    return Path(directory) / target


RUN_ID_FILE = "mlflow_run_id"  # in the run directory: the MLflow run its checkpoints belong to
LOCK_FILE = ".resume.lock"
_HELD_LOCKS: dict[Path, object] = {}


def foreign_run(found: Path, run_dir: Path) -> str | None:
    """Why the checkpoint `found` does not belong to the run of `run_dir` (its manifest names another run than
    the run directory's record or its other checkpoints do), else None."""
    own = read_manifest(found)
    if own is None or own.get("run_id") is None:
        return None
    recorded = Path(run_dir) / RUN_ID_FILE
    if recorded.is_file() and recorded.read_text().strip() != own["run_id"]:
        return f"{found} belongs to MLflow run {own['run_id']}, but {run_dir} is the directory of run " + (
            f"{recorded.read_text().strip()} ({recorded}); resume a run from its own checkpoints only"
        )
    for other in sorted(found.parent.glob("step_*")):
        manifest = read_manifest(other) if other != found else None
        if manifest is not None and manifest.get("run_id") not in (None, own["run_id"]):
            return (
                f"{found} belongs to MLflow run {own['run_id']}, but {other} of the same folder to run "
                f"{manifest['run_id']}; resume a run from its own checkpoints only"
            )
    return None


def hold_run_lock(run_dir: Path) -> str | None:
    """Lock the run directory for this process's life (a resume is exclusive); a line naming the holder when another
    process holds it, else None."""
    path = (Path(run_dir) / LOCK_FILE).resolve()
    if path in _HELD_LOCKS:
        return None
    file = open(path, "a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held = _held_by(run_dir, path, file)
        file.close()
        return held
    file.seek(0)
    file.truncate()
    file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    file.flush()
    _HELD_LOCKS[path] = file
    return None


def run_lock_holder(run_dir: Path) -> str | None:
    """The line `hold_run_lock` would return, without taking the lock: a resume's checks refuse at once, before they
    read checkpoints that the running resume may be pruning."""
    path = (Path(run_dir) / LOCK_FILE).resolve()
    if path in _HELD_LOCKS or not path.is_file():
        return None
    with open(path) as file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released as the file closes
        except BlockingIOError:
            return _held_by(run_dir, path, file)
    return None


def _held_by(run_dir: Path, path: Path, file) -> str:
    file.seek(0)
    holder = file.read().strip() or "another process"
    return f"{run_dir} is being resumed by {holder} (it holds {path}); wait for it to end"


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


def _safetensors_problem(path: Path) -> str | None:
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
    if tensors is None or not all(
        isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2 for entry in tensors
    ):
        return f"{path} is not a readable safetensors file (its header is cut off or damaged)"
    end = max((entry["data_offsets"][1] for entry in tensors), default=0)
    if size != 8 + header_bytes + end:
        return f"{path} is truncated or damaged: {size:,} bytes where its header needs {8 + header_bytes + end:,}"
    return None


def _zip_problem(path: Path) -> str | None:
    """torch.save writes a zip archive, whose directory is at its end: a cut-off file has none."""
    if not path.is_file():
        return f"{path} is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"{path} is truncated or damaged ({error})"
    return None


def load_plain(path: Path, mmap: bool = False) -> dict:
    """A torch file read as plain data only (tensors, numbers, strings, lists, dicts): `weights_only=True` never
    runs code a file carries. A file holding anything else is refused, naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = str(error).split("\n")[0].strip()[:200]
        raise CheckpointError(
            f"{path} holds more than plain data ({found}), so it is not loaded: a file from another "
            f"source can run code when unpickled; a checkpoint saved by a harness before RNG state was "
            f"stored as tensors can be converted once, only if you trust where it came from, with "
            f"`python -m harness.trial.convert {Path(path).parent}`"
        ) from None


def run_id(found: Path) -> str:
    """The MLflow run a checkpoint belongs to (from its manifest; from its state for one saved before manifests)."""
    manifest = read_manifest(found)
    if manifest is not None:
        return manifest["run_id"]
    return load_plain(found / STATE_FILE, mmap=True)["run_id"]


def load(checkpoint: Path, model: torch.nn.Module, rank: int = 0) -> dict:
    """Check, then load the weights into `model`; returns the trial state with this rank's RNG state under "rng"."""
    require_intact(checkpoint)
    verify(checkpoint)
    state = load_plain(checkpoint / STATE_FILE)
    rng_file = checkpoint / f"rng_rank{rank}.pt"
    if not rng_file.exists():
        raise FileNotFoundError(f"{checkpoint} has no RNG state for rank {rank}: was it saved with fewer ranks?")
    state["rng"] = load_plain(rng_file)
    load_model(model, str(checkpoint / MODEL_FILE))
    return state


def check_plain(found: Path) -> None:
    """Verify the checkpoint against its manifest and read each torch file's structure as plain data (the tensors'
    bytes stay on disk); raises a CheckpointError naming the first file that fails."""
    verify(found)
    for path in [found / STATE_FILE, *sorted(found.glob("rng_rank*.pt"))]:
        load_plain(path, mmap=True)


def find(path: Path, which: str | None = None) -> Path:
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
    raise FileNotFoundError(
        f"no `{which}` checkpoint in {path}: expected a run directory with "
        f"checkpoints/{which}, or a step_NNNNNN checkpoint directory"
    )
