"""Run a study: an MLflow parent run, every trial a child run, all launched by Hydra. A later execution of the
same plan reuses the parent (`harness.study.parents` says exactly when), so a study finished in several goes is one tree.

The study sweeper (`hydra_plugins/harness_study_sweeper`) hands `run_study` the study's settings and the
configured launcher: Hydra's basic local launcher by default, submitit for SLURM (`hydra/launcher=slurm`)
or for local processes (`hydra/launcher=submitit_local`). Trials whose computation already FINISHED in
the study are skipped, so running the same command again finishes an interrupted study.

Executions of one study may run at the same time (two `make sweep` started together, or a second one to
finish a first one faster). Each trial claims its computation in the store before it computes
(`harness.tracking.records`); a trial claimed by another execution is passed over, and once its own trials are done
an execution waits for those: a FINISHED one is reported as SKIPPED, one whose run failed or died (stale
heartbeat, marked KILLED) is run here. Runs left RUNNING by dead processes, trials and studies alike, are
marked KILLED when a study starts and while it waits.
"""

import csv
import io
import json
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict

from harness.config.schema import STUDY_TAG, TrialConfig, compose_trial, config_hash
from harness.progress import study_line, write_line
from harness.study import parents
from harness.study.design import StudyConf, Trial, factorial_design, study_trials
from harness.tracking import records
from harness.tracking.records import ClaimedElsewhere
from harness.tracking.store import ui_url
from harness.tracking.version import code_version
from harness.trial.preflight import check_trial
from harness.trial.ranks import launcher_ranks

if TYPE_CHECKING:
    from mlflow.entities import Run

# Keys each trial gets from the study: on the command line they would be silently replaced.
PER_TRIAL_KEYS = {
    "seed": "the study sets it per trial; change hydra.sweeper.seeds",
    "train_seed": "the study sets it per trial; change hydra.sweeper.train_seeds",
    "intervention": "the study sets it per trial; change hydra.sweeper.arms",
    "tracking.parent_run_id": "the study sets it to its parent run",
    "resume": "a study retries its unfinished trials from the start: run the same command again",
}
ENDED = ("FINISHED", "FAILED", "KILLED")
ELSEWHERE = "ELSEWHERE"  # claimed by another execution of the study: waited for
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
JobEnd = tuple[str, str]  # (status, note) of a job whose MLflow run may not tell: FAILED, or LOST with its launcher


class StudyError(CompactHydraException):
    """A study that cannot start, or did not finish: Hydra prints the message alone and exits 1."""


class StudyIncomplete(StudyError):
    """Raised after the summary table when some trial did not finish."""


@dataclass
class PlannedTrial:
    trial: Trial
    overrides: list[str]
    config_hash: str
    earlier_run: Optional["Run"] = None  # a FINISHED MLflow run of the same computation in the study
    elsewhere_run: Optional["Run"] = None  # the run another execution FINISHED while this one waited
    slots: int = 1  # runs of this computation the study asks for (exact repeats ask for several)
    rerun_reason: str = ""  # why a FINISHED run of the same computation was not reused


@dataclass
class Outcome:
    trial: str
    status: str  # an MLflow run status; SKIPPED (FINISHED earlier or elsewhere); ELSEWHERE (another execution
    # holds it); LOST (its launcher failed); NOT RUN
    test_loss: float | None = None
    run_id: str | None = None
    note: str = ""


def run_study(
    study: StudyConf, config: DictConfig, config_loader, launcher: Launcher, arguments: list[str]
) -> list[Outcome]:
    tag = config.study
    if tag is None or not STUDY_TAG.fullmatch(tag):
        raise StudyError(f"study={tag!r}: a study's tag is letters, digits, '_', '.' or '-'")
    try:
        trials = study_trials(study)
        check_command_line(arguments)
    except ValueError as error:
        raise StudyError(f"study {tag}: {error}") from None
    print(f"[study {tag}] composing {len(trials)} trials", flush=True)
    planned, trial_cfg = plan_trials(trials, study, config, config_loader, arguments)

    # Tracking and rerun come from the command line, so every trial has the last one's.
    tracking = trial_cfg.tracking
    version = code_version()
    try:
        store = StudyStore(
            tracking.uri,
            tracking.experiment,
            tag,
            tracking.connect_timeout,
            tracking.heartbeat_interval,
            None if trial_cfg.reuse_other_code_versions else version,
        )
    except records.TrackingUnavailable as error:
        raise StudyError(f"study {tag}: {error}") from None
    store.mark_stale()
    if not trial_cfg.rerun:
        skip_finished(planned, store.finished_runs(), version, trial_cfg.reuse_other_code_versions)
    pending = [p for p in planned if p.earlier_run is None]
    launcher_name = config.hydra.runtime.choices.get("hydra/launcher")
    design = factorial_design(study.factorial.factors, study.factorial.resolution).describe() if study.factorial else ""
    parent_id = store.start_parent(study, planned, arguments, launcher_name, str(config.hydra.sweep.dir), design)
    print(f"[study {tag}] {study.description}" + (f"\n[study {tag}] {design}" if design else ""))
    print(
        f"[study {tag}] {len(planned)} trials: {len(planned) - len(pending)} already FINISHED (skipped), "
        f"{len(pending)} to run with the {launcher_name} launcher; parent run {parent_id} in {store.uri}; "
        f"code version {version}",
        flush=True,
    )
    print(f"[study {tag}] in mlflow ui: {ui_url(store.uri, store.experiment_id, parent_id)}", flush=True)
    for p in pending:
        if p.rerun_reason:
            print(f"[study {tag}] {p.trial.name} runs again: {p.rerun_reason}", flush=True)

    def plan_round(round_trials: list[Trial]) -> list[PlannedTrial]:  # a sequential study's later rounds
        new = plan_trials(round_trials, study, config, config_loader, arguments)[0]
        if not trial_cfg.rerun:
            skip_finished(new, store.finished_runs(), version, trial_cfg.reuse_other_code_versions)
        return new

    ended_early: dict[int, JobEnd] = {}  # by id(PlannedTrial)
    status, sequential = None, None
    try:
        if study.sequential:
            from harness.study.sequential import SequentialStudy

            sequential = SequentialStudy(study, tag, store, parent_id, plan_round)
        with Progress(tag, pending, ended_early, store, parent_id, study.progress_interval) as progress:
            # The basic launcher runs one trial at a time anyway; one per call lets the progress line count
            # the trials that fail before they have a run as soon as they do.
            to_run, launched = pending, 0
            # A sequential study plans its next round when one has ended, until it stops.
            while to_run or (sequential and (to_run := sequential.next_round(planned, pending, ended_early))):
                batch_size = study.max_batch_size or (1 if launcher_name == "basic" else len(to_run))
                for start in range(0, len(to_run), batch_size):
                    batch = store.pass_over_claimed(to_run[start : start + batch_size], ended_early)
                    jobs = [[*p.overrides, f"tracking.parent_run_id={parent_id}"] for p in batch]
                    for p, end in zip(batch, launch(launcher, jobs, launched) if jobs else []):
                        ended_early.pop(id(p), None)
                        if end is not None:
                            ended_early[id(p)] = end
                    launched += len(jobs)
                    progress.report()
                to_run = store.await_elsewhere(
                    [p for p in pending if ended_early.get(id(p), ("",))[0] == ELSEWHERE],
                    ended_early,
                    parent_id,
                    study.progress_interval,
                    progress,
                )
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        store.stop_heartbeat()
        if sequential is not None:
            design = sequential.report(design, interrupted=status is not None)
        outcomes = collect_outcomes(planned, ended_early, store.children(parent_id))
        status = status or ("FINISHED" if all(o.status in ("FINISHED", "SKIPPED") for o in outcomes) else "FAILED")
        table = outcome_table(outcomes)
        counts = ", ".join(f"{n} {s}" for s, n in Counter(o.status for o in outcomes).items())
        print(f"[study {tag}] {status} ({counts}); parent run {parent_id}\n{table}", flush=True)
        store.end_parent(parent_id, study, outcomes, table, status, design)
    unfinished = [o for o in outcomes if o.status not in ("FINISHED", "SKIPPED")]
    if unfinished:
        raise StudyIncomplete(
            f"{len(unfinished)} of {len(outcomes)} trials of study {tag} did not finish "
            f"({', '.join(o.trial for o in unfinished)}); run the same command again to retry them"
        )
    return outcomes


def check_command_line(arguments: list[str]) -> None:
    for override in OverridesParser.create().parse_overrides(arguments):
        if override.is_sweep_override():
            raise ValueError(
                f"{override.input_line}: value sweeps do not combine with a study; "
                f"list the variants as study arms or seeds"
            )
        if override.key_or_group in PER_TRIAL_KEYS:
            raise ValueError(f"{override.input_line}: {PER_TRIAL_KEYS[override.key_or_group]}")


def plan_trials(
    trials: list[Trial], study: StudyConf, config: DictConfig, config_loader, arguments: list[str]
) -> tuple[list[PlannedTrial], TrialConfig]:
    """Each trial's overrides and config_hash, its config checked; and the last trial's config."""
    planned, world = [], launcher_ranks(config)
    for trial in trials:
        overrides = [*study.overrides, *arguments, *trial.overrides()]
        try:
            trial_cfg = compose_trial_config(config_loader, config, overrides)
            check_trial(trial_cfg)
        except (KeyError, ValueError) as error:  # the config's and the machine's checks; nothing has run yet
            raise StudyError(f"study {config.study}, trial {trial.name}: {error}") from None
        planned.append(PlannedTrial(trial, overrides, config_hash(trial_cfg, world)))
    slots = Counter(p.config_hash for p in planned)
    for p in planned:
        p.slots = slots[p.config_hash]
        if p.slots > 1:
            p.overrides = [*p.overrides, f"tracking.claim_slots={p.slots}"]
    return planned, trial_cfg


def compose_trial_config(config_loader, master_config: DictConfig, overrides: list[str]) -> TrialConfig:
    """The trial's config exactly as its job will compose it, to know its config_hash before it runs."""
    cfg = config_loader.load_sweep_config(master_config, overrides)
    with open_dict(cfg):
        del cfg["hydra"]
    return compose_trial(cfg, overrides)


def skip_finished(
    planned: list[PlannedTrial], finished: dict[str, list], version: str, reuse_other_code_versions: bool = False
) -> None:
    """A study asking for n runs of one computation (exact repeats) reuses up to n FINISHED ones, made by this
    code version (the `code_version` tag) unless `reuse_other_code_versions`. A trial that finds only runs of
    other code versions runs again and says why in `rerun_reason`."""
    available = {h: sorted(runs, key=lambda r: r.info.start_time) for h, runs in finished.items()}
    for p in planned:
        runs = available.get(p.config_hash, [])
        usable = [r for r in runs if reuse_other_code_versions or r.data.tags.get("code_version") == version]
        if usable:
            p.earlier_run = usable[0]
            runs.remove(usable[0])
        elif runs:
            other = runs[0]
            p.rerun_reason = (
                f"its FINISHED run {other.info.run_id} was made by code version "
                f"{other.data.tags.get('code_version', '(not recorded)')}, not by this one ({version}); "
                f"reuse_other_code_versions=true would reuse it"
            )


def launch(launcher: Launcher, jobs: list[list[str]], first_index: int) -> list[JobEnd | None]:
    """Run the jobs. Per job: how it ended when its MLflow run may not say (it failed, or its process was
    lost), else None.

    A job whose process died (killed, out of memory, node lost) makes the submitit launcher raise for the
    whole batch; the runs of the other trials still say how they ended.
    """
    try:
        results: list[JobReturn] = launcher.launch(jobs, initial_job_idx=first_index)
    except Exception as error:
        return [("LOST", f"launcher: {type(error).__name__}: {error}"[:2000])] * len(jobs)
    ends = []
    for result in results:
        try:
            result.return_value  # noqa: B018 (re-raises the trial's exception)
            ends.append(None)
        except ClaimedElsewhere as error:
            ends.append((ELSEWHERE, str(error)[:2000]))
        except Exception as error:
            ends.append(("FAILED", f"{type(error).__name__}: {error}"[:2000]))
    return ends


def collect_outcomes(planned: list[PlannedTrial], ended_early: dict[int, JobEnd], children: list) -> list[Outcome]:
    """Each trial's ending, from its MLflow run when it has one (runs of one computation are interchangeable)."""
    runs_by_hash = defaultdict(list)
    for run in sorted(children, key=lambda r: r.info.start_time):
        if not run.data.tags.get(records.WITHDRAWN_TAG):  # a claim given up, never a result
            runs_by_hash[run.data.tags.get("config_hash")].append(run)
    outcomes = []
    for p in planned:
        name = p.trial.name
        if p.earlier_run is not None:
            outcomes.append(run_outcome(name, p.earlier_run, "SKIPPED", "FINISHED earlier"))
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
    return Outcome(name, status, run.data.metrics.get("test_loss"), run.info.run_id, note)


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


class Progress:
    """The sweep-level progress line. It reads the trials' runs from the store, so it works the same for
    every launcher, trials running in parallel on other machines included. The line is printed through the
    bar of a trial running in this process (`harness.progress`), never over it."""

    def __init__(
        self,
        study: str,
        pending: list[PlannedTrial],
        ended_early: dict[int, JobEnd],
        store: "StudyStore",
        parent_id: str,
        interval: float,
    ):
        self.study, self.pending, self.ended_early = study, pending, ended_early
        self.store, self.parent_id, self.interval = store, parent_id, interval
        self.started = time.monotonic()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._watch, name="study-progress", daemon=True)
        self._last = None

    def __enter__(self) -> "Progress":
        self.report()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

    def report(self) -> None:
        try:
            children = self.store.children(self.parent_id, patient=False)
        except Exception as error:  # a busy or unreachable store must not stop the trials
            write_line(f"[study {self.study}] progress unavailable: {error}")
            return
        counts = Counter(o.status for o in collect_outcomes(self.pending, self.ended_early, children))
        total, running, elsewhere = len(self.pending), counts.pop("RUNNING", 0), counts.pop(ELSEWHERE, 0)
        counts.pop("NOT RUN", 0)
        done = sum(counts.values())
        with self._lock:
            if (done, running, elsewhere, counts) == self._last:
                return
            self._last = (done, running, elsewhere, counts)
            write_line(study_line(self.study, total, done, running, elsewhere, counts, time.monotonic() - self.started))


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
        from harness.tracking.store import Tracker

        tracker = Tracker(uri, experiment, connect_timeout=connect_timeout)  # the experiment, as the trials make it
        self.client, self.uri, self.study = tracker.client, tracker.uri, study
        self.experiment_id = tracker.experiment_id
        self.heartbeat_interval, self.code_version = heartbeat_interval, code_version
        self.execution, self.execution_number = uuid.uuid4().hex, 1  # this execution, and its number on its parent
        self.earlier_children: set[str] = set()  # runs of the parent made by its earlier executions
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def search(self, filter_string: str) -> list:
        return self.patiently(lambda: records.search(self.client, [self.experiment_id], filter_string))

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
        for run, reason in self.patiently(lambda: records.mark_stale(self.client, running)):
            print(
                f"[study {self.study}] marked run {run.info.run_id} ({run.info.run_name}) KILLED: {reason}", flush=True
            )

    def holders(self, computation: str) -> list:
        """The runs holding the computation's claim: made by this code version, unless the study reuses others'."""
        version = f" and tags.code_version = '{self.code_version}'" if self.code_version else ""
        return records.holders(
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
            note = "; ".join(records.describe(r, time.time()) for r in holders)
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
        progress: "Progress",
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
            progress.report()
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
            if "config_hash" in run.data.tags and not run.data.tags.get(records.WITHDRAWN_TAG):
                by_hash[run.data.tags["config_hash"]].append(run)
        return by_hash

    def children(self, parent_id: str, patient: bool = True) -> list:
        """The parent's child runs made by this execution (a reused parent also holds its earlier ones')."""
        query = f"tags.`mlflow.parentRunId` = '{parent_id}'"
        found = self.search(query) if patient else records.search(self.client, [self.experiment_id], query)
        return [r for r in found if r.info.run_id not in self.earlier_children]

    def start_parent(
        self,
        study: StudyConf,
        planned: list[PlannedTrial],
        arguments: list[str],
        launcher: str,
        sweep_dir: str,
        design: str,
    ) -> str:
        """The execution's parent run: an earlier one of the same plan (`harness.study.parents`), else a new one."""
        from harness.tracking.store import HEARTBEAT_INTERVAL_TAG, HEARTBEAT_TAG, git_state

        settings = asdict(study)
        del settings["_target_"]
        # The same trials under other sequential settings (a budget, say) are another plan: the parent's params
        # record those settings, and MLflow never changes a logged param.
        sequential = {key: settings.get(key) for key in SEQUENTIAL_SETTINGS}
        plan = parents.plan_digest(
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
            parents.PLAN_TAG: plan,
            parents.EXECUTIONS_TAG: "1",
            parents.EXECUTION_TAG: self.execution,
            **tags,
            parents.NOTE_TAG: "\n\n".join(filter(None, [study.description, design])),
        }
        run_id = self.client.create_run(self.experiment_id, run_name=f"study {self.study}", tags=tags).info.run_id
        self.client.log_text(run_id, OmegaConf.to_yaml(record), "study.yaml")
        for key in ("arms", "seeds", "train_seeds", "overrides"):
            self.client.log_param(run_id, key, str(record["settings"][key])[:6000])
        self.client.log_param(run_id, "trials", trials)
        self.client.log_param(run_id, "command_line", " ".join(arguments)[:6000])
        return run_id

    def reuse_parent(self, plan: str, tags: dict, record: dict) -> str | None:
        """The id of the ended parent of this plan this execution now holds, or None (`harness.study.parents`). Its
        trials so far are left out of this execution's outcomes (they are the earlier executions')."""
        for run in parents.ended_parents(self.client, self.experiment_id, self.study, plan)[:1]:
            self.execution_number = int(run.data.tags.get(parents.EXECUTIONS_TAG, "1")) + 1
            if not parents.take_over(
                self.client, run, self.execution, tags | {parents.EXECUTIONS_TAG: str(self.execution_number)}
            ):
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
        parents.write_note(self.client, run_id, "\n\n".join(filter(None, [study.description, design])), Trials=table)
        self.client.set_terminated(run_id, status)


def outcomes_csv(outcomes: list[Outcome]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[f.name for f in fields(Outcome)])
    writer.writeheader()
    writer.writerows(asdict(o) for o in outcomes)
    return out.getvalue()
