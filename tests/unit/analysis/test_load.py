"""Input validation and normalisation of run tables and CSV files."""

import numpy as np
import pandas as pd
import pytest

from analysis.load import AnalysisInputError, load_csv_study, prepare_runs


def run_table(**overrides) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "run_id": ["b1", "b2", "b3", "a1", "a2", "a3"],
            "intervention": ["baseline"] * 3 + ["qkv_bias+no_dropout"] * 3,
            "seed": ["42", "22", "67", "42", "22", "67"],
            "train_seed": ["23", None, "none", 23.0, np.nan, "none"],
            "test_loss": [3.31, 3.30, 3.32, 3.29, 3.28, 3.30],
            "init_fingerprint": ["f42", "f22", "f67", "g42", "g22", "g67"],
        }
    )
    for column, values in overrides.items():
        table[column] = values
    return table


def test_runs_are_normalised():
    runs = prepare_runs(run_table(), "s", "test").runs
    assert set(runs["intervention"]) == {"baseline", "no_dropout+qkv_bias"}
    assert runs["seed"].tolist() == [42, 22, 67, 42, 22, 67]
    assert runs["train_seed"].tolist() == ["23", "none", "none", "23", "none", "none"]
    assert (runs["data_seed"] == "none").all() and (runs["status"] == "FINISHED").all()


def test_unfinished_and_non_finite_runs_are_excluded_and_listed():
    table = run_table(
        status=["FINISHED", "FAILED", "RUNNING", "FINISHED", "FINISHED", "KILLED"],
        test_loss=[3.31, 3.30, 3.32, np.inf, np.nan, 3.30],
    )
    study = prepare_runs(table, "s", "test")
    assert study.runs["run_id"].tolist() == ["b1"]
    reasons = study.excluded.set_index("run_id")["reason"].to_dict()
    assert reasons == {
        "b2": "status FAILED",
        "b3": "status RUNNING",
        "a1": "no finite test_loss",
        "a2": "no finite test_loss",
        "a3": "status KILLED",
    }


def test_missing_columns_are_named():
    table = run_table().drop(columns=["train_seed", "init_fingerprint"])
    with pytest.raises(AnalysisInputError, match="missing columns: train_seed, init_fingerprint or changes_init"):
        prepare_runs(table, "s", "test")


def test_a_study_without_baseline_runs_is_rejected():
    table = run_table(status=["FAILED"] * 3 + ["FINISHED"] * 3)
    with pytest.raises(AnalysisInputError, match="no finished baseline runs.*no_dropout"):
        prepare_runs(table, "s", "test")


def test_a_study_without_any_usable_run_is_rejected():
    with pytest.raises(AnalysisInputError, match="no FINISHED runs with a finite test_loss"):
        prepare_runs(run_table(status="FAILED"), "s", "test")


def test_init_seeds_must_be_integers():
    with pytest.raises(AnalysisInputError, match="integer init seeds.*'x'"):
        prepare_runs(run_table(seed=["42", "x", "67", "42", "22", "1.5"]), "s", "test")


def test_changes_init_must_be_boolean():
    table = run_table(changes_init=["false"] * 3 + ["true", "1", "maybe"])
    with pytest.raises(AnalysisInputError, match="changes_init must be boolean.*maybe"):
        prepare_runs(table.drop(columns="init_fingerprint"), "s", "test")


def test_csv_study_column_selects_the_study(tmp_path):
    table = pd.concat([run_table(study="one"), run_table(study="two", test_loss=9.0)])
    path = tmp_path / "runs.csv"
    table.to_csv(path, index=False)
    assert (load_csv_study(path, "two").runs["test_loss"] == 9.0).all()
    with pytest.raises(AnalysisInputError, match="unknown study 'three'.*one, two"):
        load_csv_study(path, "three")


def test_missing_csv_file_is_reported(tmp_path):
    with pytest.raises(AnalysisInputError, match="CSV file not found"):
        load_csv_study(tmp_path / "nope.csv")
