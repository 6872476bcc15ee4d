"""What each planned trial of a study came to: its MLflow run's status and test loss, or why it has none, as a table
for the terminal and the parent run's description and as summary.csv."""

import csv
import io
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Optional

from harness.study.design import TrialSpec
from harness.tracking import liveness
from harness.trial.preemption import PREEMPTED_TAG, PREEMPTIONS_TAG, RESUMED_TAG

if TYPE_CHECKING:
    from mlflow.entities import Run
ELSEWHERE = "ELSEWHERE"  # claimed by another execution of the study: waited for


JobEnd = tuple[str, str]  # (status, note) of a job whose MLflow run may not tell: FAILED, or LOST with its launcher


@dataclass
class PlannedTrial:
    trial: TrialSpec
    overrides: list[str]
    config_hash: str
    earlier_run: Optional["Run"] = None  # a FINISHED MLflow run of the same computation in the study
    elsewhere_run: Optional["Run"] = None  # the run another execution FINISHED while this one waited
    slots: int = 1  # runs of this computation the study asks for (exact repeats ask for several)
    rerun_reason: str = ""  # why a FINISHED run of the same computation was not reused
    diverged_run: Optional["Run"] = None  # a FAILED run of the same computation that diverged: a result


@dataclass
class Outcome:
    trial: str
    status: str  # an MLflow run status; SKIPPED (FINISHED earlier or elsewhere); ELSEWHERE (another execution
    # holds it); LOST (its launcher failed); NOT RUN
    test_loss: float | None = None
    run_id: str | None = None
    note: str = ""
    diverged: bool = False  # FAILED by divergence: a result, not run again unless rerun=true
    preempted: bool = False  # KILLED by a preemption and not resumed yet (a requeued job resumes it)


def collect_outcomes(planned: list[PlannedTrial], ended_early: dict[int, JobEnd], children: list) -> list[Outcome]:
    """Each trial's ending, from its MLflow run when it has one (runs of one computation are interchangeable)."""
    runs_by_hash = defaultdict(list)
    for run in sorted(children, key=lambda r: r.info.start_time):
        if not run.data.tags.get(liveness.WITHDRAWN_TAG):  # a claim given up, never a result
            runs_by_hash[run.data.tags.get("config_hash")].append(run)
    outcomes = []
    for p in planned:
        name = p.trial.name
        if p.earlier_run is not None:
            outcomes.append(run_outcome(name, p.earlier_run, "SKIPPED", "FINISHED earlier"))
        elif p.diverged_run is not None:
            note = f"diverged earlier, a result: {p.diverged_run.data.tags.get(liveness.REASON_TAG, '')}"
            outcomes.append(run_outcome(name, p.diverged_run, "FAILED", note))
        elif p.elsewhere_run is not None:
            parent = p.elsewhere_run.data.tags.get("mlflow.parentRunId", "none")
            outcomes.append(
                run_outcome(
                    name,
                    p.elsewhere_run,
                    "SKIPPED",
                    f"FINISHED by another execution of the study (parent run {parent})",
                )
            )
        elif runs_by_hash[p.config_hash]:
            run = runs_by_hash[p.config_hash].pop(0)
            status, note = run.info.status, run.data.tags.get("failure_reason", "")
            if status == "RUNNING":
                # e.g. its records could not reach the store: the job's error says so
                status, note = ended_early.get(id(p), (status, "no end recorded: still running, or its process died"))
            outcomes.append(run_outcome(name, run, status, note))
        elif id(p) in ended_early:
            status, note = ended_early[id(p)]
            outcomes.append(Outcome(name, status, note=note))
        else:
            outcomes.append(Outcome(name, "NOT RUN", note="the study stopped first"))
    return outcomes


def run_outcome(name: str, run, status: str, note: str) -> Outcome:
    tags = run.data.tags
    history = [
        f"resumed from {tags[RESUMED_TAG]}" if RESUMED_TAG in tags else "",
        f"preempted {tags[PREEMPTIONS_TAG]}x" if PREEMPTIONS_TAG in tags else "",
    ]
    note = "; ".join(filter(None, [*history, note]))
    preempted = status == "KILLED" and PREEMPTED_TAG in tags
    return Outcome(
        name, status, run.data.metrics.get("test_loss"), run.info.run_id, note, liveness.diverged(run), preempted
    )


def outcome_table(outcomes: list[Outcome]) -> str:
    """A Markdown table that also reads aligned in a terminal."""
    rows = [["#", "trial", "status", "test_loss", "run", "note"]]
    for index, o in enumerate(outcomes):
        loss = "-" if o.test_loss is None else f"{o.test_loss:.6f}"
        note = o.note.splitlines()[0][:120] if o.note else ""
        rows.append([str(index), o.trial, o.status, loss, o.run_id or "-", note])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def outcomes_csv(outcomes: list[Outcome]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[f.name for f in fields(Outcome)])
    writer.writeheader()
    writer.writerows(asdict(o) for o in outcomes)
    return out.getvalue()
