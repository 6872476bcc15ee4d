"""Figures and reports survive inf/NaN values and degenerate studies."""

import matplotlib
import numpy as np
import pandas as pd

from analysis import plots
from analysis.load import prepare_runs
from analysis.report import write_report
from analysis.study import Settings, analyse
from analysis.synthetic import PlantedIntervention, generate_study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path is not None and path.read_bytes().startswith(PNG_SIGNATURE)


def test_plots_use_the_non_interactive_backend():
    assert matplotlib.get_backend().lower() == "agg"


def test_training_curves_skip_non_finite_values(tmp_path):
    study = generate_study([PlantedIntervention("no_dropout", -0.02)], periods=6)
    histories = study.histories.copy()
    histories.loc[::4, "value"] = np.inf
    histories.loc[1::5, "value"] = np.nan
    histories.loc[2, "value"] = -np.inf
    assert is_png(plots.training_curves(histories, study.runs, tmp_path / "curves.png"))


def test_training_curves_bin_long_per_step_histories(tmp_path):
    runs = pd.DataFrame({"run_id": ["a", "b"], "intervention": ["baseline", "x"]})
    steps = np.arange(1, 5001)
    histories = pd.DataFrame(
        {
            "run_id": np.repeat(["a", "b"], len(steps)),
            "metric": "train_loss",
            "step": np.tile(steps, 2),
            "value": np.tile(10 / np.sqrt(steps), 2),
        }
    )
    assert is_png(plots.training_curves(histories, runs, tmp_path / "curves.png"))


def test_plots_without_finite_data_are_skipped(tmp_path):
    runs = pd.DataFrame({"run_id": ["a"], "intervention": ["baseline"]})
    histories = pd.DataFrame(
        {"run_id": ["a", "a"], "metric": "train_loss_avg", "step": [1, 2], "value": [np.nan, np.inf]}
    )
    assert plots.training_curves(histories, runs, tmp_path / "c.png") is None
    ranking = pd.DataFrame(
        {
            "intervention": ["x"],
            "verdict": ["inconclusive"],
            "difference": [np.nan],
            "ci_low": [np.nan],
            "ci_high": [np.inf],
            "noise_sd": [np.nan],
        }
    )
    assert plots.forest_plot(ranking, 0.01, tmp_path / "f.png") is None
    residuals = pd.DataFrame({"kind": ["init"], "deviation": [np.inf]})
    assert plots.noise_distributions(residuals, tmp_path / "n.png") is None
    assert not list(tmp_path.iterdir())


def test_forest_plot_draws_rows_with_missing_values(tmp_path):
    ranking = pd.DataFrame(
        {
            "intervention": ["a", "b", "c"],
            "verdict": ["better", "inconclusive", "worse"],
            "difference": [-0.02, np.nan, 0.01],
            "ci_low": [-0.03, np.nan, -np.inf],
            "ci_high": [-0.01, np.nan, 0.02],
            "noise_sd": [0.005, np.inf, 0.02],
        }
    )
    assert is_png(plots.forest_plot(ranking, 0.005, tmp_path / "forest.png"))


def test_report_of_a_baseline_only_study(tmp_path):
    study = generate_study([], periods=4)
    analysis = analyse(prepare_runs(study.runs, "solo", "test", study.histories))
    files = write_report(analysis, tmp_path)
    assert analysis.ranking.empty and files.csv.exists()
    assert [path.name for path in files.figures] == ["training_loss.png", "noise.png"]
    assert "| rank | intervention | verdict |" in files.markdown.read_text()


def test_report_of_a_study_with_diverged_runs_and_a_lone_seed(tmp_path):
    study = generate_study(
        [PlantedIntervention("no_dropout", -0.02), PlantedIntervention("lr_schedule", 0.01)], failed_runs=1
    )
    runs = study.runs.copy()
    diverged = runs.index[runs["intervention"] == "no_dropout"][0]
    runs.loc[diverged, "test_loss"] = np.inf
    runs = runs[(runs["intervention"] != "lr_schedule") | (runs["seed"] == 42)]  # lone seed
    histories = study.histories.copy()
    histories.loc[::7, "value"] = np.nan
    histories.loc[::11, "value"] = np.inf
    analysis = analyse(prepare_runs(runs, "broken", "test", histories), Settings(n_resamples=999))
    files = write_report(analysis, tmp_path / "report")

    assert len(files.figures) == 3 and all(is_png(path) for path in files.figures)
    markdown = files.markdown.read_text()
    assert "no finite test_loss" in markdown and "status FAILED" in markdown
    lone = analysis.ranking.set_index("intervention").loc["lr_schedule"]
    assert lone["design"] == "prediction" and np.isnan(lone["boot_low"])
    assert f"| lr_schedule | {lone['verdict']} |" in markdown and "n/a" in markdown
    assert files.html.read_text().count("<img") == 3
    assert set(pd.read_csv(files.csv)["intervention"]) == {"no_dropout", "lr_schedule"}


def drawn_figure(monkeypatch):
    """The figure a plot function saves, kept open so its axes can be read."""
    kept = {}

    def keep(figure, path):
        kept["figure"] = figure
        return path

    monkeypatch.setattr(plots, "_save", keep)
    return kept


def test_the_final_steps_panel_has_lines_when_only_period_points_were_logged(tmp_path, monkeypatch):
    """The quick study logs its training loss at a few period ends: both panels draw every arm's line."""
    runs = pd.DataFrame({"run_id": ["a1", "a2", "b1", "b2"], "intervention": ["baseline"] * 2 + ["no_dropout"] * 2})
    histories = pd.DataFrame(
        [(run, step, 10 - step / 10 + 0.01 * i) for i, run in enumerate(runs["run_id"]) for step in (5, 10)],
        columns=["run_id", "step", "value"],
    )
    kept = drawn_figure(monkeypatch)
    plots.training_curves(histories, runs, tmp_path / "curves.png")
    for ax in kept["figure"].axes:
        lines = [line for line in ax.get_lines() if len(line.get_xdata()) >= 2]
        assert len(lines) >= 2, ax.get_title()  # one per arm


def test_the_forest_plot_draws_the_interval_that_decides_and_says_so(tmp_path, monkeypatch):
    study = generate_study([PlantedIntervention("no_dropout", -0.05)], init_seeds=(1, 2, 3), rng_seed=3)
    ranking = analyse(
        prepare_runs(study.runs, "forest", "synthetic", study.histories), Settings(n_resamples=200)
    ).ranking
    kept = drawn_figure(monkeypatch)
    plots.forest_plot(ranking, 0.0, tmp_path / "forest.png")
    [ax] = [ax for ax in kept["figure"].axes if ax.get_legend()]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert (
        "Holm-adjusted interval (decides the verdict)" in legend and "unadjusted t interval (this row alone)" in legend
    )
    labels = [label.get_text() for label in ax.get_yticklabels()]
    row = ranking.iloc[0]
    assert labels[0] == f"no_dropout\n{row.verdict} {row.difference:+.4f}"
    segments = ax.collections  # the band, the Holm intervals, the t intervals, the points
    holm = [c for c in segments if c.get_label() == "Holm-adjusted interval (decides the verdict)"][0]
    (low, _), (high, _) = holm.get_segments()[0]
    assert np.isclose(low, row.holm_low) and np.isclose(high, row.holm_high)
