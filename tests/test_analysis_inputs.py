"""What the analysis accepts as input: study names, where reports go, duplicate CSV rows, arms by computation."""

import pandas as pd
import pytest

from analysis.__main__ import REPORTS, main
from analysis.load import AnalysisInputError, load_csv_study
from analysis.report import write_report
from analysis.study import Settings, analyse
from analysis.synthetic import NoiseModel, PlantedIntervention, generate_study


def small_study_csv(tmp_path, name="runs.csv", **kwargs):
    study = generate_study(
        [PlantedIntervention("no_dropout", -0.03)], init_seeds=(42, 22, 67), noise=NoiseModel(), **kwargs
    )
    path = tmp_path / name
    study.runs.to_csv(path, index=False)
    return study.runs, path


@pytest.mark.parametrize("study", ["../../../../tmp/x", "a/b", "a;rm", "a b", ""])
def test_a_study_name_that_is_not_a_tag_is_refused_in_one_line(study, tmp_path, capsys):
    _, path = small_study_csv(tmp_path)
    assert main([f"csv={path}", f"study={study}"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"study={study!r} is not a study tag" in error
    assert not (tmp_path.parent / "x").exists() and not REPORTS.parent.joinpath("tmp").exists()


def test_the_report_writer_refuses_a_folder_that_resolves_outside_the_reports_root(tmp_path):
    runs, path = small_study_csv(tmp_path)
    analysis = analyse(load_csv_study(path), Settings(n_resamples=100))
    root = tmp_path / "reports"
    (root).mkdir()
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    for directory in (root / "linked", root / "..", root / "a" / "b", root):
        with pytest.raises(AnalysisInputError, match="outside .*reports"):
            write_report(analysis, directory, reports_root=root)
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "report.md").exists()
    assert write_report(analysis, root / "runs", reports_root=root).markdown.is_file()


@pytest.mark.parametrize("with_run_id", [True, False])
def test_duplicate_csv_rows_are_dropped_with_a_warning(with_run_id, tmp_path, capsys):
    runs, path = small_study_csv(tmp_path, baseline_repeats=1)
    if not with_run_id:
        runs = runs.drop(columns="run_id")
    pd.concat([runs, runs.iloc[:6]]).to_csv(path, index=False)
    out = tmp_path / "report"
    assert main([f"csv={path}", f"out={out}", "resamples=100"]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith("analysis: warning:")]
    assert len(warning) == 1 and "dropped 6 rows" in warning[0] and f"{len(runs)} runs remain" in warning[0]
    assert f"{len(runs)} runs analysed" in captured.out
    noise = pd.read_csv(out / "noise.csv").set_index("kind")
    assert noise.loc["repeat", "n_runs"] == 0 and noise.loc["repeat", "nominal_dof"] == 0
    assert "dropped 6 rows" in (out / "report.md").read_text()


def test_a_run_id_on_rows_that_differ_is_refused(tmp_path):
    runs, path = small_study_csv(tmp_path)
    copy = runs.iloc[[0]].assign(test_loss=runs["test_loss"].iloc[0] + 1)
    pd.concat([runs, copy]).to_csv(path, index=False)
    with pytest.raises(AnalysisInputError, match=f"run_id '{runs['run_id'].iloc[0]}' is on several rows"):
        load_csv_study(path)
