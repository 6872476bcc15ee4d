"""Run every part of the analysis on the runs of one study."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from analysis.adjusted import holm_intervals
from analysis.compare import compare_to_baseline
from analysis.factorial import FactorialResult, fit_factorial
from analysis.load import StudyRuns
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

    @property
    def study(self) -> str:
        return self.study_runs.study

    @property
    def thin_evidence(self) -> list[str]:
        """Interventions whose verdict rests on fewer than THIN_DOF degrees of freedom."""
        return self.ranking.loc[self.ranking["thin_evidence"].astype(bool), "intervention"].tolist()


def analyse(study_runs: StudyRuns, settings: Settings = Settings()) -> StudyAnalysis:
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
    )
