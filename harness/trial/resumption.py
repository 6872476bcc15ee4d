"""A study trial continues its computation's unfinished run (KILLED, preempted, or FAILED by the machine) from that
run's latest checkpoint that verifies against its manifest, in the same MLflow run, instead of starting at step 0.
A run FAILED by divergence is a result and is never continued; docs/cluster.md."""

import dataclasses
import logging
import os
import time
from pathlib import Path

from harness.config.compose import config_hash, resumed_trial
from harness.config.schema import TrialConfig
from harness.paths import default_tracking_uri
from harness.tracking import liveness
from harness.tracking.version import code_version
from harness.trial import checkpoint

log = logging.getLogger(__name__)


def unfinished_runs(client, experiment_id: str, study: str, computation: str, version: str | None) -> list:
    """The study's runs of `computation` that ended before finishing (or whose process died: stale) and may be
    continued, newest first."""
    query = f"tags.study = '{study}' and tags.config_hash = '{computation}'"
    if version:
        query += f" and tags.code_version = '{version}'"
    found, now = liveness.search(client, [experiment_id], query), time.time()
    return sorted(
        (
            r
            for r in found
            if (r.info.status in ("KILLED", "FAILED") or liveness.is_stale(r, now))
            and not liveness.diverged(r)
            and not r.data.tags.get(liveness.WITHDRAWN_TAG)
            and r.data.tags.get("run_dir")
        ),
        key=lambda r: r.info.start_time,
        reverse=True,
    )


def latest_intact(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The run directory's latest checkpoint that verifies against its manifest, and what was wrong with the
    later ones."""
    directory = Path(run_dir) / "checkpoints"
    steps = sorted(
        (p for p in directory.iterdir() if checkpoint.STEP_DIR.fullmatch(p.name)) if directory.is_dir() else [],
        key=lambda p: int(checkpoint.STEP_DIR.fullmatch(p.name)[1]),
        reverse=True,
    )
    problems = []
    for path in steps:
        try:
            checkpoint.require_intact(path)
            checkpoint.verify(path)
        except (checkpoint.CheckpointError, OSError) as error:
            problems.append(f"{path.name}: {error}")
            continue
        return path, problems
    return None, problems


def point_latest(found: Path) -> None:
    """Make `latest` name `found`, atomically."""
    pointer = found.parent / "latest"
    staged = pointer.with_name("latest.tmp")
    staged.write_text(found.name + "\n")
    os.replace(staged, pointer)


def resume_unfinished(cfg: TrialConfig, overrides: list[str], world: int) -> TrialConfig:
    """`cfg`, or, for a study trial whose computation has an unfinished run with an intact checkpoint, the
    resumed trial continuing that run (under this study's parent run). Prints why a trial starts fresh."""
    if cfg.study is None or cfg.resume or cfg.rerun:
        return cfg
    from harness.tracking.store import connect

    client = connect(cfg.tracking.uri or default_tracking_uri(), cfg.tracking.connect_timeout)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return cfg
    version = None if cfg.reuse_other_code_versions else code_version()
    computation = config_hash(cfg, world)
    for run in unfinished_runs(client, experiment.experiment_id, cfg.study, computation, version):
        run_dir = Path(run.data.tags["run_dir"])
        found, problems = latest_intact(run_dir)
        if found is None:
            why = "; ".join(problems) or f"no checkpoint in {run_dir / 'checkpoints'}"
            print(f"[resume] run {run.info.run_id} ({run.info.status}) cannot be continued ({why}): starting fresh")
            continue
        if problems:
            print(f"[resume] run {run.info.run_id}: {'; '.join(problems)}; continuing from {found.name}")
        point_latest(found)  # also where a writer was killed between saving a checkpoint and pointing `latest` at it
        resumed = resumed_trial(dataclasses.replace(cfg, resume=str(run_dir)), overrides)
        resumed.tracking.parent_run_id = cfg.tracking.parent_run_id
        resumed.tracking.claim_slots = cfg.tracking.claim_slots
        if cfg.tracking.parent_run_id:
            client.set_tag(run.info.run_id, "mlflow.parentRunId", cfg.tracking.parent_run_id)
        print(f"[resume] continuing run {run.info.run_id} ({run.info.status}) from {found}", flush=True)
        return resumed
    return cfg
