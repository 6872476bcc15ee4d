"""Runs as other processes judge them: alive or dead (heartbeats), who runs a study's trial (claims), runs whose
process died (marked KILLED), and resumes that would change a record. docs/records.md states the rules."""

import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from harness.paths import default_tracking_uri
from harness.tracking.store import HEARTBEAT_INTERVAL_TAG, HEARTBEAT_TAG, connect, normalize_uri, public_uri

log = logging.getLogger(__name__)

STALE_BEATS = 4
CLAIM_SETTLE = 1.0
WITHDRAWN_TAG = "withdrawn"
REASON_TAG = "failure_reason"
DIVERGED = "DivergenceError"  # the failure_reason of a run that diverged: a result, not the machine's fault


class ClaimedElsewhere(RuntimeError):
    """Another run of the study holds this trial's computation (FINISHED, or running with a fresh heartbeat)."""


# --- heartbeats -------------------------------------------------------------------------------------------


def heartbeat(run) -> float | None:
    value = run.data.tags.get(HEARTBEAT_TAG)
    return float(value) if value else None


def stale_after(run, override: float | None = None) -> float | None:
    """Seconds of silence after which the run counts as dead; None for runs without heartbeats."""
    if override is not None:
        return override
    interval = run.data.tags.get(HEARTBEAT_INTERVAL_TAG)
    return STALE_BEATS * float(interval) if interval else None


def is_stale(run, now: float, override: float | None = None) -> bool:
    beat, limit = heartbeat(run), stale_after(run, override)
    return run.info.status == "RUNNING" and beat is not None and limit is not None and now - beat > limit


def is_live(run, now: float) -> bool:
    if run.data.tags.get(WITHDRAWN_TAG):
        return False
    if run.info.status == "FINISHED":
        return True
    return run.info.status == "RUNNING" and heartbeat(run) is not None and not is_stale(run, now)


def when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def mark_stale(client, runs: list, override: float | None = None) -> list[tuple[object, str]]:
    """End every stale run KILLED with the reason (and remove its checkpoint staging directories when its
    run directory is on this host). Returns (run, reason) for each."""
    marked, now = [], time.time()
    for run in runs:
        if not is_stale(run, now, override):
            continue
        beat = heartbeat(run)
        reason = (
            f"its process died or lost the store: no heartbeat since {when(beat)} ({now - beat:.0f} s; "
            f"heartbeat every {run.data.tags.get(HEARTBEAT_INTERVAL_TAG)} s); marked KILLED by "
            f"{socket.gethostname()} pid {os.getpid()}"
        )
        client.set_tag(run.info.run_id, REASON_TAG, reason)
        client.set_terminated(run.info.run_id, "KILLED", int(beat * 1000))
        marked.append((run, reason))
        run_dir = run.data.tags.get("run_dir")
        if run_dir and run.data.tags.get("host") == socket.gethostname():
            from harness.trial.checkpoint import clean_staging

            clean_staging(Path(run_dir) / "checkpoints")
    return marked


def search(client, experiment_ids: list[str], filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


# --- claims -----------------------------------------------------------------------------------------------


def holders(runs: list, now: float, alive: str | None = None) -> list:
    """The live runs in claim order: FINISHED first, then RUNNING, each by start time and run id. `alive`
    names a run counted as live RUNNING whatever the store says (the caller's own)."""
    live = [r for r in runs if r.info.run_id == alive or is_live(r, now)]

    def order(run):
        finished = run.info.status == "FINISHED" and run.info.run_id != alive
        return (not finished, run.info.start_time, run.info.run_id)

    return sorted(live, key=order)


def trial_runs(client, experiment_id: str, study: str, config_hash: str, code_version: str | None = None) -> list:
    """The study's runs of the computation; with `code_version`, only those made by that code (a sweep that
    does not reuse other code versions' runs does not let them hold its trials either)."""
    found = f"tags.study = '{study}' and tags.config_hash = '{config_hash}'"
    return search(
        client, [experiment_id], found + (f" and tags.code_version = '{code_version}'" if code_version else "")
    )


def describe(run, now: float) -> str:
    if run.info.status == "FINISHED":
        loss = run.data.metrics.get("test_loss")
        return f"run {run.info.run_id} FINISHED" + ("" if loss is None else f" (test_loss {loss:.6f})")
    return (
        f"run {run.info.run_id} RUNNING on {run.data.tags.get('host', '?')} (heartbeat "
        f"{now - heartbeat(run):.0f} s ago)"
    )


def claim(
    client, experiment_id: str, run_id: str, study: str, config_hash: str, slots: int, code_version: str | None = None
) -> str | None:
    """None when `run_id` holds one of the computation's `slots` in the study; else who holds them."""
    now = time.time()
    ranked = holders(trial_runs(client, experiment_id, study, config_hash, code_version), now, alive=run_id)
    ids = [r.info.run_id for r in ranked]
    if (ids.index(run_id) if run_id in ids else len(ids)) < slots:
        return None
    others = [describe(r, now) for r in ranked if r.info.run_id != run_id][:slots]
    return f"study {study} already has this trial (config_hash {config_hash}): {'; '.join(others)}"


def claim_new_run(
    client, experiment_id: str, run_id: str, study: str, config_hash: str, slots: int, code_version: str | None = None
) -> str | None:
    time.sleep(CLAIM_SETTLE)  # every run created before ours is visible by now
    return claim(client, experiment_id, run_id, study, config_hash, slots, code_version)


class Watch:
    """Called by the tracker after each heartbeat: keeps a live run RUNNING if it was marked KILLED while the
    store could not hear it, and (for a study trial) returns why the trial must stop when another run holds
    its claim."""

    def __init__(self, client, experiment_id: str, run_id: str, claim: tuple[str, str, int, str | None] | None = None):
        self.client, self.experiment_id, self.run_id, self.claim = client, experiment_id, run_id, claim

    def __call__(self) -> str | None:
        if self.claim is not None:
            reason = claim(self.client, self.experiment_id, self.run_id, *self.claim)
            if reason:
                return reason
        run = self.client.get_run(self.run_id)
        if run.info.status == "KILLED":
            log.warning(
                "run %s was marked %s (%s) while the store could not hear it; it is alive: RUNNING again",
                self.run_id,
                run.info.status,
                run.data.tags.get(REASON_TAG, ""),
            )
            self.client.update_run(self.run_id, "RUNNING")
            self.client.delete_tag(self.run_id, REASON_TAG)
        return None


# --- resume -----------------------------------------------------------------------------------------------


def own_store(saved_uri: str | None, requested_uri: str | None, source: str, command: str) -> str | None:
    """The store a command about an existing trial (resume, evaluate) writes to: the trial's own. A different one
    asked for (`source` says where: `tracking.uri` or `MLFLOW_TRACKING_URI`) is refused, naming both."""
    saved, requested = (public_uri(normalize_uri(uri)) if uri else None for uri in (saved_uri, requested_uri))
    if requested and saved and requested != saved:
        raise ValueError(
            f"{command}: the trial is recorded in {saved}, but {source} names {requested}; its records stay in "
            f"its own run, so use its store (drop {source} or set it to {saved})"
        )
    return requested_uri or saved_uri  # the same store; the requested spelling may carry its credentials


def resumed_already_finished(cfg) -> str | None:
    """For a trial to resume (its saved config, `resume` set): a line saying its run already FINISHED, else None."""
    from harness.trial import checkpoint

    uri = cfg.tracking.uri or default_tracking_uri()
    return finished_already(uri, checkpoint.run_id(checkpoint.find(Path(cfg.resume))), cfg.tracking.connect_timeout)


def finished_already(uri: str, run_id: str, timeout: float) -> str | None:
    """A line saying the trial's run FINISHED (so resuming has nothing to do), else None."""
    client = connect(uri, timeout)
    run = client.get_run(run_id)
    if run.info.status != "FINISHED":
        return None
    loss = run.data.metrics.get("test_loss")
    return (
        f"the trial's run {run_id} in {public_uri(uri)} already FINISHED"
        + ("" if loss is None else f" (test_loss {loss:.6f})")
        + ": nothing to resume; nothing was changed"
    )


def diverged(run) -> bool:
    """Whether the run FAILED by divergence: a result, not run again (unless rerun=true)."""
    return run.info.status == "FAILED" and run.data.tags.get(REASON_TAG, "").startswith(DIVERGED)
