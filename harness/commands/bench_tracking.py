"""What tracking costs a training step: `python -m harness bench-tracking [steps=30] [repeats=3] [warmup=3]
[TRIAL OVERRIDES…]` (also `make bench-tracking`).

Trains the composed trial with the trainer's own read-back and logging, in alternating blocks of `steps`
steps: with a real Tracker (its writer thread sending to a fresh sqlite store, or to `tracking.uri`) and with
none. Prints the step time of each and their difference (on a busy machine, within the block-to-block
noise), the time the step loop itself spent inside tracker calls (queueing records: all it ever waits for),
and the CPU time of the writer thread (all it can take from the step loop's cores), per step.
"""

import os
import statistics
import tempfile
import time
from pathlib import Path

from harness.arguments import split, whole_number
from harness.commands.bench import compose_overrides
from harness.config.compose import as_dict
from harness.tracking.tracker import NullTracker, Tracker
from harness.trial.trainer import Trial
from interventions import flatten

KEYS = {"steps": 30, "repeats": 3, "warmup": 3}


class TimedCalls:
    """The tracker, with the time spent in its methods added up (on the calling thread)."""

    def __init__(self, tracker):
        self.tracker, self.seconds, self.calls = tracker, 0.0, 0

    def __getattr__(self, name):
        method = getattr(self.tracker, name)
        if not callable(method):
            return method

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        return timed


def thread_cpu_seconds(native_id: int) -> float:
    """User + system CPU time of one thread of this process (Linux), from /proc."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(arguments: list[str]) -> int:
    given = split(arguments, KEYS)
    options = {**KEYS, **{key: whole_number(key, value) for key, value in given.settings.items()}}
    overrides = given.rest
    steps, repeats, warmup = options["steps"], options["repeats"], options["warmup"]
    total = warmup + 2 * repeats * steps
    cfg = compose_overrides([*overrides, "trainer.divergence_patience=1000000"], total)
    with tempfile.TemporaryDirectory() as scratch:
        uri = cfg.tracking.uri or f"sqlite:///{Path(scratch) / 'mlflow.db'}"
        trial = Trial(cfg, Path(scratch) / "run")
        tracker = TimedCalls(Tracker(uri, "tracking-bench", heartbeat_interval=cfg.tracking.heartbeat_interval))
        tracker.start("tracking-bench", {}, flatten(as_dict(cfg)))
        writer = tracker.tracker._thread.native_id
        writer_cpu = thread_cpu_seconds(writer)
        trial.logged_steps(NullTracker(), 0, warmup)
        times = {"with": [], "without": []}
        step = warmup
        for _ in range(repeats):
            for mode in ("without", "with"):
                times[mode].append(
                    trial.logged_steps(tracker if mode == "with" else NullTracker(), step, steps) / steps
                )
                step += steps
        logged_steps = repeats * steps
        in_calls = tracker.seconds / logged_steps
        tracker.flush()
        writer_cpu = (thread_cpu_seconds(writer) - writer_cpu) / logged_steps
        tracker.end("FINISHED")
    times = {mode: [1000 * t for t in block_times] for mode, block_times in times.items()}
    with_ms, without_ms = (statistics.median(times[m]) for m in ("with", "without"))
    print(f"{cfg.scale}: {repeats} × {steps} steps each way, log_interval {cfg.tracking.log_interval}, store {uri}")
    for mode in ("without", "with"):
        print(
            f"step time {mode} tracking: {statistics.median(times[mode]):.2f} ms (median of blocks "
            f"{', '.join(f'{t:.2f}' for t in times[mode])})"
        )
    print(
        f"difference: {100 * (with_ms - without_ms) / without_ms:+.2f}% (block-to-block spread without tracking: "
        f"{100 * (max(times['without']) - min(times['without'])) / without_ms:.1f}%)"
    )
    print(
        f"step loop inside tracker calls: {1e6 * in_calls:.1f} µs per step ({tracker.calls} calls), "
        f"{100 * in_calls / (with_ms / 1000):.3f}% of the step"
    )
    print(
        f"writer thread CPU: {1e6 * writer_cpu:.1f} µs per step, {100 * writer_cpu / (with_ms / 1000):.3f}% of the step"
    )
    return 0
