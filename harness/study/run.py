"""Run a study: an MLflow parent run, every trial a child run, all launched by Hydra.

`run_study` plans the trials, skips those whose computation already FINISHED in the study, submits the rest to the
configured launcher and waits for those another execution holds; docs/study-runs.md describes reuse and concurrency."""

import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

from harness.config.compose import compose_trial, config_hash
from harness.config.schema import STUDY_TAG, TrialConfig
from harness.progress import study_line, write_line
from harness.study.design import StudyConf, TrialSpec, factorial_design, study_trials
from harness.study.outcomes import ELSEWHERE, JobEnd, Outcome, PlannedTrial, collect_outcomes, outcome_table
from harness.study.store import StudyStore
from harness.tracking.liveness import ClaimedElsewhere
from harness.tracking.store import TrackingUnavailable, ui_url
from harness.tracking.version import code_version
from harness.trial.preemption import Preempted
from harness.trial.preflight import check_trial
from harness.trial.ranks import launcher_ranks

if TYPE_CHECKING:
    pass

# Keys each trial gets from the study: on the command line they would be silently replaced.
PER_TRIAL_KEYS = {
    "seed": "the study sets it per trial; change hydra.sweeper.seeds",
    "train_seed": "the study sets it per trial; change hydra.sweeper.train_seeds",
    "intervention": "the study sets it per trial; change hydra.sweeper.arms",
    "tracking.parent_run_id": "the study sets it to its parent run",
    "resume": "a study resumes its unfinished trials from their latest intact checkpoints: run the same command again",
}


class StudyError(CompactHydraException):
    """A study that cannot start, or did not finish: Hydra prints the message alone and exits 1."""


class StudyIncomplete(StudyError):
    """Raised after the summary table when some trial did not finish."""


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
    except TrackingUnavailable as error:
        raise StudyError(f"study {tag}: {error}") from None
    store.mark_stale()
    if not trial_cfg.rerun:
        skip_finished(planned, store.finished_runs(), version, trial_cfg.reuse_other_code_versions)
        keep_divergences(planned, store.diverged_runs())
    pending = [p for p in planned if p.earlier_run is None and p.diverged_run is None]
    launcher_name = config.hydra.runtime.choices.get("hydra/launcher")
    design = factorial_design(study.factorial.factors, study.factorial.resolution).describe() if study.factorial else ""
    parent_id = store.start_parent(study, planned, arguments, launcher_name, str(config.hydra.sweep.dir), design)
    print(f"[study {tag}] {study.description}" + (f"\n[study {tag}] {design}" if design else ""))
    print(
        f"[study {tag}] {len(planned)} trials: {sum(p.earlier_run is not None for p in planned)} already FINISHED "
        f"(skipped), "
        f"{len(pending)} to run with the {launcher_name} launcher; parent run {parent_id} in {store.uri}; "
        f"code version {version}",
        flush=True,
    )
    print(f"[study {tag}] in mlflow ui: {ui_url(store.uri, store.experiment_id, parent_id)}", flush=True)
    for p in planned:
        if p.diverged_run is not None:
            print(
                f"[study {tag}] {p.trial.name} is not run again: its run {p.diverged_run.info.run_id} diverged, "
                f"a result (rerun=true runs it again)",
                flush=True,
            )
    for p in pending:
        if p.rerun_reason:
            print(f"[study {tag}] {p.trial.name} runs again: {p.rerun_reason}", flush=True)
    if not trial_cfg.rerun:
        for p, line in store.resumes(pending, None if trial_cfg.reuse_other_code_versions else version):
            print(f"[study {tag}] {p.trial.name} {line}", flush=True)

    def plan_round(round_trials: list[TrialSpec]) -> list[PlannedTrial]:  # a sequential study's later rounds
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
                    for p, end in zip(batch, submit_jobs(launcher, jobs, launched) if jobs else []):
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
                    progress.report,
                )
    except BaseException as error:
        status = "KILLED" if isinstance(error, (KeyboardInterrupt, Preempted)) else "FAILED"
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
        results = [o for o in unfinished if o.diverged]
        retried = [o for o in unfinished if not o.diverged]
        raise StudyIncomplete(
            f"{len(unfinished)} of {len(outcomes)} trials of study {tag} did not finish "
            f"({', '.join(o.trial for o in unfinished)})"
            + (f"; run the same command again to resume {', '.join(o.trial for o in retried)}" if retried else "")
            + (
                f"; {', '.join(o.trial for o in results)} diverged (a result; rerun=true runs them again)"
                if results
                else ""
            )
        )
    if study.analyze and not study.sequential:  # a sequential study has decided after each round
        analysed = store.client.get_run(parent_id).data.tags
        if not pending and "analysis_run_id" in analysed:
            print(
                f"[study {tag}] nothing new ran; its analysis run {analysed['analysis_run_id']} stands: "
                f"{analysed.get('verdicts', '(no verdicts)')}",
                flush=True,
            )
        else:
            analyse_study(tag, store.uri, tracking.experiment, study.report_dir)
    return outcomes


def analyse_study(tag: str, tracking_uri: str, experiment: str, report_dir: str | None = None) -> None:
    """The study's analysis, as `python -m analysis study=TAG` runs it: the verdict table printed, the report
    logged under the parent run, whose tags and metrics then show each arm's verdict."""
    from analysis.__main__ import run as run_analysis
    from analysis.load import AnalysisInputError

    print(
        f"[study {tag}] its analysis (python -m analysis study={tag}; hydra.sweeper.analyze=false leaves it out):",
        flush=True,
    )
    try:
        options = {"study": tag, "tracking_uri": tracking_uri, "experiment": experiment}
        run_analysis(options | ({"out": report_dir} if report_dir else {}))
    except AnalysisInputError as error:
        print(f"[study {tag}] no analysis: {error}", flush=True)


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
    trials: list[TrialSpec], study: StudyConf, config: DictConfig, config_loader, arguments: list[str]
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


def keep_divergences(planned: list[PlannedTrial], diverged: dict[str, list]) -> None:
    """A trial whose computation diverged in the study (and has no FINISHED run) is a result: it is not run again."""
    for p in planned:
        if p.earlier_run is None and diverged.get(p.config_hash):
            p.diverged_run = diverged[p.config_hash].pop(0)


def submit_jobs(launcher: Launcher, jobs: list[list[str]], first_index: int) -> list[JobEnd | None]:
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
        outcomes = collect_outcomes(self.pending, self.ended_early, children)
        preempted = sum(o.preempted for o in outcomes)  # not done: a requeued job resumes it
        counts = Counter(o.status for o in outcomes if not o.preempted)
        total, running, elsewhere = len(self.pending), counts.pop("RUNNING", 0), counts.pop(ELSEWHERE, 0)
        counts.pop("NOT RUN", 0)
        done = sum(counts.values())
        with self._lock:
            if (done, running, preempted, elsewhere, counts) == self._last:
                return
            self._last = (done, running, preempted, elsewhere, counts)
            elapsed = time.monotonic() - self.started
            write_line(study_line(self.study, total, done, running, elsewhere, counts, elapsed, preempted))
