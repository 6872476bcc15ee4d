"""The notebook runs end to end in a real ``python3`` kernel on a generated study."""

import re

import pandas as pd

from analysis.synthetic import PlantedIntervention, generate_study
from harness.paths import PROJECT_ROOT
from tests.conftest import new_store

NOTEBOOK = PROJECT_ROOT / "analysis" / "noise_analysis.ipynb"


def execute_notebook():
    """The notebook, run in a real kernel; nbformat is imported here, not at collection (its schema checks cost
    every pytest worker seconds)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    return notebook


def test_notebook_analyses_a_generated_study(tmp_path, monkeypatch):
    study = generate_study(
        [PlantedIntervention("no_dropout", -0.05), PlantedIntervention("qkv_bias", 0.0, changes_init=True)],
        init_seeds=(1, 2, 3, 4),
        failed_runs=1,
        periods=6,
        rng_seed=5,
    )
    runs_csv, history_csv = tmp_path / "nb_study.csv", tmp_path / "nb_history.csv"
    study.runs.to_csv(runs_csv, index=False)
    study.histories.to_csv(history_csv, index=False)
    out = tmp_path / "report"
    for name, value in {
        "ANALYSIS_CSV": runs_csv,
        "ANALYSIS_HISTORY": history_csv,
        "ANALYSIS_OUT": out,
        "ANALYSIS_MIN_EFFECT": "0.01",
    }.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("ANALYSIS_STUDY", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    notebook = execute_notebook()

    printed = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "nb_study: 26 runs analysed" in printed
    shown = [
        output["data"]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.get("output_type") == "display_data"
    ]
    assert sum("image/png" in data for data in shown) == 3
    ranking = pd.read_csv(out / "ranking.csv").set_index("intervention")
    assert ranking.loc["no_dropout", "verdict"] == "better"
    assert ranking.loc["qkv_bias", "noise_reference"] == "init"
    assert (out / "report.md").exists() and (out / "report.html").exists()


def test_notebook_on_a_study_in_mlflow_logs_as_make_analyze_does(tmp_path, monkeypatch):
    """Run on a study's MLflow store, the notebook nests its analysis under the study's parent run and gives the
    parent its verdicts, and draws every figure."""
    import mlflow

    from analysis.synthetic import log_study_to_mlflow

    study = generate_study(
        [PlantedIntervention("no_dropout", -0.05), PlantedIntervention("lr_schedule", 0.0)],
        init_seeds=(1, 2, 3),
        periods=2,  # as the quick study: a few period points per run
        rng_seed=2,
    )
    uri = new_store(tmp_path / "mlflow.db")
    experiment_id = log_study_to_mlflow(study, "nbquick", "harness/smoke", uri, str(tmp_path / "artifacts"))
    for name, value in {
        "ANALYSIS_STUDY": "nbquick",
        "ANALYSIS_TRACKING_URI": uri,
        "ANALYSIS_EXPERIMENT": "harness/smoke",
        "ANALYSIS_OUT": tmp_path / "report",
    }.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("ANALYSIS_CSV", raising=False)
    notebook = execute_notebook()

    client = mlflow.MlflowClient(uri)
    [parent] = client.search_runs([experiment_id], "tags.study_parent = 'true'")
    [analysis] = client.search_runs([experiment_id], "tags.analysis = 'true'")
    assert analysis.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.tags["analysis_run_id"] == analysis.info.run_id
    assert parent.data.tags["verdict/no_dropout"].split()[0] in ("better", "worse", "inconclusive")
    assert "verdict/lr_schedule/ci_low" in parent.data.metrics
    printed = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert f"under the study's parent run {parent.info.run_id}" in printed
    # the verdicts with their interval, and each arm's mean, SD and n
    assert re.search(
        r"no_dropout: (better|worse|inconclusive) [+-]\d\.\d{6} \[.*mean \d\.\d{6}, SD \d\.\d{6}, n 6", printed
    )
    images = [
        output["data"]["image/png"]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.get("output_type") == "display_data" and "image/png" in output["data"]
    ]
    assert len(images) == 3  # training loss (both panels drawn), forest plot, noise
