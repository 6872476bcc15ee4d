"""Load the trial runs of a study from MLflow or from a CSV file into one normalised table (one row per run).

Columns: ``run_id, intervention, seed, train_seed, data_seed, init_fingerprint, changes_init, status, test_loss,
order, config_hash, cpu_threads`` and the HellaSwag scores (NaN where a run has none); ``intervention`` names the
arm (the tag, split where its runs computed different configs). Runs not FINISHED or without a finite ``test_loss``
go to an ``excluded`` table with the reason. The
columns are described in docs/analysis.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.config.compose import BOOKKEEPING_KEYS
from harness.config.schema import STUDY_TAG
from harness.paths import default_tracking_uri
from interventions import BASELINE

REQUIRED_COLUMNS = ("intervention", "seed", "train_seed", "test_loss")
INIT_COLUMNS = ("init_fingerprint", "changes_init")
HISTORY_METRICS = ("train_loss_avg", "train_loss")
RUN_COLUMNS = (
    "run_id",
    "intervention",
    "seed",
    "train_seed",
    "data_seed",
    "init_fingerprint",
    "changes_init",
    "status",
    "test_loss",
    "order",
    "config_hash",
    "cpu_threads",
    "hellaswag_acc",
    "hellaswag_acc_norm",
    "hellaswag_examples",
)
SCORE_COLUMNS = ("hellaswag_acc", "hellaswag_acc_norm", "hellaswag_examples")  # optional metrics besides test_loss
EXCLUDED_COLUMNS = ("run_id", "intervention", "seed", "train_seed", "status", "reason")
HISTORY_COLUMNS = ("run_id", "metric", "step", "value")
PARAM_PREFIX = "params."  # a run's flattened resolved config, one column per key
SEED_KEYS = ("seed", "train_seed", "data.seed", "interventions")  # the seeds, and the tag itself
UNSET = "unset"


class AnalysisInputError(ValueError):
    """The input cannot be analysed; the message says why and what to do."""


@dataclass
class StudyRuns:
    """The analysable runs of one study plus what was left out."""

    study: str
    source: str
    runs: pd.DataFrame
    excluded: pd.DataFrame
    histories: pd.DataFrame
    tracking_uri: str | None = None
    experiment_id: str | None = None
    warnings: list[str] = field(default_factory=list)  # one line each, shown by the CLI and in the report


def check_study_name(study: str) -> str:
    """A study name is a tag (it names the report's folder): letters, digits, '_', '.' or '-'."""
    if not STUDY_TAG.fullmatch(study):
        raise AnalysisInputError(f"study={study!r} is not a study tag; allowed: letters, digits, '_', '.' or '-'")
    return study


@contextmanager
def mlflow_store(tracking_uri: str) -> Iterator:
    """MLflow's fluent API pointed at ``tracking_uri`` for the block only.

    ``mlflow.set_tracking_uri`` is global and also sets MLFLOW_TRACKING_URI,
    so the previous state is restored afterwards: the analysis must not
    redirect other MLflow users in the same process (notebooks, tests).
    """
    import mlflow

    previous_uri = mlflow.get_tracking_uri()
    previous_variable = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(None)
        _restore_variable("MLFLOW_TRACKING_URI", previous_variable)
        if mlflow.get_tracking_uri() != previous_uri:
            mlflow.set_tracking_uri(previous_uri)
            _restore_variable("MLFLOW_TRACKING_URI", previous_variable)


def _restore_variable(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def load_mlflow_study(
    study: str,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    with_histories: bool = True,
) -> StudyRuns:
    """Load the runs tagged ``study=<study>`` via ``mlflow.search_runs``.

    Searches ``experiment`` (a name) or, when not given, every experiment.
    Study parent runs (``study_parent=true``) and earlier analysis runs
    (``analysis=true``) are not trial runs and are skipped.  The runs must be
    of one experiment and one scale (the harness keeps one experiment per
    scale): a study tag found in several is refused, naming them.
    """
    check_study_name(study)
    tracking_uri = tracking_uri or default_tracking_uri()
    _require_existing_sqlite_store(tracking_uri)
    with mlflow_store(tracking_uri) as mlflow:
        search_scope = _search_scope(mlflow, experiment, tracking_uri)
        found = mlflow.search_runs(filter_string=f"tags.study = '{study}'", **search_scope)
    found = _trial_runs(found)
    if found.empty:
        known = list_mlflow_studies(tracking_uri, experiment)
        listing = ", ".join(known) if known else "none"
        raise AnalysisInputError(f"unknown study {study!r} in {tracking_uri}; studies found: {listing}")
    _require_one_experiment_and_scale(found, study, tracking_uri)
    frame = _frame_from_mlflow(found)
    experiment_id = str(found["experiment_id"].iloc[0])
    study_runs = prepare_runs(frame, study, source=tracking_uri)
    if with_histories:
        study_runs.histories = _mlflow_histories(tracking_uri, study_runs.runs["run_id"])
    study_runs.tracking_uri = tracking_uri
    study_runs.experiment_id = experiment_id
    return study_runs


def list_mlflow_studies(tracking_uri: str, experiment: str | None = None) -> list[str]:
    """Names of the studies (``study`` tags of trial runs) in the store."""
    with mlflow_store(tracking_uri) as mlflow:
        found = _trial_runs(mlflow.search_runs(**_search_scope(mlflow, experiment, tracking_uri)))
    if "tags.study" not in found:
        return []
    return sorted(found["tags.study"].dropna().unique())


def load_csv_study(path: str | Path, study: str | None = None, history_path: str | Path | None = None) -> StudyRuns:
    """Load runs from a CSV with the columns of :data:`REQUIRED_COLUMNS`.

    Also needs ``init_fingerprint`` or a boolean ``changes_init``; ``status``,
    ``run_id``, ``data_seed`` and ``study`` are optional.  When the CSV has a
    ``study`` column, only that study's rows are used.  ``history_path`` is an
    optional long-format CSV (``run_id, step, value`` and optionally
    ``metric``, default ``train_loss_avg``) with the training-loss histories.
    """
    path = Path(path)
    if not path.is_file():
        raise AnalysisInputError(f"CSV file not found: {path}")
    frame = pd.read_csv(path)
    if study is None and not STUDY_TAG.fullmatch(path.stem):
        raise AnalysisInputError(f"CSV file name {path.stem!r} is not a study tag; name the study: study=NAME")
    study = check_study_name(study or path.stem)
    if "study" in frame:
        studies = sorted(frame["study"].dropna().astype(str).unique())
        if study not in studies:
            raise AnalysisInputError(f"unknown study {study!r} in {path}; studies found: {', '.join(studies)}")
        frame = frame[frame["study"].astype(str) == study]
    frame, duplicates = _without_duplicate_rows(frame, path)
    histories = _read_history_csv(history_path) if history_path else None
    study_runs = prepare_runs(frame, study, source=str(path), histories=histories)
    study_runs.warnings += duplicates
    return study_runs


def _without_duplicate_rows(frame: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per run: repeated rows are dropped with a warning (a repeated run_id must repeat its whole row)."""
    if "run_id" in frame:
        repeated = frame[frame.duplicated("run_id", keep=False)]
        conflicting = repeated.drop_duplicates().duplicated("run_id", keep=False)
        if conflicting.any():
            run_id = repeated.drop_duplicates()[conflicting]["run_id"].iloc[0]
            raise AnalysisInputError(
                f"run_id {run_id!r} is on several rows of {path} with different values; one row per run is allowed"
            )
        duplicated = frame.duplicated("run_id")
        how = "rows repeating a run_id"
    else:
        duplicated = frame.duplicated()
        how = (
            "rows identical to an earlier row (without a run_id column a copied row cannot be told from an exact "
            "repeat; add run_id to keep exact repeats)"
        )
    if not duplicated.any():
        return frame, []
    kept = frame[~duplicated]
    return kept, [f"{path}: dropped {int(duplicated.sum())} {how}; {len(kept)} runs remain"]


def prepare_runs(
    frame: pd.DataFrame,
    study: str,
    source: str,
    histories: pd.DataFrame | None = None,
) -> StudyRuns:
    """Validate and normalise a run table; split off the runs not to analyse."""
    _check_columns(frame)
    frame = frame.reset_index(drop=True)
    runs = pd.DataFrame(
        {
            "run_id": _column_or(frame, "run_id", [f"row{i}" for i in range(len(frame))]).astype(str),
            "intervention": frame["intervention"].map(_intervention_label),
            "seed": _init_seeds(frame["seed"]),
            "train_seed": frame["train_seed"].map(_seed_label),
            "data_seed": _column_or(frame, "data_seed", "none").map(_seed_label),
            "init_fingerprint": _column_or(frame, "init_fingerprint", None),
            "changes_init": _changes_init(frame),
            "status": _column_or(frame, "status", "FINISHED").astype(str).str.upper(),
            "test_loss": pd.to_numeric(frame["test_loss"], errors="coerce").astype(float),
            "order": pd.to_numeric(_column_or(frame, "order", np.arange(len(frame)))),
            "config_hash": _column_or(frame, "config_hash", "none").map(_text_label),
            "cpu_threads": _column_or(frame, "cpu_threads", "none").map(_seed_label),
            **{
                column: pd.to_numeric(_column_or(frame, column, np.nan), errors="coerce").astype(float)
                for column in SCORE_COLUMNS
            },
        }
    )
    runs = runs.sort_values("order", kind="stable")
    config = computation_config(frame).loc[runs.index].reset_index(drop=True)
    runs = runs.reset_index(drop=True)
    reason = pd.Series("", index=runs.index)
    reason[~np.isfinite(runs["test_loss"])] = "no finite test_loss"
    reason[runs["status"] != "FINISHED"] = "status " + runs["status"]
    excluded = runs[reason != ""].assign(reason=reason[reason != ""])
    analysed = runs[reason == ""]
    if analysed.empty:
        raise AnalysisInputError(
            f"study {study!r} has no FINISHED runs with a finite test_loss ({len(excluded)} excluded)"
        )
    tags = analysed["intervention"]
    analysed = analysed.assign(intervention=arms_by_computation(tags, config.loc[analysed.index], study))
    split = analysed.groupby(tags)["intervention"].unique()
    notes = [
        f"runs tagged {tag} computed {len(arms)} different configs, analysed as separate arms: {', '.join(sorted(arms))}"
        for tag, arms in split.items()
        if len(arms) > 1
    ]
    analysed = analysed.reset_index(drop=True)
    if not (analysed["intervention"] == BASELINE).any():
        found = ", ".join(sorted(analysed["intervention"].unique()))
        raise AnalysisInputError(
            f"study {study!r} has no finished baseline runs (intervention={BASELINE!r}); interventions found: {found}"
        )
    if histories is None:
        histories = pd.DataFrame(columns=list(HISTORY_COLUMNS))
    histories = histories[histories["run_id"].astype(str).isin(analysed["run_id"])]
    return StudyRuns(
        study=study,
        source=source,
        runs=analysed[list(RUN_COLUMNS)],
        excluded=excluded[list(EXCLUDED_COLUMNS)].reset_index(drop=True),
        histories=histories,
        warnings=notes,
    )


def computation_config(frame: pd.DataFrame) -> pd.DataFrame:
    """The ``params.*`` columns that say what a run computed: its seeds and the bookkeeping keys left out."""

    def computed(key: str) -> bool:
        return key not in SEED_KEYS and not any(key == b or key.startswith(f"{b}.") for b in BOOKKEEPING_KEYS)

    keys = [c for c in frame.columns if str(c).startswith(PARAM_PREFIX) and computed(c[len(PARAM_PREFIX) :])]
    config = frame[sorted(keys)].astype(object)
    config = config.where(config.notna(), UNSET).astype(str)
    return config.rename(columns=lambda c: c[len(PARAM_PREFIX) :])


def arms_by_computation(tags: pd.Series, config: pd.DataFrame, study: str) -> pd.Series:
    """Each run's arm: its intervention tag, or ``tag[key=value,...]`` where runs under one tag computed different
    configs (named by the keys that differ under the tag). Of baseline variants, the one whose values the other
    arms' runs share is ``baseline``; with none or several such, the study is refused (docs/analysis.md)."""
    if config.empty:
        return tags
    computation = pd.Series(pd.util.hash_pandas_object(config, index=False).to_numpy(), index=tags.index)
    split = computation.groupby(tags).nunique()
    arms = tags.copy()
    for tag in split.index[split > 1]:
        rows = tags.index[tags == tag]
        differing = [key for key in config.columns if config.loc[rows, key].nunique() > 1]
        arms.loc[rows] = tag + "[" + _assignments(config.loc[rows, differing]) + "]"
        if tag == BASELINE:
            arms.loc[rows] = _name_the_baseline(arms.loc[rows], config.loc[tags != tag, differing], study)
    return arms


def _assignments(config: pd.DataFrame) -> pd.Series:
    return pd.Series(
        [",".join(f"{key}={value}" for key, value in zip(config.columns, row, strict=True)) for row in config.values],
        index=config.index,
    )


def _name_the_baseline(variants: pd.Series, others: pd.DataFrame, study: str) -> pd.Series:
    """The baseline variant the other arms' runs were computed with keeps the name ``baseline``."""
    prefix = f"{BASELINE}["
    shared = _assignments(others).map(lambda text: f"{prefix}{text}]")
    matched = sorted(set(shared) & set(variants))
    if len(matched) != 1:
        counts = variants.value_counts().sort_index()
        listing = "; ".join(f"{name.removeprefix(prefix)[:-1]}: {n} runs" for name, n in counts.items())
        which = "none" if not matched else f"{len(matched)}"
        raise AnalysisInputError(
            f"study {study!r}: the runs tagged {BASELINE} computed {len(counts)} different configs ({listing}) and "
            f"the other arms' runs match {which} of them, so none is the baseline; give each config its own study "
            "tag, or run the others as interventions"
        )
    return variants.where(variants != matched[0], BASELINE)


def _check_columns(frame: pd.DataFrame) -> None:
    missing = [column for column in REQUIRED_COLUMNS if column not in frame]
    if not any(column in frame for column in INIT_COLUMNS):
        missing.append(" or ".join(INIT_COLUMNS))
    if missing:
        raise AnalysisInputError(f"missing columns: {', '.join(missing)} (found: {', '.join(map(str, frame.columns))})")


def _column_or(frame: pd.DataFrame, column: str, default) -> pd.Series:
    if column in frame:
        return frame[column]
    return pd.Series(default, index=range(len(frame)), dtype=object)


def _intervention_label(value) -> str:
    names = sorted(part.strip() for part in str(value).split("+") if part.strip())
    return "+".join(names) if names else BASELINE


def _init_seeds(values: pd.Series) -> pd.Series:
    seeds = pd.to_numeric(values, errors="coerce")
    if seeds.isna().any() or (seeds != seeds.round()).any():
        bad = values[seeds.isna() | (seeds != seeds.round())]
        raise AnalysisInputError(f"column seed must hold integer init seeds; got {sorted(map(str, bad.unique()))}")
    return seeds.astype(int)


def _seed_label(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "none"
    text = str(value).strip()
    if text.lower() in ("", "none", "nan", "null"):
        return "none"
    try:
        return str(int(float(text)))
    except ValueError:
        return text


def _text_label(value) -> str:
    return "none" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()


def _changes_init(frame: pd.DataFrame) -> pd.Series:
    if "changes_init" not in frame:
        return pd.Series(None, index=range(len(frame)), dtype=object)
    truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    text = frame["changes_init"].astype(str).str.strip().str.lower()
    text = text.str.replace(r"\.0$", "", regex=True)
    parsed = text.map(truth)
    if parsed.isna().any():
        raise AnalysisInputError(f"column changes_init must be boolean; got {sorted(text[parsed.isna()].unique())}")
    return parsed.astype(object)


def _require_existing_sqlite_store(tracking_uri: str) -> None:
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not Path(tracking_uri[len(prefix) :]).is_file():
        raise AnalysisInputError(
            f"no MLflow store at {tracking_uri}; run a study first, or pass tracking_uri=... or csv=..."
        )


def _search_scope(mlflow, experiment: str | None, tracking_uri: str) -> dict:
    if experiment is None:
        return {"search_all_experiments": True}
    if mlflow.get_experiment_by_name(experiment) is None:
        names = sorted(e.name for e in mlflow.search_experiments())
        raise AnalysisInputError(
            f"unknown experiment {experiment!r} in {tracking_uri}; experiments found: {', '.join(names) or 'none'}"
        )
    return {"experiment_names": [experiment]}


def _require_one_experiment_and_scale(found: pd.DataFrame, study: str, tracking_uri: str) -> None:
    """Trials of two scales are never compared: the same study tag in two experiments (scales) is refused."""
    experiment_ids = sorted(found["experiment_id"].astype(str).unique())
    if len(experiment_ids) > 1:
        with mlflow_store(tracking_uri) as mlflow:
            names = [mlflow.get_experiment(i).name for i in experiment_ids]
        counts = found["experiment_id"].astype(str).value_counts()
        listing = ", ".join(f"{name} ({counts[i]} runs)" for i, name in zip(experiment_ids, names, strict=True))
        raise AnalysisInputError(
            f"study {study!r} has runs in {len(names)} experiments: {listing}; each experiment holds one "
            f"scale, so analyse one of them: experiment={names[0]}"
        )
    scales = sorted(found["tags.scale"].dropna().unique()) if "tags.scale" in found else []
    if len(scales) > 1:
        raise AnalysisInputError(
            f"study {study!r} mixes runs of scales {', '.join(scales)}; trials of different scales are not "
            "comparable: give each scale its own study tag (study=NAME) or experiment (tracking.experiment=NAME)"
        )


def _trial_runs(found: pd.DataFrame) -> pd.DataFrame:
    """Drop study parent runs and analysis runs, which are not trials."""
    keep = pd.Series(True, index=found.index)
    for marker in ("tags.study_parent", "tags.analysis"):
        if marker in found:
            keep &= found[marker].astype(str).str.lower() != "true"
    return found[keep]


def _frame_from_mlflow(found: pd.DataFrame) -> pd.DataFrame:
    tag_columns = {
        "intervention": "tags.intervention",
        "seed": "tags.seed",
        "train_seed": "tags.train_seed",
        "data_seed": "tags.data_seed",
        "init_fingerprint": "tags.init_fingerprint",
    }
    missing = [tag for column, tag in tag_columns.items() if tag not in found and column != "data_seed"]
    if missing:
        raise AnalysisInputError(f"missing columns: {', '.join(missing)} (MLflow run tags)")
    frame = pd.DataFrame({column: found[tag] for column, tag in tag_columns.items() if tag in found})
    for column in ("config_hash", "cpu_threads"):
        if f"tags.{column}" in found:
            frame[column] = found[f"tags.{column}"]
    params = [c for c in found.columns if c.startswith(PARAM_PREFIX)]
    frame = pd.concat([frame, found[params]], axis=1)
    frame["run_id"] = found["run_id"]
    frame["status"] = found["status"]
    frame["test_loss"] = found["metrics.test_loss"] if "metrics.test_loss" in found else np.nan
    for column in SCORE_COLUMNS:
        frame[column] = found[f"metrics.{column}"] if f"metrics.{column}" in found else np.nan
    frame["order"] = found["start_time"].rank(method="first")
    return frame.reset_index(drop=True)


def _mlflow_histories(tracking_uri: str, run_ids: pd.Series) -> pd.DataFrame:
    """The per-checkpoint ``train_loss_avg`` history of each run.

    Runs that never logged it fall back to their per-step ``train_loss``.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    rows = []
    for run_id in run_ids:
        for metric in HISTORY_METRICS:
            history = client.get_metric_history(run_id, metric)
            if history:
                rows += [(run_id, metric, m.step, m.value) for m in history]
                break
    return pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))


def _read_history_csv(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise AnalysisInputError(f"history CSV file not found: {path}")
    history = pd.read_csv(path)
    missing = [c for c in ("run_id", "step", "value") if c not in history]
    if missing:
        raise AnalysisInputError(f"missing columns in {path}: {', '.join(missing)}")
    if "metric" not in history:
        history["metric"] = "train_loss_avg"
    history["run_id"] = history["run_id"].astype(str)
    return history[list(HISTORY_COLUMNS)]
