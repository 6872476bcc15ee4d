"""Run every part of the analysis on the runs of one study: on the test loss and, where the runs are scored on it,
on HellaSwag accuracy (`metric` chooses which one the printed verdicts use)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from analysis.accuracy import METRICS, AccuracyAnalysis, analyse_accuracy
from analysis.adjusted import holm_intervals
from analysis.compare import compare_to_baseline
from analysis.factorial import FactorialResult, fit_factorial
from analysis.load import AnalysisInputError, StudyRuns
from analysis.noise import (
    NoiseEstimate,
    checkpoint_noise,
    estimate_noise,
    noise_levels,
    residuals_by_kind,
    variance_components,
)


@dataclass(frozen=True)
class Settings:
    alpha: float = 0.05
    min_effect: float = 0.0
    final_periods: int = 5
    n_resamples: int = 9999
    random_seed: int = 0
    metric: str = "test_loss"  # the verdicts shown first: test_loss, hellaswag_acc_norm or hellaswag_acc


@dataclass
class StudyAnalysis:
    study_runs: StudyRuns
    settings: Settings
    noise: dict[str, NoiseEstimate]
    variance_components: pd.DataFrame | None
    variance_note: str
    noise_residuals: pd.DataFrame
    noise_levels: pd.DataFrame
    ranking: pd.DataFrame
    factorial: FactorialResult | None
    factorial_note: str
    accuracy: AccuracyAnalysis | None = None  # the verdicts on HellaSwag, where the runs are scored on it

    @property
    def study(self) -> str:
        return self.study_runs.study

    @property
    def thin_evidence(self) -> list[str]:
        """Interventions whose verdict rests on fewer than THIN_DOF degrees of freedom."""
        return self.ranking.loc[self.ranking["thin_evidence"].astype(bool), "intervention"].tolist()

    @property
    def verdicts(self) -> pd.DataFrame:
        """The ranking on the chosen metric (an accuracy's: positive differences are better)."""
        return self.ranking if self.settings.metric == "test_loss" else self.accuracy.ranking


def analyse(study_runs: StudyRuns, settings: Settings = Settings()) -> StudyAnalysis:
    if settings.metric not in METRICS:
        raise AnalysisInputError(f"metric={settings.metric}: unknown; allowed: {', '.join(METRICS)}")
    runs = study_runs.runs
    noise = estimate_noise(runs, settings.alpha)
    noise["checkpoint"] = checkpoint_noise(study_runs.histories, settings.final_periods, settings.alpha)
    components, variance_note = variance_components(runs)
    ranking = compare_to_baseline(
        runs,
        noise,
        settings.alpha,
        settings.min_effect,
        settings.n_resamples,
        settings.random_seed,
    )
    ranking = holm_intervals(ranking, settings.alpha)
    accuracy_metric = "hellaswag_acc_norm" if settings.metric == "test_loss" else settings.metric
    accuracy = analyse_accuracy(
        study_runs, ranking, accuracy_metric, settings.alpha, 0.0, settings.n_resamples, settings.random_seed
    )
    if accuracy is None and settings.metric != "test_loss":
        raise AnalysisInputError(
            f"metric={settings.metric}: no finished baseline run of study {study_runs.study!r} has a "
            f"{settings.metric} score; score the trials with `python -m harness evaluate RUN_DIR hellaswag=true`"
        )
    try:
        factorial, factorial_note = fit_factorial(runs, settings.alpha), ""
    except ValueError as error:
        factorial, factorial_note = None, str(error)
    return StudyAnalysis(
        study_runs,
        settings,
        noise,
        components,
        variance_note,
        residuals_by_kind(runs),
        noise_levels(runs),
        ranking,
        factorial,
        factorial_note,
        accuracy,
    )
