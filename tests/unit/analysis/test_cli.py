"""End to end: a synthetic study in a real MLflow sqlite store, analysed by the CLI."""

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis.__main__ import main
from analysis.load import load_mlflow_study
from analysis.synthetic import (
    NoiseModel,
    PlantedIntervention,
    SyntheticStudy,
    generate_study,
    log_study_to_mlflow,
)
from tests.conftest import new_store, run_in_process

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEMO_INTERVENTIONS = [
    PlantedIntervention("no_dropout", -0.04),
    PlantedIntervention("qkv_bias", 0.0, changes_init=True),
    PlantedIntervention("weight_decay", 0.04),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with study ``demo`` (one FAILED run) and ``orphans`` (no baseline)."""
    root = tmp_path_factory.mktemp("store")
    uri = new_store(root / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        demo = generate_study(
            DEMO_INTERVENTIONS,
            init_seeds=(42, 22, 67, 7),
            failed_runs=1,
            noise=NoiseModel(init_sd=0.02, train_sd=0.005),
        )
        log_study_to_mlflow(demo, "demo", "trials", uri, artifact_location=str(root / "artifacts"))
        orphans = generate_study([PlantedIntervention("no_dropout", -0.01)], periods=3)
        arm_only = orphans.runs[orphans.runs["intervention"] != "baseline"]
        log_study_to_mlflow(SyntheticStudy(arm_only, orphans.histories, orphans.noise), "orphans", "trials", uri)
    return uri


@pytest.fixture
def study_store(store, monkeypatch, tmp_path):
    """The module's store as MLFLOW_TRACKING_URI, run from an empty directory."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    return store


def test_cli_analyses_an_mlflow_study_and_logs_an_analysis_run(study_store, tmp_path):
    out = tmp_path / "report"
    result = run_in_process(
        "analyze", "study=demo", f"out={out}", "min_effect=0.005", "resamples=999", cwd=tmp_path, env_uri=study_store
    )

    trials = mlflow.search_runs(experiment_names=["trials"], filter_string="tags.study = 'demo'")
    failed = trials[trials["status"] == "FAILED"]
    assert len(failed) == 1
    failed_id = failed["run_id"].iloc[0]
    assert f"excluded {failed_id}" in result.stdout
    assert "34 runs analysed, 1 excluded" in result.stdout
    assert result.stdout.index("no_dropout") < result.stdout.index("weight_decay")

    ranking = pd.read_csv(out / "ranking.csv").set_index("intervention")
    assert ranking.loc["no_dropout", "verdict"] == "better"
    assert ranking.loc["weight_decay", "verdict"] == "worse"
    assert ranking.loc["no_dropout", "noise_reference"] == "train"
    assert ranking.loc["qkv_bias", "noise_reference"] == "init"
    assert ranking.loc["qkv_bias", "reference_reason"] == "init_fingerprint differs from baseline"
    ci_width = ranking["ci_high"] - ranking["ci_low"]
    assert ci_width["qkv_bias"] > 2 * ci_width["no_dropout"]  # init noise does not cancel

    markdown = (out / "report.md").read_text()
    assert f"| {ranking.loc['no_dropout', 'baseline_loss']:.6f} |" in markdown
    assert failed_id in markdown and "status FAILED" in markdown
    assert "### Variance components (grid)" in markdown
    html = (out / "report.html").read_text()
    assert html.count("<table") >= 3 and 'src="figures/forest.png"' in html
    for name in ("training_loss", "forest", "noise"):
        assert (out / "figures" / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)

    analysis_runs = mlflow.search_runs(experiment_names=["trials"], filter_string="tags.analysis = 'true'")
    assert len(analysis_runs) == 1
    logged = analysis_runs.iloc[0]
    assert logged["tags.study"] == "demo" and logged["status"] == "FINISHED"
    assert logged["metrics.n_runs"] == 34 and logged["metrics.n_excluded"] == 1
    for verdict in ("better", "worse", "inconclusive"):
        assert logged[f"metrics.n_{verdict}"] == (ranking["verdict"] == verdict).sum()
    assert logged["tags.thin_evidence"] == "false" and logged["metrics.n_thin_evidence"] == 0
    artifacts = {a.path for a in MlflowClient().list_artifacts(logged["run_id"])}
    assert {"report.md", "report.html", "ranking.csv", "figures"} <= artifacts

    # It is nested under the study's parent run, whose description shows each verdict with its interval.
    parent = mlflow.search_runs(
        experiment_names=["trials"], filter_string="tags.study_parent = 'true' and tags.study = 'demo'"
    )
    assert logged["tags.mlflow.parentRunId"] == parent["run_id"].iloc[0]
    note = MlflowClient().get_run(parent["run_id"].iloc[0]).data.tags["mlflow.note.content"]
    row = ranking.loc["no_dropout"]
    assert note.startswith("### Verdicts") and f"Analysis run {logged['run_id']}" in note
    # the interval the verdict is decided on: the Holm-adjusted one, as ranking.csv has it
    assert (
        f"| no_dropout | better | {row['difference']:.6f} | [{row['holm_low']:.6f}, {row['holm_high']:.6f}] |" in note
    )

    # The analysis run carries study=demo but is not a trial of the study.
    reloaded = load_mlflow_study("demo", with_histories=False)
    assert logged["run_id"] not in set(reloaded.runs["run_id"])
    assert len(reloaded.runs) == 34


def test_loading_and_logging_leave_the_callers_mlflow_uri_alone(store, tmp_path, monkeypatch):
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    study_runs = load_mlflow_study("demo", tracking_uri=store, with_histories=False)
    assert len(study_runs.runs) == 34 and study_runs.tracking_uri == store
    assert mlflow.get_tracking_uri() == elsewhere
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'later.db'}")
    assert mlflow.get_tracking_uri().endswith("later.db")  # not pinned by the analysis
    assert not (tmp_path / "elsewhere.db").exists()


def test_unknown_study_lists_the_studies_found(study_store, tmp_path, capsys):
    assert main(["study=nope", f"out={tmp_path}"]) == 2
    error = capsys.readouterr().err
    assert "unknown study 'nope'" in error and "demo, orphans" in error


def test_study_without_baseline_runs_says_so(study_store, tmp_path, capsys):
    assert main(["study=orphans", f"out={tmp_path}"]) == 2
    error = capsys.readouterr().err
    assert "no finished baseline runs" in error and "no_dropout" in error


def test_unknown_experiment_lists_the_experiments(study_store, tmp_path, capsys):
    assert main(["study=demo", "experiment=missing", f"out={tmp_path}"]) == 2
    assert "experiments found: " in capsys.readouterr().err


def test_missing_store_is_reported_without_creating_it(tmp_path, capsys):
    absent = tmp_path / "absent.db"
    assert main(["study=demo", f"tracking_uri=sqlite:///{absent}"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not absent.exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["study"], "arguments are key=value"),
        (["study=demo", "colour=red"], "unknown key 'colour'"),
        (["study=demo", "alpha=lots"], "alpha must be a float"),
        (["study=demo", "alpha=0.9"], "alpha=0.9 is outside"),
        (["study=demo", "log=maybe"], "log must be auto, true or false"),
        (["min_effect=0.01"], "study=NAME (or csv=FILE) is required"),
    ],
)
def test_bad_arguments_are_explained(arguments, message, study_store, capsys):
    assert main(arguments) == 2
    assert message in capsys.readouterr().err


def _write_csv_study(directory: Path) -> tuple[Path, Path]:
    study = generate_study(
        [PlantedIntervention("no_dropout", -0.04), PlantedIntervention("qkv_bias", 0.0, changes_init=True)],
        init_seeds=(1, 2, 3, 4),
        failed_runs=1,
        periods=6,
    )
    runs_csv, history_csv = directory / "sweep.csv", directory / "sweep_history.csv"
    study.runs.drop(columns="init_fingerprint").to_csv(runs_csv, index=False)
    study.histories.to_csv(history_csv, index=False)
    return runs_csv, history_csv


def test_csv_input_is_analysed_without_mlflow(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'unused.db'}")
    runs_csv, history_csv = _write_csv_study(tmp_path)
    out = tmp_path / "out"
    assert main([f"csv={runs_csv}", f"history={history_csv}", f"out={out}", "resamples=999"]) == 0
    printed = capsys.readouterr().out
    assert "study sweep:" in printed and "logged analysis run" not in printed
    ranking = pd.read_csv(out / "ranking.csv").set_index("intervention")
    assert ranking.loc["no_dropout", "reference_reason"] == "changes_init=false"
    assert ranking.loc["qkv_bias", "noise_reference"] == "init"
    assert (out / "figures" / "training_loss.png").exists()
    assert not (tmp_path / "unused.db").exists()


def test_csv_input_can_be_logged_to_a_named_experiment(study_store, tmp_path):
    runs_csv, _ = _write_csv_study(tmp_path)
    arguments = [
        f"csv={runs_csv}",
        "study=sweep",
        f"out={tmp_path / 'out'}",
        "log=true",
        f"tracking_uri={study_store}",
        "experiment=csv-analyses",
        "resamples=999",
    ]
    assert main(arguments) == 0
    logged = mlflow.search_runs(experiment_names=["csv-analyses"])
    assert list(logged["tags.analysis"]) == ["true"] and list(logged["tags.study"]) == ["sweep"]


def test_thin_evidence_is_flagged_on_the_mlflow_analysis_run(study_store, tmp_path):
    table = generate_study(
        [PlantedIntervention("no_dropout", -0.02), PlantedIntervention("qkv_bias", -0.02, changes_init=True)],
        baseline_cells=[(s, t) for s in (42, 22, 67) for t in ("none", 23)],
        intervention_cells=[(42, "none")],
        baseline_repeats=1,
        periods=3,
    ).runs
    runs_csv = tmp_path / "one_run_each.csv"
    table.to_csv(runs_csv, index=False)
    arguments = [
        f"csv={runs_csv}",
        f"out={tmp_path / 'out'}",
        "log=true",
        f"tracking_uri={study_store}",
        "experiment=thin",
        "resamples=999",
    ]
    assert main(arguments) == 0
    logged = mlflow.search_runs(experiment_names=["thin"]).iloc[0]
    assert logged["tags.thin_evidence"] == "true"
    assert logged["tags.thin_evidence_interventions"] == "qkv_bias"  # init noise: 2 dof
    assert logged["metrics.n_thin_evidence"] == 1


def test_csv_missing_columns_are_named(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"intervention": ["baseline"], "seed": [1], "loss": [3.3]}).to_csv(path)
    assert main([f"csv={path}", f"out={tmp_path}"]) == 2
    error = capsys.readouterr().err
    assert "missing columns: train_seed, test_loss, init_fingerprint or changes_init" in error
