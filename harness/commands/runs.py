"""`python -m harness runs` and `python -m harness replay`: the runs' records in the store, kept true."""

import sys
import time
from pathlib import Path

from harness.arguments import split
from harness.paths import default_tracking_uri
from harness.tracking import liveness
from harness.tracking.replay import replay
from harness.tracking.store import TrackingUnavailable, connect, normalize_uri
from harness.trial.preemption import PREEMPTED_TAG, RESUMES_TAG

USAGE = """\
usage:
    python -m harness runs [study=NAME] [experiment=NAME] [tracking.uri=URI] [--mark-stale] [stale_after=SECONDS]
    python -m harness replay RUN_DIR [tracking.uri=URI]

`runs` lists the RUNNING runs with their heartbeat (live, stale, or none: a run of an older harness), then the
preempted runs (KILLED at a step boundary with a checkpoint) and what resumes each.
`--mark-stale` ends the stale ones KILLED with the reason (a SIGKILLed trial or sweep, a lost node), so
`mlflow ui` and the analysis show the truth; a stale run is one silent for 4 heartbeat intervals, or for
`stale_after` seconds if given. `replay` sends the records a trial saved in RUN_DIR/unsent_records.jsonl
when its store was unreachable at its end.
"""


def parse(arguments: list[str], allowed: set[str], flags: set[str]) -> tuple[dict[str, str], set[str], list[str]]:
    given, positional = split(arguments, allowed, flags), []
    for argument in given.rest:
        if argument.startswith("--"):
            raise ValueError(f"unknown option {argument}; allowed: {', '.join(sorted(flags)) or 'none'}")
        if "=" in argument:
            key = argument.split("=", 1)[0]
            raise ValueError(f"unknown setting {key}=; allowed: {', '.join(sorted(allowed))}")
        positional.append(argument)
    return given.settings, given.flags, positional


def list_runs(options: dict[str, str], mark: bool) -> int:
    uri = normalize_uri(options.get("tracking.uri") or default_tracking_uri())
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"no MLflow store at {uri}; pass tracking.uri= or set MLFLOW_TRACKING_URI")
    client = connect(uri, timeout=10)
    names = [options["experiment"]] if "experiment" in options else None
    experiments = [e for e in client.search_experiments() if names is None or e.name in names]
    if not experiments:
        print(f"no experiment {names[0]!r} in {uri}")
        return 1
    stale_after: float | None = float(options["stale_after"]) if "stale_after" in options else None
    query = "attributes.status = 'RUNNING'" + (f" and tags.study = '{options['study']}'" if "study" in options else "")
    running = liveness.search(client, [e.experiment_id for e in experiments], query)
    now = time.time()
    rows = [["run", "name", "study", "heartbeat", "host", "run directory"]]
    for run in sorted(running, key=lambda r: r.info.start_time):
        tags, beat = run.data.tags, liveness.heartbeat(run)
        if beat is None:
            state = "none (older harness)"
        else:
            state = f"{now - beat:.0f} s ago" + (" STALE" if liveness.is_stale(run, now, stale_after) else "")
        rows.append(
            [
                run.info.run_id,
                run.info.run_name or "",
                tags.get("study", ""),
                state,
                tags.get("host", ""),
                tags.get("run_dir", tags.get("sweep_dir", "")),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"{len(running)} RUNNING runs in {uri}")
    if running:
        print("\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows))
    list_preempted(client, [e.experiment_id for e in experiments], options.get("study"))
    stale = [r for r in running if liveness.is_stale(r, now, stale_after)]
    if not mark:
        if stale:
            print(f"{len(stale)} of them are stale; mark them KILLED with: python -m harness runs --mark-stale")
        return 0
    for run, reason in liveness.mark_stale(client, running, stale_after):
        print(f"marked {run.info.run_id} ({run.info.run_name}) KILLED: {reason}")
    return 0


def list_preempted(client, experiment_ids: list[str], study: str | None) -> None:
    """The KILLED runs a preemption stopped, the step each reached and what continues it."""
    query = "attributes.status = 'KILLED'" + (f" and tags.study = '{study}'" if study else "")
    preempted = [r for r in liveness.search(client, experiment_ids, query) if PREEMPTED_TAG in r.data.tags]
    if not preempted:
        return
    rows = [["run", "name", "study", "step", "resumes from", "resumed by"]]
    for run in sorted(preempted, key=lambda r: r.info.start_time):
        tags = run.data.tags
        resumed_by = (
            f"the next execution of study {tags['study']} (or its job's requeue)"
            if tags.get("study")
            else f"python -m harness resume={tags.get('run_dir', 'RUN_DIR')}"
        )
        rows.append(
            [
                run.info.run_id,
                run.info.run_name or "",
                tags.get("study", ""),
                tags[PREEMPTED_TAG],
                tags.get(RESUMES_TAG, ""),
                resumed_by,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"{len(preempted)} preempted runs (KILLED at a step boundary, checkpoint saved)")
    print("\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows))


def main(arguments: list[str]) -> int:
    command, *rest = arguments
    if any(a in ("-h", "--help", "help") for a in rest):
        print(USAGE, end="")
        return 0
    try:
        if command == "runs":
            options, switches, positional = parse(
                rest, {"study", "experiment", "tracking.uri", "stale_after"}, {"--mark-stale"}
            )
            if positional:
                raise ValueError(f"unexpected arguments {positional}")
            return list_runs(options, "--mark-stale" in switches)
        options, _, positional = parse(rest, {"tracking.uri"}, set())
        if len(positional) != 1:
            raise ValueError("give the trial's run directory: python -m harness replay RUN_DIR")
        print(replay(positional[0], options.get("tracking.uri")))
        return 0
    except (ValueError, FileNotFoundError, TrackingUnavailable, RuntimeError) as error:
        print(f"error: {error}\n\n{USAGE}" if isinstance(error, ValueError) else f"error: {error}", file=sys.stderr)
        return 2
