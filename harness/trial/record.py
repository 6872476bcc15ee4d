"""A trial's MLflow record: rank 0 opens (or resumes) its run with its name, tags and params before the first step,
and a study trial claims its computation there first."""

import contextlib
import socket
from pathlib import Path

from omegaconf import OmegaConf

from harness.config.compose import BOOKKEEPING_KEYS, as_dict, config_hash, intervention_tag
from harness.config.schema import TrialConfig
from harness.tracking import liveness
from harness.tracking.liveness import ClaimedElsewhere
from harness.tracking.tracker import NullTracker, Tracker
from harness.tracking.version import code_version
from harness.trial import checkpoint
from harness.trial.ranks import Ranks, on_main_rank
from interventions import flatten


def open_record(cfg: TrialConfig, run_dir: Path, ranks: Ranks = Ranks()):
    """Rank 0 opens the trial's MLflow run before the first step: the store must answer within
    `tracking.connect_timeout`, a new trial's run directory must be unused, and a study trial must hold its
    claim (`harness.tracking.liveness`). Every rank learns the outcome; ranks other than 0 get a NullTracker."""
    opened = on_main_rank(ranks, lambda: _open_main_record(cfg, Path(run_dir), ranks.world), share=False)
    return opened if ranks.is_main else NullTracker()


def _open_main_record(cfg: TrialConfig, run_dir: Path, world: int) -> Tracker:
    t = cfg.tracking
    tracker = Tracker(
        t.uri,
        t.experiment,
        connect_timeout=t.connect_timeout,
        heartbeat_interval=t.heartbeat_interval,
        flush_timeout=t.flush_timeout,
        unsent_dir=run_dir,
        system_metrics_interval=t.system_metrics_interval if t.system_metrics else None,
    )
    cfg.tracking.uri = tracker.uri  # the saved config names the store actually used
    computation = config_hash(cfg, world)
    claims = cfg.study is not None and not cfg.rerun
    claim = (cfg.study, computation, t.claim_slots, None if cfg.reuse_other_code_versions else code_version())
    if cfg.resume:  # the checkpoint was verified while the trial was built: a corrupt one never gets here
        run_id = checkpoint.run_id(checkpoint.find(Path(cfg.resume)))
        if claims:
            reason = liveness.claim(tracker.client, tracker.experiment_id, run_id, *claim)
            if reason:
                raise ClaimedElsewhere(f"resuming would record this trial twice: {reason} (rerun=true resumes anyway)")
        tracker.resume(run_id)
        if liveness.REASON_TAG in tracker.client.get_run(run_id).data.tags:  # a FINISHED run keeps no stale reason
            tracker.client.delete_tag(run_id, liveness.REASON_TAG)
    else:
        config_file = run_dir / "config.yaml"
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(config_file, "x") as f:  # the directory is this trial's: no other trial writes here
                f.write(OmegaConf.to_yaml(as_dict(cfg)))
        except FileExistsError:
            raise FileExistsError(
                f"{run_dir} already holds a trial ({config_file} exists); each trial needs its own "
                f"directory: choose another hydra.run.dir (or hydra.sweep.dir)"
            ) from None
        try:
            tags = record_tags(cfg, computation, world) | {"run_dir": str(run_dir.resolve())}
            if claims:
                tags["claim_slots"] = str(t.claim_slots)
            tracker.start(trial_name(cfg), tags, record_params(cfg))
            if claims:
                reason = liveness.claim_new_run(tracker.client, tracker.experiment_id, tracker.run_id, *claim)
                if reason:
                    tracker.discard()
                    raise ClaimedElsewhere(f"{reason}; rerun=true runs it anyway")
        except BaseException as error:
            config_file.unlink(missing_ok=True)
            if tracker.run_id is not None and not isinstance(error, ClaimedElsewhere):
                with contextlib.suppress(Exception):  # the original error is the one to report
                    tracker.end("FAILED", {liveness.REASON_TAG: f"could not start: {type(error).__name__}: {error}"})
            raise
        tracker.log_artifact(config_file)
        (run_dir / checkpoint.RUN_ID_FILE).write_text(tracker.run_id + "\n")
    tracker.watch = liveness.Watch(tracker.client, tracker.experiment_id, tracker.run_id, claim if claims else None)
    return tracker


# Overrides a run's name leaves out: the seeds, interventions, scale and study it already names, and what does not
# change the computation (config_hash's bookkeeping keys).
NAMED_ELSEWHERE = ("seed", "train_seed", "data.seed", "intervention", "scale", "study", "sweep", "hydra")


def trial_name(cfg: TrialConfig, overrides: list[str] | None = None) -> str:
    """The run's name in `mlflow ui`: its study, what it tests, its seeds, its scale, and the command line's or the
    study's overrides that change its computation, e.g. `quick: no_dropout s42 smoke max_steps=40`. `overrides`
    default to the Hydra job's."""
    seeds = [
        f"s{cfg.seed}",
        *([] if cfg.train_seed is None else [f"t{cfg.train_seed}"]),
        *([] if cfg.data.seed is None else [f"d{cfg.data.seed}"]),
    ]
    changes = computation_overrides(job_overrides() if overrides is None else overrides)
    name = " ".join([intervention_tag(cfg.interventions), *seeds, cfg.scale, *changes])
    return f"{cfg.study}: {name}" if cfg.study else name


def job_overrides() -> list[str]:
    """The running Hydra job's overrides (the command line's and, in a study, the study's); [] outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def computation_overrides(overrides: list[str]) -> list[str]:
    """`key=value` overrides that change what a trial computes, each shortened to its last key part
    (`trainer.max_steps=40` → `max_steps=40`)."""
    kept = {}  # the last setting of a key is the one that holds
    for override in overrides:
        key, separator, value = override.lstrip("+~").partition("=")
        if not separator:
            continue
        if any(key == skip or key.startswith(f"{skip}.") for skip in (*NAMED_ELSEWHERE, *BOOKKEEPING_KEYS)):
            continue
        kept.pop(key, None)
        kept[key] = f"{key.rsplit('.', 1)[-1]}={value}"
    return list(kept.values())


def record_params(cfg: TrialConfig) -> dict:
    """The flattened resolved config; `interventions` written as the `intervention` tag is (`a+b`, `baseline`)."""
    return flatten(as_dict(cfg)) | {"interventions": intervention_tag(cfg.interventions)}


def record_tags(cfg: TrialConfig, computation: str, world: int) -> dict[str, str]:
    tags = {
        "intervention": intervention_tag(cfg.interventions),
        "seed": str(cfg.seed),
        "train_seed": "none" if cfg.train_seed is None else str(cfg.train_seed),
        "data_seed": "none" if cfg.data.seed is None else str(cfg.data.seed),
        "config_hash": computation,
        "scale": cfg.scale,
        "world_size": str(world),
        "host": socket.gethostname(),
        "code_version": code_version(),
    }
    if cfg.study:
        tags["study"] = cfg.study
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    return tags


def start_line(cfg: TrialConfig, tracker: Tracker) -> str:
    """The terminal's first line about the trial: its name, interventions, seeds, scale, steps and UI link."""
    from harness.progress import trial_start_line
    from harness.tracking.store import ui_url

    seeds = {"seed": cfg.seed, "train_seed": cfg.train_seed, "data_seed": cfg.data.seed}
    url = ui_url(tracker.uri, tracker.experiment_id, tracker.run_id)
    return trial_start_line(
        trial_name(cfg), intervention_tag(cfg.interventions), seeds, cfg.scale, cfg.trainer.max_steps, cfg.study, url
    )


def end_line(cfg: TrialConfig, tracker: Tracker, test_loss: float, train_seconds: float) -> str:
    """The terminal's last line about the trial: its test loss and, in a study, how far the study is."""
    from harness.progress import trial_end_line

    return trial_end_line(trial_name(cfg), test_loss, train_seconds, study_standing(cfg, tracker))


def study_standing(cfg: TrialConfig, tracker: Tracker) -> str:
    """Where the trial's study stands with this trial FINISHED: `study quick: 3 of 6 trials FINISHED …`."""
    parent = cfg.tracking.parent_run_id
    if not parent:
        return "not part of a study (compare it with others: +sweep=quick runs a study, docs/studies.md)"
    try:
        client = tracker.client
        planned = client.get_run(parent).data.params.get("trials", "?")
        children = client.search_runs(
            [tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'FINISHED'"
        )
        finished = len({r.info.run_id for r in children} | {tracker.run_id})
    except Exception as error:  # the line must not fail a finished trial
        return f"study {cfg.study}: where it stands is unknown ({type(error).__name__}: {error})"
    return (
        f"study {cfg.study}: {finished} of {planned} trials FINISHED (earlier executions' included); "
        "its verdicts come when the last one ends"
    )
