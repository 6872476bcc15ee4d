"""What the analysis accepts as input: study names, where reports go, duplicate CSV rows, arms by computation."""

import pandas as pd
import pytest

from analysis.__main__ import REPORTS, main
from analysis.load import AnalysisInputError, load_csv_study
from analysis.report import write_report
from analysis.study import Settings, analyse
from analysis.synthetic import NoiseModel, PlantedIntervention, generate_study
from tests.conftest import new_store


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
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and f"study={study!r} is not a study tag" in captured.err
    assert captured.out == ""  # refused before anything was loaded or written


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


def mixed_runs(arms: dict[str, list[tuple[dict, float]]]) -> pd.DataFrame:
    """Runs at init seeds 42, 22, 67 of each (tag, config overrides, loss level); every run also logs optim.lr."""
    rows = []
    for tag, variants in arms.items():
        for overrides, level in variants:
            for offset, seed in zip((0.0, 0.01, -0.01), (42, 22, 67), strict=True):
                rows.append(
                    {
                        "intervention": tag,
                        "seed": seed,
                        "train_seed": "none",
                        "init_fingerprint": f"f{seed}",
                        "changes_init": False,
                        "status": "FINISHED",
                        "test_loss": level + offset,
                        "params.optim.lr": "0.0004",
                        "params.model.dropout": "0.1",
                        "params.tracking.uri": f"sqlite:///{tag}{seed}.db",
                        "params.study": "mix",
                        **{f"params.{key}": value for key, value in overrides.items()},
                    }
                )
    runs = pd.DataFrame(rows)
    runs.insert(0, "run_id", [f"mix-{i:03d}" for i in range(len(runs))])
    return runs


@pytest.fixture
def mixed_store(tmp_path):
    from analysis.synthetic import SyntheticStudy, log_study_to_mlflow

    uri = new_store(tmp_path / "mlflow.db")
    studies = {
        "mix": {
            "baseline": [({}, 10.90), ({"optim.lr": "0.003"}, 8.55)],
            "no_dropout": [({"model.dropout": "0.0"}, 10.80)],
            "qkv_bias": [({}, 10.70), ({"plugins.qkv_bias.enabled": "true"}, 10.60)],
        },
        "sweep": {"baseline": [({}, 10.90), ({"optim.lr": "0.003"}, 8.55)]},
    }
    for name, arms in studies.items():
        runs = mixed_runs(arms)
        histories = pd.DataFrame(columns=["run_id", "metric", "step", "value"])
        log_study_to_mlflow(SyntheticStudy(runs, histories, NoiseModel()), name, "trials", uri)
    return uri


def test_runs_under_one_tag_that_computed_different_configs_are_separate_arms(mixed_store, tmp_path, capsys):
    from analysis.load import load_mlflow_study

    runs = load_mlflow_study("mix", mixed_store).runs
    arms = runs.groupby("intervention")["test_loss"].mean().round(6).to_dict()
    assert arms == {
        "baseline": 10.90,
        "baseline[optim.lr=0.003]": 8.55,
        "no_dropout": 10.80,
        "qkv_bias[plugins.qkv_bias.enabled=unset]": 10.70,
        "qkv_bias[plugins.qkv_bias.enabled=true]": 10.60,
    }
    assert len(set(runs["config_hash"])) == len(runs)  # seeds are part of the hash: no run repeats another

    out = tmp_path / "report"
    assert main(["study=mix", f"tracking_uri={mixed_store}", f"out={out}", "resamples=100", "log=false"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("analysis: warning:")]
    assert warnings == [
        "analysis: warning: runs tagged baseline computed 2 different configs, analysed as separate arms: "
        "baseline, baseline[optim.lr=0.003]",
        "analysis: warning: runs tagged qkv_bias computed 2 different configs, analysed as separate arms: "
        "qkv_bias[plugins.qkv_bias.enabled=true], qkv_bias[plugins.qkv_bias.enabled=unset]",
    ]
    ranking = pd.read_csv(out / "ranking.csv").set_index("intervention")
    assert ranking["baseline_loss"].round(6).eq(10.90).all()
    assert ranking.loc["baseline[optim.lr=0.003]", "difference"] == pytest.approx(-2.35)
    noise = pd.read_csv(out / "noise.csv").set_index("kind")
    assert noise.loc["repeat", "n_runs"] == 0
    assert noise.loc["init", "sd"] == pytest.approx(0.01)  # within each arm: the lr variants are not pooled


def test_a_baseline_that_no_other_arm_identifies_is_refused_naming_its_configs(mixed_store, tmp_path, capsys):
    assert main(["study=sweep", f"tracking_uri={mixed_store}", f"out={tmp_path}", "log=false"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "computed 2 different configs (optim.lr=0.0004: 3 runs; optim.lr=0.003: 3 runs)" in error


def test_exact_repeats_need_the_same_computation_and_thread_count():
    from analysis.load import prepare_runs
    from analysis.noise import estimate_noise

    runs = mixed_runs({"baseline": [({}, 3.3)]})
    repeats = pd.concat([runs] * 3, ignore_index=True).assign(run_id=lambda t: [f"r{i}" for i in t.index])
    repeats["test_loss"] += [0.0] * 3 + [0.001] * 3 + [0.002] * 3
    repeats["config_hash"] = "h" + repeats["seed"].astype(str)
    repeats["cpu_threads"] = ["2"] * 6 + ["1"] * 3
    noise = estimate_noise(prepare_runs(repeats, "s", "test").runs)
    assert noise["repeat"].n_runs == 6 and noise["repeat"].nominal_dof == 3
    assert noise["repeat"].sd == pytest.approx(0.001 / 2**0.5)


def test_arms_split_by_config_are_not_cells_of_the_factorial():
    from analysis.factorial import fit_factorial
    from analysis.load import prepare_runs

    runs = mixed_runs(
        {
            "baseline": [({}, 3.30)],
            "a": [({}, 3.28)],
            "b": [({}, 3.29)],
            "a+b": [({}, 3.27)],
            "a+c": [({}, 3.26), ({"optim.lr": "0.003"}, 3.0)],
        }
    )
    table = prepare_runs(runs, "s", "test").runs
    assert {"a+c[optim.lr=0.0004]", "a+c[optim.lr=0.003]"} <= set(table["intervention"])
    fit = fit_factorial(table)
    assert fit.factors == ["a", "b"] and fit.n_runs == 12


def test_a_csv_whose_file_name_is_not_a_tag_needs_a_study_name(tmp_path):
    runs, path = small_study_csv(tmp_path, name="my results.csv")
    with pytest.raises(AnalysisInputError, match="CSV file name 'my results' is not a study tag; name the study"):
        load_csv_study(path)
    assert load_csv_study(path, "mine").study == "mine"


def test_config_hashes_are_kept_as_text():
    from analysis.load import prepare_runs

    runs = mixed_runs({"baseline": [({}, 3.3)]}).assign(config_hash=["12e45678", "0012", "ab12"])
    assert prepare_runs(runs, "s", "test").runs["config_hash"].tolist() == ["12e45678", "0012", "ab12"]


def test_the_default_report_folder_of_a_dot_dot_study_is_refused(tmp_path, capsys):
    runs, path = small_study_csv(tmp_path)
    runs.assign(study="..").to_csv(path, index=False)
    assert main([f"csv={path}", "study=..", "resamples=100"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"outside {REPORTS}" in error
    assert not (REPORTS.parent / "report.md").exists()
