"""Ranks: run a composed trial in this process, under an external torchrun, or spawn N ranks here.

The config is composed once by `python -m harness`; spawned ranks receive it resolved, never re-compose.
"""

import logging
import os
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from harness.config.schema import TrialConfig
from harness.trial import preemption
from harness.trial.preflight import check_trial
from harness.trial.ranks import Ranks, under_torchrun

log = logging.getLogger(__name__)


def launch(cfg: TrialConfig, run_dir: Path, checked: bool = False) -> dict:
    """Run the trial on `trainer.nproc_per_node` local ranks (or the ranks torchrun already started), once
    this process has checked it on this machine (`checked`: the caller did): a bad trial is refused here,
    never inside a rank."""
    if not checked:
        check_trial(cfg)
    n = cfg.trainer.nproc_per_node
    if n == 1 or under_torchrun():
        return run_rank(cfg, str(run_dir))
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=n,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.5,
    )
    log.info("spawning %d ranks", n)
    return elastic_launch(config, run_rank)(cfg, str(run_dir))[0]


def run_rank(cfg: TrialConfig, run_dir: str) -> dict:
    from harness.trial.trainer import run_trial

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    preemption.install(cfg.trainer.preempt_signal)  # SIGTERM: checkpoint at the next step, end KILLED, preempted
    set_determinism(cfg.trainer.deterministic)  # both ways: trials may share a process (Hydra's basic launcher)
    ranks = Ranks.from_env()
    if ranks.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "gloo")
    try:
        if ranks.world > 1:  # under an external torchrun every rank composed its own output dir: use rank 0's
            shared = [run_dir]
            dist.broadcast_object_list(shared, src=0)
            run_dir = shared[0]
        return run_trial(cfg, Path(run_dir), ranks)
    except preemption.Preempted as stopped:
        preemption.pass_on(stopped.signum)  # under submitit: requeue the job (it exits this process)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def set_determinism(enabled: bool) -> None:
    """Deterministic kernels everywhere (errors on ops without one); cuBLAS needs a fixed workspace."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
