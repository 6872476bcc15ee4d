"""The ranks of one trial: who this process is (`Ranks`), how it learned it (torchrun, submitit), and the two
collectives the trainer uses to run work on rank 0 or on every rank without leaving a rank waiting forever.
torch.distributed loads only where there are ranks: a study's planner imports this module without torch."""

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    @classmethod
    def from_env(cls) -> "Ranks":
        return cls(
            int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        )


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def on_main_rank(ranks: Ranks, work: Callable, share: bool = True):
    """Run `work` on rank 0 only; every rank returns its result (rank 0's, if `share`) or raises its error, so
    no rank waits forever at a collective for a rank 0 that failed."""
    result, error = None, None
    if ranks.is_main:
        try:
            result = work()
        except BaseException as caught:
            error = caught
    if ranks.world > 1:
        import torch.distributed as dist

        shared = [(result if share else None, None if error is None else f"{type(error).__name__}: {error}")]
        dist.broadcast_object_list(shared, src=0)
        if share:
            result = shared[0][0]
        message = shared[0][1]
        if message is not None and error is None:
            raise RuntimeError(f"rank 0 failed: {message}")
    if error is not None:
        raise error
    return result


def on_every_rank(ranks: Ranks, work: Callable) -> None:
    """Run `work` on every rank; if it fails on any, every rank raises."""
    error = None
    try:
        work()
    except Exception as caught:
        error = caught
    if ranks.world > 1:
        import torch.distributed as dist

        messages = [None] * ranks.world
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
        if failed and error is None:
            raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    if error is not None:
        raise error


def launcher_ranks(config: "DictConfig") -> int | None:
    """The ranks of each trial when the launcher makes every task a rank (submitit with tasks_per_node > 1),
    else None: the trial spawns trainer.nproc_per_node itself."""
    launcher = config.hydra.get("launcher") or {}
    tasks = launcher.get("tasks_per_node") or 1
    return tasks * (launcher.get("nodes") or 1) if tasks > 1 else None


def export_submitit_ranks() -> None:
    """In a submitit job with several tasks (one per GPU), each task is one rank of the trial: set the
    variables torchrun would (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        # Every GPU stays visible: the harness picks cuda:LOCAL_RANK itself.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
