"""Verdicts on HellaSwag accuracy beside those on the test loss: the same seed-noise machinery on the accuracy
(higher is better, so the comparison runs on its negative and is turned back), the metric's own sampling noise
over its examples (a binomial SE per arm, a paired test on the same examples against the baseline, kept apart from
seed noise), and where the two metrics disagree in direction. The methods are described in docs/analysis.md.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.compare import compare_to_baseline
from analysis.load import BASELINE, StudyRuns
from analysis.noise import NoiseEstimate, estimate_noise

METRICS = ("test_loss", "hellaswag_acc_norm", "hellaswag_acc")
RECORD_ARTIFACT = "hellaswag/final.json"  # the trial's per-example record of its final weights
CHOICE_FIELD = {"hellaswag_acc": "choice", "hellaswag_acc_norm": "choice_norm"}
# The ranking's columns in the loss's units, negated (and their interval ends swapped) to read as accuracy.
NEGATED = ("baseline_loss", "intervention_loss", "difference", "effect_in_sd")
SWAPPED = (("ci_low", "ci_high"), ("boot_low", "boot_high"))
RENAMED = {"baseline_loss": "baseline_score", "intervention_loss": "intervention_score"}


@dataclass
class AccuracyAnalysis:
    """The verdicts on one accuracy metric and its sampling noise (all differences: intervention − baseline, so
    positive is better)."""

    metric: str
    ranking: pd.DataFrame
    noise: dict[str, NoiseEstimate]
    sampling: pd.DataFrame  # per intervention: binomial SEs and the paired test on the same examples
    agreement: pd.DataFrame  # per intervention: direction on each metric, and whether they disagree
    unscored: list[str] = field(default_factory=list)  # run ids without the metric (left out of this analysis)


# --- the sampling noise of one accuracy --------------------------------------------------------------------
def binomial_se(accuracy, n) -> np.ndarray:
    """The standard error of an accuracy over `n` examples, each right or wrong: √(p(1 − p)/n)."""
    accuracy, n = np.asarray(accuracy, float), np.asarray(n, float)
    return np.sqrt(accuracy * (1 - accuracy) / n)


def mcnemar_test(treated, control) -> dict:
    """The exact McNemar test of two models on the same examples (boolean arrays, right or wrong): under no
    difference, the examples only one of them gets right split 50:50 between them. Two-sided."""
    treated, control = np.asarray(treated, bool), np.asarray(control, bool)
    only_treated, only_control = int(np.sum(treated & ~control)), int(np.sum(~treated & control))
    discordant = only_treated + only_control
    p = min(1.0, 2 * stats.binom.cdf(min(only_treated, only_control), discordant, 0.5)) if discordant else 1.0
    return {"only_intervention": only_treated, "only_baseline": only_control, "p_value": float(p)}


def paired_examples_test(treated, control, alpha: float = 0.05) -> dict:
    """A paired t-test over the examples of the difference in correctness, each side averaged over its runs
    ([runs, examples] arrays): the accuracy difference with its interval from the examples' sampling alone."""
    differences = np.mean(np.atleast_2d(treated), axis=0) - np.mean(np.atleast_2d(control), axis=0)
    n = differences.size
    mean, se = float(differences.mean()), float(differences.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
    dof = n - 1
    if not se > 0:  # identical answers everywhere: no sampling noise in the difference
        return {"difference": mean, "se": 0.0, "ci_low": mean, "ci_high": mean, "p_value": 1.0, "dof": dof}
    half = stats.t.ppf(1 - alpha / 2, dof) * se
    p = float(2 * stats.t.sf(abs(mean) / se, dof))
    return {"difference": mean, "se": se, "ci_low": mean - half, "ci_high": mean + half, "p_value": p, "dof": dof}


# --- the per-example records -------------------------------------------------------------------------------
def load_records(tracking_uri: str, run_ids) -> dict[str, dict]:
    """Each run's per-example record (hellaswag/final.json); runs without one are left out."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client, records = MlflowClient(tracking_uri), {}
    with tempfile.TemporaryDirectory() as directory:
        for run_id in run_ids:
            try:
                path = client.download_artifacts(run_id, RECORD_ARTIFACT, directory)
            except (MlflowException, OSError):
                continue
            records[run_id] = json.loads(Path(path).read_text())
            Path(path).unlink()
    return records


def correctness(records: dict[str, dict], run_ids, metric: str) -> np.ndarray | None:
    """[runs, examples] right/wrong of the given runs on the same examples, in example order; None unless every
    run has a record and all records cover the same examples."""
    chosen = [records.get(run_id) for run_id in run_ids]
    if not chosen or any(record is None for record in chosen):
        return None
    order = chosen[0]["ind"]
    if any(record["ind"] != order for record in chosen):
        return None
    return np.array([np.equal(record[CHOICE_FIELD[metric]], record["label"]) for record in chosen])


def sampling_table(
    runs: pd.DataFrame, ranking: pd.DataFrame, records: dict[str, dict], metric: str, alpha: float
) -> pd.DataFrame:
    """Per intervention: each arm's accuracy with its binomial SE, and the paired test on the same examples."""
    baseline = runs[runs["intervention"] == BASELINE]
    baseline_right = correctness(records, baseline["run_id"], metric)
    rows = []
    for intervention in ranking["intervention"]:
        arm = runs[runs["intervention"] == intervention]
        n = float(pd.concat([arm, baseline])["hellaswag_examples"].min())
        row = {
            "intervention": intervention,
            "examples": n,
            "intervention_score": arm[metric].mean(),
            "intervention_se": float(binomial_se(arm[metric].mean(), n)),
            "baseline_score": baseline[metric].mean(),
            "baseline_se": float(binomial_se(baseline[metric].mean(), n)),
            "independent_se": float(
                np.hypot(binomial_se(arm[metric].mean(), n), binomial_se(baseline[metric].mean(), n))
            ),
        }
        arm_right = correctness(records, arm["run_id"], metric)
        if arm_right is None or baseline_right is None or arm_right.shape[1] != baseline_right.shape[1]:
            row |= {"paired_method": "none (no per-example records for every run)"}
        else:
            paired = paired_examples_test(arm_right, baseline_right, alpha)
            row |= {f"paired_{key}": value for key, value in paired.items()}
            row["paired_method"] = f"paired t over {arm_right.shape[1]} examples ({len(arm)} vs {len(baseline)} runs)"
            if len(arm) == 1 and len(baseline) == 1:
                exact = mcnemar_test(arm_right[0], baseline_right[0])
                row |= {f"mcnemar_{key}": value for key, value in exact.items()}
        rows.append(row)
    return pd.DataFrame(rows)


# --- verdicts on an accuracy -------------------------------------------------------------------------------
def accuracy_runs(runs: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, list[str]]:
    """The runs scored on `metric`, with `test_loss` replaced by −metric (lower is better, as for the loss), and
    the run ids left out for want of the score."""
    scored = np.isfinite(runs[metric].to_numpy(dtype=float))
    return runs[scored].assign(test_loss=-runs.loc[scored, metric]).reset_index(drop=True), list(
        runs.loc[~scored, "run_id"]
    )


def as_accuracy(ranking: pd.DataFrame) -> pd.DataFrame:
    """A ranking made on −accuracy, read as accuracy: differences and means negated, interval ends swapped.
    Verdicts, p-values and ranks keep their meaning (better = higher accuracy)."""
    turned = ranking.copy()
    for column in NEGATED:
        turned[column] = -ranking[column]
    for low, high in SWAPPED:
        turned[low], turned[high] = -ranking[high], -ranking[low]
    return turned.rename(columns=RENAMED)


def direction(difference: float, higher_is_better: bool) -> str:
    if not np.isfinite(difference) or difference == 0:
        return "none"
    return "better" if (difference > 0) == higher_is_better else "worse"


def agreement_table(loss_ranking: pd.DataFrame, accuracy_ranking: pd.DataFrame) -> pd.DataFrame:
    """Per intervention in both rankings: the direction and verdict on each metric and whether they disagree."""
    merged = loss_ranking[["intervention", "difference", "verdict"]].merge(
        accuracy_ranking[["intervention", "difference", "verdict"]], on="intervention", suffixes=("_loss", "_accuracy")
    )
    merged["direction_loss"] = [direction(d, higher_is_better=False) for d in merged["difference_loss"]]
    merged["direction_accuracy"] = [direction(d, higher_is_better=True) for d in merged["difference_accuracy"]]
    opposite = {("better", "worse"), ("worse", "better")}
    merged["disagree"] = [
        (a, b) in opposite for a, b in zip(merged["direction_loss"], merged["direction_accuracy"], strict=True)
    ]
    merged["verdicts_conflict"] = [
        (a, b) in opposite for a, b in zip(merged["verdict_loss"], merged["verdict_accuracy"], strict=True)
    ]
    return merged


def analyse_accuracy(
    study_runs: StudyRuns,
    loss_ranking: pd.DataFrame,
    metric: str = "hellaswag_acc_norm",
    alpha: float = 0.05,
    min_effect: float = 0.0,
    n_resamples: int = 9999,
    random_seed: int = 0,
    records: dict[str, dict] | None = None,
) -> AccuracyAnalysis | None:
    """The verdicts on `metric` (None when no baseline run has it); `records`: per-example records by run id
    (default: read from the study's MLflow store, none for CSV input)."""
    runs, unscored = accuracy_runs(study_runs.runs, metric)
    if not (runs["intervention"] == BASELINE).any():
        return None
    if records is None:
        records = load_records(study_runs.tracking_uri, runs["run_id"]) if study_runs.tracking_uri else {}
    noise = estimate_noise(runs, alpha)
    oriented = compare_to_baseline(runs, noise, alpha, min_effect, n_resamples, random_seed)
    ranking = as_accuracy(oriented)
    scored = study_runs.runs[study_runs.runs["run_id"].isin(runs["run_id"])]
    sampling = sampling_table(scored, ranking, records, metric, alpha)
    return AccuracyAnalysis(metric, ranking, noise, sampling, agreement_table(loss_ranking, ranking), unscored)
