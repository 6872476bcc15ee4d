"""The study's records in MLflow: its parent run (which one an execution reuses, and its description), its trials'
claims and FINISHED runs, and the parent's heartbeat and summary. The reuse rule and the description's sections
are described in docs/study-runs.md."""

import hashlib
import json
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from harness.study.design import StudyConf
from harness.study.outcomes import ELSEWHERE, JobEnd, Outcome, PlannedTrial, outcomes_csv
from harness.tracking import liveness
from harness.tracking.liveness import CLAIM_SETTLE, search
from harness.tracking.version import code_version
from harness.trial.preemption import RESUMED_AT_TAG

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


SEQUENTIAL_SETTINGS = (
    "sequential",
    "max_seeds",
    "first_seeds",
    "alpha",
    "min_effect",
    "spending",
    "budget_trials",
    "budget_gpu_hours",
)


STORE_PATIENCE = 600.0  # seconds a study waits for an unreachable store before it gives up


class StudyStore:
    """The study's runs in the MLflow store: a sqlite file or a tracking server."""

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        study: str,
        connect_timeout: float = 10.0,
        heartbeat_interval: float = 30.0,
        code_version: str | None = None,
    ):
        """`code_version`: only runs made by that code hold a trial's claim (None: any code's runs do)."""
        from harness.tracking.tracker import Tracker

        tracker = Tracker(uri, experiment, connect_timeout=connect_timeout)  # the experiment, as the trials make it
        self.client, self.uri, self.study = tracker.client, tracker.uri, study
        self.experiment_id = tracker.experiment_id
        self.heartbeat_interval, self.code_version = heartbeat_interval, code_version
        self.execution, self.execution_number = uuid.uuid4().hex, 1  # this execution, and its number on its parent
        self.earlier_children: set[str] = set()  # runs of the parent made by its earlier executions
        self.started = time.time()  # runs resumed after this were resumed by this execution
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def search(self, filter_string: str) -> list:
        return self.patiently(lambda: liveness.search(self.client, [self.experiment_id], filter_string))

    def patiently(self, call: Callable):
        """`call()`, retried while the store is unreachable (up to STORE_PATIENCE seconds): a tracking server
        that restarts between two trials must not fail the rest of the study."""
        from harness.tracking.store import transient

        started, delay = time.monotonic(), 1.0
        while True:
            try:
                return call()
            except Exception as error:
                if not transient(error) or time.monotonic() - started > STORE_PATIENCE:
                    raise
                print(
                    f"[study {self.study}] the store {self.uri} does not answer ({str(error).splitlines()[0][:200]}); "
                    f"retrying in {delay:.0f} s",
                    flush=True,
                )
                time.sleep(delay)
                delay = min(2 * delay, 60.0)

    def mark_stale(self) -> None:
        """End the study's runs whose process died (trials and parent runs of earlier executions) KILLED."""
        running = self.search(f"tags.study = '{self.study}' and attributes.status = 'RUNNING'")
        for run, reason in self.patiently(lambda: liveness.mark_stale(self.client, running)):
            print(
                f"[study {self.study}] marked run {run.info.run_id} ({run.info.run_name}) KILLED: {reason}", flush=True
            )

    def holders(self, computation: str) -> list:
        """The runs holding the computation's claim: made by this code version, unless the study reuses others'."""
        version = f" and tags.code_version = '{self.code_version}'" if self.code_version else ""
        return liveness.holders(
            self.search(f"tags.study = '{self.study}' and tags.config_hash = '{computation}'" + version), time.time()
        )

    def pass_over_claimed(self, batch: list[PlannedTrial], ended_early: dict[int, JobEnd]) -> list[PlannedTrial]:
        """The trials of `batch` to launch now: those whose computation has fewer holders than it needs. The
        others are marked ELSEWHERE, to be waited for."""
        launch = []
        for p in batch:
            holders = self.holders(p.config_hash)
            if len(holders) < p.slots:
                launch.append(p)
                continue
            note = "; ".join(liveness.describe(r, time.time()) for r in holders)
            ended_early[id(p)] = (ELSEWHERE, note)
            print(
                f"[study {self.study}] {p.trial.name} is held by another execution ({note}); "
                f"running the other trials first",
                flush=True,
            )
        return launch

    def await_elsewhere(
        self,
        waiting: list[PlannedTrial],
        ended_early: dict[int, JobEnd],
        parent_id: str,
        interval: float,
        report_progress: Callable[[], None],
    ) -> list[PlannedTrial]:
        """Wait for the trials another execution holds. Returns those to run here: the study still lacks their
        FINISHED runs and no live run holds them any more. Returns [] when none is left to wait for."""
        if waiting:
            print(
                f"[study {self.study}] waiting for {len(waiting)} trials running in another execution: "
                f"{', '.join(p.trial.name for p in waiting)}",
                flush=True,
            )
        while waiting:
            self.mark_stale()
            relaunch, still = [], []
            for computation in dict.fromkeys(p.config_hash for p in waiting):
                group = [p for p in waiting if p.config_hash == computation]
                holders = self.holders(computation)
                finished = [r for r in holders if r.info.status == "FINISHED"]
                if len(finished) >= group[0].slots:
                    self._assign_elsewhere(group, finished, ended_early, parent_id)
                    continue
                free = group[0].slots - len(holders)
                relaunch += group[: max(free, 0)]
                still += group[max(free, 0) :]
            for p in relaunch:
                print(
                    f"[study {self.study}] {p.trial.name}: no FINISHED or live run holds it any more; running it here",
                    flush=True,
                )
            if relaunch:
                return relaunch
            waiting = still
            report_progress()
            if waiting:
                time.sleep(interval)
        return []

    def _assign_elsewhere(
        self, group: list[PlannedTrial], finished: list, ended_early: dict[int, JobEnd], parent_id: str
    ) -> None:
        taken = {p.earlier_run.info.run_id for p in group if p.earlier_run is not None}
        foreign = [
            r
            for r in finished
            if (r.data.tags.get("mlflow.parentRunId") != parent_id or r.info.run_id in self.earlier_children)
            and r.info.run_id not in taken
        ]
        for p in group:
            ended_early.pop(id(p), None)
            if foreign:
                p.elsewhere_run = foreign.pop(0)

    def finished_runs(self) -> dict[str, list]:
        """The study's FINISHED trial runs by config_hash. Only this study's: a run carries one study tag,
        and the analysis reads a study by it."""
        by_hash = defaultdict(list)
        for run in self.search(f"tags.study = '{self.study}' and attributes.status = 'FINISHED'"):
            if "config_hash" in run.data.tags and not run.data.tags.get(liveness.WITHDRAWN_TAG):
                by_hash[run.data.tags["config_hash"]].append(run)
        return by_hash

    def children(self, parent_id: str, patient: bool = True) -> list:
        """The parent's child runs made or resumed by this execution (a reused parent also holds its earlier ones')."""
        query = f"tags.`mlflow.parentRunId` = '{parent_id}'"
        found = self.search(query) if patient else liveness.search(self.client, [self.experiment_id], query)
        return [r for r in found if r.info.run_id not in self.earlier_children or self.resumed_here(r)]

    def resumed_here(self, run) -> bool:
        return float(run.data.tags.get(RESUMED_AT_TAG, "0")) >= self.started

    def diverged_runs(self) -> dict[str, list]:
        """The study's trial runs FAILED by divergence, by config_hash: results, not run again."""
        by_hash = defaultdict(list)
        for run in self.search(f"tags.study = '{self.study}' and attributes.status = 'FAILED'"):
            if "config_hash" in run.data.tags and liveness.diverged(run):
                by_hash[run.data.tags["config_hash"]].append(run)
        return by_hash

    def resumes(self, pending: list[PlannedTrial], version: str | None) -> list[tuple[PlannedTrial, str]]:
        """What each pending trial will continue: (trial, "resumes run R from step_N") for those whose computation
        has an unfinished run with an intact checkpoint, (trial, "starts fresh: why") for those with one without."""
        from harness.trial.resumption import latest_intact, unfinished_runs  # loads torch

        lines = []
        for p in pending:
            runs = self.patiently(
                lambda p=p: unfinished_runs(self.client, self.experiment_id, self.study, p.config_hash, version)
            )
            for run in runs[:1]:
                found, problems = latest_intact(Path(run.data.tags["run_dir"]))
                if found is not None:
                    lines.append((p, f"resumes run {run.info.run_id} ({run.info.status}) from {found.name}"))
                else:
                    why = "; ".join(problems) or "no checkpoint was saved"
                    lines.append(
                        (
                            p,
                            f"starts fresh: its run {run.info.run_id} ({run.info.status}) has no intact "
                            f"checkpoint ({why})",
                        )
                    )
        return lines

    def start_parent(
        self,
        study: StudyConf,
        planned: list[PlannedTrial],
        arguments: list[str],
        launcher: str,
        sweep_dir: str,
        design: str,
    ) -> str:
        """The execution's parent run: an earlier one of the same plan (docs/study-runs.md), else a new one."""
        from harness.tracking.store import HEARTBEAT_INTERVAL_TAG, HEARTBEAT_TAG, git_state

        settings = asdict(study)
        del settings["_target_"]
        # The same trials under other sequential settings (a budget, say) are another plan: the parent's params
        # record those settings, and MLflow never changes a logged param.
        sequential = {key: settings.get(key) for key in SEQUENTIAL_SETTINGS}
        plan = plan_digest(
            [(p.trial.name, p.config_hash) for p in planned]
            + [("sequential", json.dumps(sequential, sort_keys=True, default=str))],
            self.code_version,
        )
        tags = {
            "launcher": launcher,
            "sweep_dir": sweep_dir,
            "host": socket.gethostname(),
            "code_version": code_version(),
            HEARTBEAT_TAG: f"{time.time():.3f}",
            HEARTBEAT_INTERVAL_TAG: f"{self.heartbeat_interval:g}",
        }
        commit, dirty = git_state()
        if commit:
            tags |= {"mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower()}
        record = {
            "study": self.study,
            "settings": settings,
            "command_line": arguments,
            "launcher": launcher,
            "sweep_dir": sweep_dir,
            "design": design,
            "code_version": code_version(),
            "trials": [
                {
                    "name": p.trial.name,
                    "config_hash": p.config_hash,
                    "overrides": p.overrides,
                    "reuses_run": p.earlier_run.info.run_id if p.earlier_run else None,
                    "rerun_reason": p.rerun_reason or None,
                }
                for p in planned
            ],
        }
        run_id = self.reuse_parent(plan, tags, record)
        if run_id is None:
            run_id = self.new_parent(study, len(planned), arguments, plan, tags, record, design)
        self._heartbeat = threading.Thread(target=self._beat, args=(run_id,), name="study-heartbeat", daemon=True)
        self._heartbeat.start()
        return run_id

    def new_parent(
        self, study: StudyConf, trials: int, arguments: list[str], plan: str, tags: dict, record: dict, design: str
    ) -> str:
        tags = {
            "study": self.study,
            "study_parent": "true",
            PLAN_TAG: plan,
            EXECUTIONS_TAG: "1",
            EXECUTION_TAG: self.execution,
            **tags,
            NOTE_TAG: "\n\n".join(filter(None, [study.description, design])),
        }
        run_id = self.client.create_run(self.experiment_id, run_name=f"study {self.study}", tags=tags).info.run_id
        self.client.log_text(run_id, OmegaConf.to_yaml(record), "study.yaml")
        for key in ("arms", "seeds", "train_seeds", "overrides"):
            self.client.log_param(run_id, key, str(record["settings"][key])[:6000])
        self.client.log_param(run_id, "trials", trials)
        self.client.log_param(run_id, "command_line", " ".join(arguments)[:6000])
        return run_id

    def reuse_parent(self, plan: str, tags: dict, record: dict) -> str | None:
        """The id of the ended parent of this plan this execution now holds, or None (docs/study-runs.md). Its
        trials so far are left out of this execution's outcomes (they are the earlier executions')."""
        for run in ended_parents(self.client, self.experiment_id, self.study, plan)[:1]:
            self.execution_number = int(run.data.tags.get(EXECUTIONS_TAG, "1")) + 1
            if not take_over(self.client, run, self.execution, tags | {EXECUTIONS_TAG: str(self.execution_number)}):
                self.execution_number = 1
                return None
            self.earlier_children = {r.info.run_id for r in self.children(run.info.run_id)}
            self.client.log_text(
                run.info.run_id, OmegaConf.to_yaml(record), f"executions/{self.execution_number}/study.yaml"
            )
            print(
                f"[study {self.study}] reusing parent run {run.info.run_id} ({run.info.status} before): the same "
                f"trials and code as its earlier executions; this is its execution {self.execution_number}",
                flush=True,
            )
            return run.info.run_id
        return None

    def _beat(self, run_id: str) -> None:
        from harness.tracking.store import HEARTBEAT_TAG

        while not self._stop.wait(self.heartbeat_interval):
            try:
                self.client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.3f}")
            except Exception as error:  # the store is down: the study goes on; a stale heartbeat is the truth
                print(f"[study {self.study}] heartbeat failed: {error}", flush=True)

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()

    def end_parent(
        self, run_id: str, study: StudyConf, outcomes: list[Outcome], table: str, status: str, design: str
    ) -> None:
        self.patiently(lambda: self._end_parent(run_id, study, outcomes, table, status, design))

    def _end_parent(
        self, run_id: str, study: StudyConf, outcomes: list[Outcome], table: str, status: str, design: str
    ) -> None:
        counts = Counter(o.status for o in outcomes)
        for key, value in (
            ("trials_finished", counts["FINISHED"]),
            ("trials_skipped", counts["SKIPPED"]),
            ("trials_not_finished", len(outcomes) - counts["FINISHED"] - counts["SKIPPED"]),
        ):
            self.client.log_metric(run_id, key, value, step=self.execution_number)
        self.client.log_text(run_id, table + "\n", "summary.md")
        self.client.log_text(run_id, outcomes_csv(outcomes), "summary.csv")
        if self.execution_number > 1:
            self.client.log_text(run_id, table + "\n", f"executions/{self.execution_number}/summary.md")
        write_note(self.client, run_id, "\n\n".join(filter(None, [study.description, design])), Trials=table)
        self.client.set_terminated(run_id, status)
