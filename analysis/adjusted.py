"""Holm-adjusted intervals: the interval each verdict is decided on.

Each row's t interval is widened to the confidence level 1 - alpha * p / p_Holm, the level at which its own test
rejects exactly when its Holm-adjusted p is below alpha. So the adjusted interval excludes zero exactly when the
verdict is 'better' or 'worse' (with no minimum effect), and the forest plot and the parent run's verdict metrics
never contradict the verdict; docs/analysis.md explains it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def holm_levels(ranking: pd.DataFrame, alpha: float) -> np.ndarray:
    """Per row, the two-sided error rate of its Holm-adjusted interval: alpha * p / p_Holm (alpha when p is 0)."""
    p = ranking["p_value"].to_numpy(dtype=float)
    p_holm = ranking["p_holm"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p_holm > 0, alpha * p / p_holm, alpha)


def holm_intervals(ranking: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """The ranking with `holm_low`, `holm_high` (the adjusted interval) and `holm_confidence` added."""
    low, high = ranking["ci_low"].to_numpy(dtype=float), ranking["ci_high"].to_numpy(dtype=float)
    dof = ranking["dof"].to_numpy(dtype=float)
    levels = holm_levels(ranking, alpha)
    usable = np.isfinite(low) & np.isfinite(high) & (dof > 0) & np.isfinite(levels) & (levels > 0)
    safe_dof = np.where(usable, dof, 1.0)
    with np.errstate(invalid="ignore"):
        standard_error = (high - low) / (2 * stats.t.ppf(1 - alpha / 2, safe_dof))
        half = stats.t.ppf(1 - np.where(usable, levels, alpha) / 2, safe_dof) * standard_error
    centre = (low + high) / 2  # the t interval's centre is the difference its test is about
    return ranking.assign(
        holm_low=np.where(usable, centre - half, np.nan),
        holm_high=np.where(usable, centre + half, np.nan),
        holm_confidence=np.where(usable, 1 - levels, np.nan),
    )
