"""A trial's checkpoints as the train loop hands them over: the disk check before the first step, each period's
save (every rank's RNG, then rank 0's commit, pruning and pointers), and the restore a resumed trial starts from.
The files themselves are `harness.trial.checkpoint`'s."""

import json
import logging
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch

from harness import progress
from harness.config.compose import config_hash
from harness.config.schema import TrialConfig
from harness.trial import checkpoint
from harness.trial.ranks import Ranks, on_every_rank, on_main_rank

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, cfg: TrialConfig, run_dir: Path, ranks: Ranks, show_progress: bool):
        self.cfg, self.ranks, self.show_progress = cfg, ranks, show_progress
        self.directory = Path(run_dir) / "checkpoints"
        self.last: Path | None = None  # the last finite checkpoint, saved or resumed from

    def kept(self) -> str:
        """What a failed trial leaves to resume from, for its error message."""
        if self.last is None:
            return "no checkpoint was saved"
        return f"`latest` names the last finite checkpoint, {self.last}"

    def check_disk(self, model: torch.nn.Module) -> None:
        """Rank 0, before the first step: remove staging left by a killed run, print the disk the
        checkpoints need, and refuse a trial whose checkpoints cannot fit."""
        t = self.cfg.trainer
        for stale in checkpoint.clean_staging(self.directory):
            log.warning("removed %s, a checkpoint a killed run did not finish writing", stale)
        line, fits = checkpoint.disk_plan(
            self.directory, checkpoint.checkpoint_bytes(model), t.max_steps, t.checkpoint_interval, t.keep_checkpoints
        )
        log.info("%s", line)
        if not fits:
            raise checkpoint.CheckpointError(
                f"not enough disk for this trial's checkpoints: {line}. Free space, "
                f"or keep fewer checkpoints (trainer.keep_checkpoints)"
            )

    def save(
        self, step: int, is_best: bool, model: torch.nn.Module, tracker, training_state: Callable[[], dict]
    ) -> None:
        """Every rank saves its RNG state, then rank 0 commits the checkpoint (the model and `training_state()`:
        optimizer, scheduler, scaler, periods, history), prunes the old ones and logs the pointers."""
        directory, t = self.directory, self.cfg.trainer
        on_main_rank(self.ranks, lambda: checkpoint.begin(directory, step))
        try:
            on_every_rank(self.ranks, lambda: checkpoint.save_rank_rng(directory, step, self.ranks.rank))
        except BaseException:
            if self.ranks.is_main:
                shutil.rmtree(checkpoint.staging_dir(directory, step), ignore_errors=True)
            raise

        def commit() -> Path:
            state = {
                "step": step,
                "run_id": tracker.run_id,
                "config_hash": config_hash(self.cfg, self.ranks.world),
                "world_size": self.ranks.world,
                **training_state(),
            }
            started = time.perf_counter()
            with progress.Stages(f"checkpoint step_{step:06d}", checkpoint.COMMIT_PARTS, self.show_progress) as parts:
                saved = checkpoint.commit(directory, step, model, state, is_best, parts)
            size = sum(f.stat().st_size for f in saved.iterdir())
            log.info(
                "saved checkpoint %s (%s) in %.1f s",
                saved.name,
                checkpoint.format_bytes(size),
                time.perf_counter() - started,
            )
            for path in checkpoint.prune(directory, t.keep_checkpoints, t.checkpoint_interval):
                log.info("removed %s (trainer.keep_checkpoints=%s)", path.name, t.keep_checkpoints)
            best = checkpoint.resolve(directory, "best")  # None while no period was best (all non-finite)
            pointers = {
                "host": socket.gethostname(),
                "latest": str(saved.resolve()),
                "best": str(best.resolve()) if best else None,
            }
            tracker.log_text(json.dumps(pointers, indent=1), "checkpoints.json")
            return saved

        self.last = on_main_rank(self.ranks, commit)

    def restore(self, path: Path, model: torch.nn.Module, optimizer, scheduler, scaler) -> dict:
        """Load the checkpoint at `path` into the model, optimizer, scheduler, scaler and this process's RNGs;
        returns its state (step, run_id, periods, history). A checkpoint of another config is refused."""
        state = checkpoint.load(path, model, self.ranks.rank)
        if state["config_hash"] != config_hash(self.cfg, self.ranks.world):
            raise ValueError(
                f"{path} was saved by a trial with another config or another number of ranks "
                f"(config_hash {state['config_hash']}, world size {state.get('world_size', '?')})"
            )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        best_steps = [period["step"] for period in state["periods"] if period.get("is_best")]
        on_main_rank(self.ranks, lambda: checkpoint.repoint_best(self.directory, best_steps))
        self.last = path
        return state
