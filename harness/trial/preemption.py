"""Preemption: SIGTERM or the configured `trainer.preempt_signal` asks the trial to stop at the next step
boundary, where it checkpoints, marks its run preempted and exits with 128 + the signal; docs/cluster.md.

The handler only sets a flag, so a signal never lands inside a half-written checkpoint. Under submitit the
signal that submitit handles itself (its timeout signal) is passed on to submitit once the checkpoint is saved:
submitit then requeues the job, and the requeued trial resumes the preempted run."""

import contextlib
import logging
import os
import signal
import time

from harness.tracking.liveness import REASON_TAG

log = logging.getLogger(__name__)

PREEMPTED_TAG = "preempted"  # on the run: the step it reached; removed when it resumes
RESUMES_TAG = "resumes_from"  # on the run: the checkpoint its next execution continues from
PREEMPTIONS_TAG = "preemptions"  # on the run: how many times it was preempted
RESUMED_TAG = "resumed_from"  # on the run: the checkpoint its latest execution continued from
RESUMED_AT_TAG = "resumed_at"  # on the run: when (epoch seconds) it was last resumed

_requested: list[int] = []  # the signals received since the flag was cleared
_passed_on: dict[int, object] = {}  # signal -> the handler ours replaced, to run once the checkpoint is saved


class Preempted(BaseException):
    """The trial stopped at a step boundary after a preemption signal, its checkpoint saved. Like Ctrl-C it
    is no failure: it stops a study run in this process too, and Hydra's launchers do not record it as one."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"preempted by {signal.Signals(signum).name} at step {step}; resumes from {checkpoint}")


def signal_number(name: str) -> int:
    """`USR1`, `SIGUSR1` or `TERM` as a signal number."""
    name = name.upper()
    return int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))


def install(preempt_signal: str) -> None:
    """Make SIGTERM, `preempt_signal` and the signal submitit requeues on request a stop at the next step
    boundary (Ctrl-C stays an interruption). Submitit's requeueing handler is kept, to run after the checkpoint."""
    _requested.clear()
    signals = [signal.SIGTERM, signal_number(preempt_signal)]
    signals += [s for s in (signal.SIGUSR1, signal.SIGUSR2) if is_submitit_requeue(signal.getsignal(s))]
    for signum in dict.fromkeys(signals):
        previous = signal.signal(signum, _request_stop)
        if is_submitit_requeue(previous):
            _passed_on[signum] = previous


def is_submitit_requeue(handler) -> bool:
    return getattr(handler, "__name__", "") == "checkpoint_and_try_requeue" and "submitit" in handler.__module__


def _request_stop(signum, frame) -> None:
    _requested.append(signum)


def requested() -> int | None:
    """The first preemption signal received, or None."""
    return _requested[0] if _requested else None


def agreed(world: int, device) -> int | None:
    """The preemption signal any rank received (all ranks must stop at the same step), or None."""
    if world == 1:
        return requested()
    import torch
    import torch.distributed as dist

    flag = torch.tensor([requested() or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def exit_status(error: BaseException) -> int:
    """What `python -m harness` exits with after a trial stopped by a signal: 128 + the signal, as if killed by it."""
    return 128 + (error.signum if isinstance(error, Preempted) else signal.SIGINT)


def pass_on(signum: int) -> None:
    """After the checkpoint: let submitit's own handler for `signum` requeue the job (it exits the process)."""
    handler = _passed_on.get(signum)
    if handler is None:
        return
    log.info("passing %s on to submitit, which requeues the job", signal.Signals(signum).name)
    signal.signal(signum, handler)
    with contextlib.suppress(ProcessLookupError):
        os.kill(os.getpid(), signum)


def preempted_tags(stopped: Preempted, tracker) -> dict[str, str]:
    """The tags a preempted run ends with: why it stopped, the step it reached, where it resumes."""
    return {
        REASON_TAG: str(stopped),
        PREEMPTED_TAG: str(stopped.step),
        RESUMES_TAG: stopped.checkpoint,
        PREEMPTIONS_TAG: str(int(_run_tags(tracker).get(PREEMPTIONS_TAG, "0")) + 1),
    }


def record_resume(tracker, checkpoint_name: str) -> None:
    """Mark the run resumed from `checkpoint_name` (the study's table shows it); drop how it ended before."""
    tags = _run_tags(tracker)
    for key in (REASON_TAG, PREEMPTED_TAG, RESUMES_TAG):
        if key in tags:
            tracker.client.delete_tag(tracker.run_id, key)
    tracker.set_tags({RESUMED_TAG: checkpoint_name, RESUMED_AT_TAG: f"{time.time():.3f}"})


def _run_tags(tracker) -> dict[str, str]:
    if getattr(tracker, "client", None) is None or tracker.run_id is None:  # ranks other than 0 record nothing
        return {}
    return tracker.client.get_run(tracker.run_id).data.tags
