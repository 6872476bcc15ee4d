"""Main effects and two-way interactions of factorial studies (an intervention tag ``a+b``: both applied).

An OLS fit of test loss on the factors in effect coding (+1/2 applied, -1/2 not) plus the pairwise products that
occur, with recurring init seeds as blocks; negative is better. Details in docs/analysis.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
import statsmodels.api as sm

from analysis.load import BASELINE


@dataclass
class FactorialResult:
    effects: pd.DataFrame  # term, kind, estimate, ci_low, ci_high, p_value
    factors: list[str]
    n_runs: int
    blocked_by_seed: bool
    residual_dof: int


def factorial_factors(interventions) -> list[str]:
    """The factors that appear in at least one combined intervention tag."""
    return sorted({factor for name in interventions if "+" in name for factor in name.split("+")})


def fit_factorial(runs: pd.DataFrame, alpha: float = 0.05) -> FactorialResult | None:
    """Fit the factorial model; None when the study has no combined arms.

    Arms split by their config (``tag[key=value]``, see :mod:`analysis.load`) are not cells of the factorial.
    """
    runs = runs[~runs["intervention"].str.contains("[", regex=False)]
    factors = factorial_factors(runs["intervention"].unique())
    if not factors:
        return None
    applied = runs["intervention"].str.get_dummies(sep="+").drop(columns=BASELINE, errors="ignore")
    in_factorial = applied.drop(columns=factors).sum(axis=1) == 0
    data, applied = runs[in_factorial], applied.loc[in_factorial, factors].astype(bool)
    design = applied.astype(float) - 0.5
    pairs = [(a, b) for a, b in combinations(factors, 2) if (applied[a] & applied[b]).any()]
    for a, b in pairs:
        design[f"{a}:{b}"] = design[a] * design[b]
    effect_terms = list(design.columns)
    design.insert(0, "const", 1.0)
    blocks = pd.get_dummies(data["seed"], prefix="seed", drop_first=True, dtype=float)
    blocked = (data.groupby("seed")["intervention"].nunique() > 1).all() and (
        len(data) - design.shape[1] - blocks.shape[1] >= 2
    )
    if blocked:
        design = pd.concat([design, blocks], axis=1)
    if np.linalg.matrix_rank(design.to_numpy()) < design.shape[1]:
        raise ValueError(f"factorial design over {', '.join(factors)} is not estimable: some combinations are missing")
    fit = sm.OLS(data["test_loss"].to_numpy(dtype=float), design).fit()
    interval = fit.conf_int(alpha)
    effects = pd.DataFrame(
        {
            "term": effect_terms,
            "kind": ["interaction" if ":" in term else "main" for term in effect_terms],
            "estimate": fit.params[effect_terms].to_numpy(),
            "ci_low": interval.loc[effect_terms, 0].to_numpy(),
            "ci_high": interval.loc[effect_terms, 1].to_numpy(),
            "p_value": fit.pvalues[effect_terms].to_numpy(),
        }
    )
    return FactorialResult(effects, factors, len(data), bool(blocked), int(fit.df_resid))
