"""Command line: ``python -m analysis study=<name> [key=value ...]``.

Prints the ranking, writes the report into the output directory and, for
MLflow input, logs it as an ``analysis`` run in the same store, nested under
the study's parent run, whose description then shows the verdicts.
"""

from __future__ import annotations

import sys
from pathlib import Path

from analysis.load import AnalysisInputError, check_study_name, load_csv_study, load_mlflow_study
from harness.arguments import split
from harness.paths import PROJECT_ROOT, default_tracking_uri

REPORTS = PROJECT_ROOT / "reports"
USAGE = """\
usage: python -m analysis study=NAME [key=value ...]

  study=NAME        the study to analyse (the runs' `study` tag); with csv= it
                    defaults to the CSV file name
  tracking_uri=URI  MLflow store (default: $MLFLOW_TRACKING_URI, else
                    sqlite:///<project>/mlflow.db)
  experiment=NAME   MLflow experiment to search (default: all experiments; a
                    study's runs must be in one, e.g. harness/smoke)
  csv=PATH          analyse this CSV instead (columns intervention, seed,
                    train_seed, test_loss and init_fingerprint or changes_init;
                    optional status, run_id, data_seed, study, config_hash,
                    cpu_threads and params.<key> config columns)
  history=PATH      CSV of training-loss histories for csv= input
                    (run_id, step, value[, metric])
  out=DIR           output directory (default: <project>/reports/<study>)
  metric=NAME       the verdicts printed: test_loss (default), hellaswag_acc_norm
                    or hellaswag_acc (higher is better); the report shows both
  min_effect=X      minimum meaningful difference in test loss (default 0)
  alpha=X           significance level; CIs are 1-alpha (default 0.05)
  final_periods=N   checkpoint periods for checkpoint noise (default 5)
  resamples=N       bootstrap resamples (default 9999)
  log=auto|true|false  log the report as an MLflow run (auto: for MLflow input)
"""

KEYS = (
    "study",
    "tracking_uri",
    "experiment",
    "csv",
    "history",
    "out",
    "min_effect",
    "metric",
    "alpha",
    "final_periods",
    "resamples",
    "log",
)


def parse_arguments(argv: list[str]) -> dict[str, str]:
    given = split(argv, KEYS)
    for argument in given.rest:
        key, separator, _ = argument.partition("=")
        if not separator:
            raise AnalysisInputError(f"arguments are key=value, got {argument!r} (python -m analysis --help)")
        raise AnalysisInputError(f"unknown key {key!r}; known keys: {', '.join(KEYS)}")
    options = given.settings
    if "study" not in options and "csv" not in options:
        raise AnalysisInputError("study=NAME (or csv=FILE) is required (python -m analysis --help)")
    if "study" in options:
        check_study_name(options["study"])
    return options


def _number(options: dict, key: str, default, kind=float, low=None, high=None):
    text = options.get(key)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise AnalysisInputError(f"{key} must be a {kind.__name__}, got {text!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise AnalysisInputError(f"{key}={value} is outside [{low}, {high}]")
    return value


def settings_from(options: dict):
    from analysis.accuracy import METRICS
    from analysis.study import Settings

    if options.get("metric", "test_loss") not in METRICS:
        raise AnalysisInputError(f"metric={options['metric']}: unknown; allowed: {', '.join(METRICS)}")
    return Settings(
        alpha=_number(options, "alpha", 0.05, float, 1e-6, 0.5),
        min_effect=_number(options, "min_effect", 0.0, float, 0.0),
        final_periods=_number(options, "final_periods", 5, int, 3),
        n_resamples=_number(options, "resamples", 9999, int, 100),
        metric=options.get("metric", "test_loss"),
    )


def run(options: dict) -> int:
    from analysis.accuracy_report import accuracy_text, disagreement_note
    from analysis.report import ranking_text, write_report
    from analysis.study import analyse

    settings = settings_from(options)
    log = options.get("log", "auto").lower()
    if log not in ("auto", "true", "false"):
        raise AnalysisInputError(f"log must be auto, true or false, got {log!r}")
    if "csv" in options:
        study_runs = load_csv_study(options["csv"], options.get("study"), options.get("history"))
    else:
        study_runs = load_mlflow_study(options["study"], options.get("tracking_uri"), options.get("experiment"))
    for warning in study_runs.warnings:
        print(f"analysis: warning: {warning}", file=sys.stderr)
    analysis = analyse(study_runs, settings)
    if options.get("out"):
        files = write_report(analysis, Path(options["out"]))
    else:
        files = write_report(analysis, REPORTS / study_runs.study, reports_root=REPORTS)
    print(f"study {study_runs.study}: {len(study_runs.runs)} runs analysed, {len(study_runs.excluded)} excluded")
    for row in study_runs.excluded.itertuples():
        print(f"  excluded {row.run_id} ({row.intervention}, seed {row.seed}): {row.reason}")
    print(ranking_text(analysis.ranking) if settings.metric == "test_loss" else accuracy_text(analysis.accuracy))
    if analysis.accuracy is not None and disagreement_note(analysis.accuracy):
        print(disagreement_note(analysis.accuracy))
    print(f"report: {files.markdown}  {files.html}  {files.csv}")
    if log == "true" or (log == "auto" and "csv" not in options):
        tracking_uri = options.get("tracking_uri") or study_runs.tracking_uri or default_tracking_uri()
        experiment_id = study_runs.experiment_id or _experiment_id(tracking_uri, options)
        print(log_under_parent(analysis, files, tracking_uri, experiment_id))
    return 0


def log_under_parent(analysis, files, tracking_uri: str, experiment_id: str | None) -> str:
    """Log the report as an analysis run nested under the study's latest parent run (which then shows the
    verdicts), or at the top level when it has none; the line that says where. The notebook logs through this."""
    from analysis.report import log_analysis_run

    parent = study_parent(tracking_uri, experiment_id, analysis.study) if experiment_id else None
    run_id = log_analysis_run(analysis, files, tracking_uri, experiment_id, parent)
    where = (
        f"under the study's parent run {parent} (its verdict tags, metrics and forest.png show the verdicts)"
        if parent
        else "at the top level (the study has no parent run)"
    )
    return f"logged analysis run {run_id} to {tracking_uri}, {where}"


def _experiment_id(tracking_uri: str, options: dict) -> str | None:
    """The experiment for the analysis of CSV input: experiment= (created as the harness creates its
    experiments) or the default one."""
    if "experiment" not in options:
        return None
    from mlflow.tracking import MlflowClient

    from harness.tracking.store import experiment_id

    return experiment_id(MlflowClient(tracking_uri), options["experiment"], tracking_uri)


def study_parent(tracking_uri: str, experiment_id: str, study: str) -> str | None:
    """The study's latest parent run in the experiment, where its analysis is logged; None if it has none."""
    from mlflow.tracking import MlflowClient

    from harness.study.store import latest_parent

    parent = latest_parent(MlflowClient(tracking_uri), experiment_id, study)
    return parent.info.run_id if parent else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0
    try:
        return run(parse_arguments(argv))
    except AnalysisInputError as error:
        print(f"analysis: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
