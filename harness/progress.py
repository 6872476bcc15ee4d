"""What long work shows in the terminal: the training bar, short bars for the test evaluation and checkpoint
writing, and lines (log records, warnings, a study's progress) printed through the bars rather than over them.

On a terminal every line a trial or a study prints while a bar is drawn goes through tqdm: the bars are
cleared, the line is written (and flushed, since stdout and stderr may be one file), the bars are drawn again,
so no stale copy of a bar is left above a line. Off a terminal (a log file, a SLURM job) the training bar is
redrawn at most every NON_TTY_INTERVAL seconds and the short bars are left out. tqdm's own `TQDM_*`
environment variables (e.g. `TQDM_MININTERVAL`) tune the bars on a terminal. This module imports no torch.
"""

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import TextIO

from tqdm import tqdm

NON_TTY_INTERVAL = 30.0  # seconds between redraws of the training bar in a log file


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


def training_bar(total: int, initial: int = 0, enabled: bool = True) -> tqdm:
    """The trial's bar: steps done of `total`; its postfix (loss, tokens/s) is set when values are read back."""
    throttle = {} if is_terminal() else {"mininterval": NON_TTY_INTERVAL}
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, **throttle)


def short_bar(
    items: Iterable = None, total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True
) -> tqdm:
    """A bar for a few seconds of work (the test evaluation, a checkpoint), drawn below the training bar and
    removed when done; only on a terminal."""
    return tqdm(
        items,
        total=total,
        desc=desc,
        unit=unit,
        leave=False,
        dynamic_ncols=True,
        disable=not (enabled and is_terminal()),
    )


class Stages:
    """A short bar over the named parts of one piece of work: `stages(name)` says that `name` starts now."""

    def __init__(self, desc: str, total: int, enabled: bool = True):
        self.bar = short_bar(total=total, desc=desc, unit="part", enabled=enabled)
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(name)

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def write_line(text: str, file: TextIO | None = None) -> None:
    """Print a line through any bars on the terminal (from any thread); a plain print when none is drawn."""
    file = sys.stdout if file is None else file
    with tqdm.external_write_mode(file=file):
        file.write(text + "\n")
        file.flush()


class _ThroughBars(logging.Handler):
    """Hands each record to the console handler it replaces, with the bars cleared around the write."""

    def __init__(self, console: logging.StreamHandler):
        super().__init__(console.level)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        with tqdm.external_write_mode(file=self.console.stream):
            self.console.handle(record)  # its own filters, format and flush


def _is_console(handler: logging.Handler) -> bool:
    return type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr)


@contextlib.contextmanager
def through_bars(enabled: bool = True) -> Iterator[None]:
    """While bars are drawn: every logger's console handler (the root's, Hydra's, MLflow's) and Python's
    warnings print through them. Files and other handlers are left as they are."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    replaced = []
    for logger in loggers:
        for index, handler in enumerate(logger.handlers):
            if _is_console(handler):
                logger.handlers[index] = _ThroughBars(handler)
                replaced.append((logger, index, handler))
    show_warning = warnings.showwarning

    def warn_through_bars(message, category, filename, lineno, file=None, line=None):
        write_line(
            warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"),
            file if file is not None else sys.stderr,
        )

    warnings.showwarning = warn_through_bars
    try:
        yield
    finally:
        warnings.showwarning = show_warning
        for logger, index, handler in replaced:
            if index < len(logger.handlers) and isinstance(logger.handlers[index], _ThroughBars):
                logger.handlers[index] = handler


def study_line(
    study: str,
    total: int,
    done: int,
    running: int,
    elsewhere: int,
    ended: dict[str, int],
    elapsed: float,
    preempted: int = 0,
) -> str:
    """`[study NAME] trial k of N: … | elapsed …, ETA …`; `ended` counts the finished trials by status, `preempted`
    the trials stopped by a preemption that a requeued job resumes (not done)."""
    if total == 0:
        return f"[study {study}] no trial to run: every trial of the study FINISHED in an earlier execution"
    eta = format_duration(elapsed / done * (total - done)) if done else "after the first trial"
    statuses = " (" + ", ".join(f"{n} {s}" for s, n in sorted(ended.items())) + ")" if done else ""
    where = (
        f"all {total} trials done{statuses}"
        if done == total
        else f"trial {done + 1} of {total}: {done} done{statuses}, {running} running"
        + (f", {preempted} preempted (its requeued job, or the next execution, resumes it)" if preempted else "")
        + (f", {elsewhere} running in another execution" if elsewhere else "")
    )
    return f"[study {study}] {where} | elapsed {format_duration(elapsed)}, ETA {eta}"


def trial_start_line(
    name: str, interventions: str, seeds: dict[str, object], scale: str, steps: int, study: str | None, url: str
) -> str:
    """`[trial NAME] starts: intervention …; seed …; scale …, N steps; study …; in mlflow ui: URL`."""
    seeds_text = ", ".join(f"{key} {'none' if value is None else value}" for key, value in seeds.items())
    in_study = f"; study {study}" if study else ""
    return (
        f"[trial {name}] starts: intervention {interventions}; {seeds_text}; scale {scale}, {steps} steps"
        f"{in_study}; in mlflow ui: {url}"
    )


def trial_end_line(name: str, test_loss: float, train_seconds: float, standing: str) -> str:
    """`[trial NAME] FINISHED: test loss X after S of training; STANDING` (for a study: where it stands)."""
    return f"[trial {name}] FINISHED: test loss {test_loss:.6f} after {format_duration(train_seconds)} of training; {standing}"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
