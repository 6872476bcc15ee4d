"""A study's parent run in MLflow: which one an execution of the study reuses, and its description.

Reuse. An execution of a study reuses an earlier parent run of the same study, in the same experiment, when
(1) its plan is the same: the same trials (names and config_hash, so the same settings, overrides and command
line as far as they change a computation) and, unless `reuse_other_code_versions=true`, the same code version,
the `study_plan` tag; and (2) that parent has ended (FINISHED, FAILED, or KILLED, which includes a parent whose
execution died and was marked so when this one started). A parent another execution is running (RUNNING with a
live heartbeat) is never taken over: a second execution started beside it gets its own parent, as before. Two
executions that pick the same ended parent at once both write their id to its `study_execution` tag; after a
settle second the one whose id stayed keeps the parent and the other starts a new one.

Description. The parent's description (`mlflow.note.content`, Markdown in `mlflow ui`) is the study's
description and design, then sections: `### Verdicts`, written by each analysis of the study, and `### Trials`,
written by each execution. A writer replaces its own section and keeps the others.
"""

import hashlib
import json
import time

from harness.tracking.records import CLAIM_SETTLE, search

PLAN_TAG = "study_plan"  # digest of the trials and code version an execution runs
EXECUTION_TAG = "study_execution"  # the execution that holds the parent now
EXECUTIONS_TAG = "executions"  # how many executions the parent has had
NOTE_TAG = "mlflow.note.content"
NOTE_LIMIT = 8000  # MLflow's limit on a tag's value
SECTIONS = ("Verdicts", "Trials")


def plan_digest(trials: list[tuple[str, str]], code_version: str | None) -> str:
    """The plan of an execution: its trials as (name, config_hash) and the code version its claims require."""
    text = json.dumps({"trials": sorted(trials), "code_version": code_version}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ended_parents(client, experiment_id: str, study: str, plan: str) -> list:
    """The study's parents with this plan that no execution is running, newest first."""
    found = search(
        client, [experiment_id], f"tags.study = '{study}' and tags.study_parent = 'true' and tags.{PLAN_TAG} = '{plan}'"
    )
    return sorted((r for r in found if r.info.status != "RUNNING"), key=lambda r: r.info.start_time, reverse=True)


def take_over(client, run, execution: str, tags: dict[str, str]) -> bool:
    """Make an ended parent RUNNING for `execution` (with `tags`, its heartbeat among them); False when another
    execution took it at the same moment (then it is theirs)."""
    client.update_run(run.info.run_id, "RUNNING")
    for key, value in {**tags, EXECUTION_TAG: execution}.items():
        client.set_tag(run.info.run_id, key, value)
    if "failure_reason" in run.data.tags:  # the reason it ended before; this execution will give its own
        client.delete_tag(run.info.run_id, "failure_reason")
    time.sleep(CLAIM_SETTLE)
    return client.get_run(run.info.run_id).data.tags.get(EXECUTION_TAG) == execution


def latest_parent(client, experiment_id: str, study: str):
    """The study's most recently started parent run in the experiment (where an analysis is logged), or None."""
    found = search(client, [experiment_id], f"tags.study = '{study}' and tags.study_parent = 'true'")
    return max(found, key=lambda r: r.info.start_time, default=None)


# --- the description ---------------------------------------------------------------------------------------


def split_note(note: str) -> tuple[str, dict[str, str]]:
    """A parent's description as its head (before the first section) and its sections by title."""
    head, sections, current = [], {}, None
    for line in note.splitlines():
        title = line[4:].strip() if line.startswith("### ") else None
        if title in SECTIONS:
            current = title
            sections[current] = []
        elif current is None:
            head.append(line)
        else:
            sections[current].append(line)
    return "\n".join(head).strip(), {title: "\n".join(lines).strip() for title, lines in sections.items()}


def join_note(head: str, sections: dict[str, str], limit: int = NOTE_LIMIT) -> str:
    """The description from its parts, cut to MLflow's limit: the trial table loses rows first (the full table
    is the parent's summary.md), then the verdicts."""

    def compose(parts: dict[str, str]) -> str:
        return "\n\n".join(filter(None, [head, *(f"### {t}\n{parts[t]}" for t in SECTIONS if parts.get(t))]))

    parts = dict(sections)
    for title in ("Trials", "Verdicts"):
        lines = parts.get(title, "").splitlines()
        while len(compose(parts)) > limit and lines:
            lines.pop()
            parts[title] = "\n".join(lines) + f"\n\n(cut to fit: the whole {title.lower()} are in the run's artifacts)"
    return compose(parts)[:limit]


def write_note(client, run_id: str, head: str | None = None, **sections: str) -> None:
    """Replace the head (when given) and the named sections of a parent's description, keeping the others."""
    current_head, current = split_note(client.get_run(run_id).data.tags.get(NOTE_TAG, ""))
    client.set_tag(run_id, NOTE_TAG, join_note(current_head if head is None else head, current | sections))
