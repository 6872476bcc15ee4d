"""The notebook runs end to end in a real ``python3`` kernel on a generated study."""

import nbformat
import pandas as pd
from nbclient import NotebookClient

from analysis.synthetic import PlantedIntervention, generate_study
from harness.paths import PROJECT_ROOT

NOTEBOOK = PROJECT_ROOT / "analysis" / "noise_analysis.ipynb"


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

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()

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
