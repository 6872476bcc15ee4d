"""How much test loss moves when nothing but randomness changes.

Noise kinds (all SDs with ddof=1, pooled over groups, chi-square CIs):

``init``
    SD across init seeds with the train seed fixed: groups are
    (intervention, train_seed, data_seed), varying ``seed``.
``train``
    SD across train seeds with the init seed fixed: groups are
    (intervention, seed, data_seed), varying ``train_seed``.
``repeat``
    SD across exact repeats (identical intervention and seeds): the run-to-run
    noise of non-deterministic kernels.
``checkpoint``
    Checkpoint-to-checkpoint SD of ``train_loss_avg`` over the final periods
    of each run, around a per-run linear trend.

``init`` and ``train`` use one run per seed cell (the first of any exact
repeats), so each value is a single run's outcome and the SD is that of a
single run.  Pooling over arms assumes the interventions do not change the
noise level; the pooled variance is the residual variance of a one-way OLS on
the group (statsmodels), with ``dof = sum(n_group - 1)``.  ``init`` counts
each draw of initial weights once: it leaves out the arms that reuse the
baseline's initial weights and keeps one train-seed level per arm (the one
with the most init seeds), since the other levels repeat the same init draws
and would overstate the degrees of freedom.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import stats

from analysis.load import BASELINE

CELL = ["intervention", "seed", "train_seed", "data_seed"]
NOISE_GROUPS = {
    "init": ["intervention", "train_seed", "data_seed"],
    "train": ["intervention", "seed", "data_seed"],
    "repeat": CELL,
}
NOISE_DESCRIPTIONS = {
    "init": "across init seeds (train seed fixed, one level per arm)",
    "train": "across train seeds (init seed fixed)",
    "repeat": "across exact repeats (same seeds)",
    "checkpoint": "checkpoint to checkpoint (final periods, detrended)",
}


@dataclass(frozen=True)
class NoiseEstimate:
    """A pooled SD with its chi-square confidence interval."""

    kind: str
    sd: float
    ci_low: float
    ci_high: float
    n_runs: int
    n_groups: int
    dof: int

    @property
    def description(self) -> str:
        return NOISE_DESCRIPTIONS[self.kind]


def sd_confidence_interval(sd, dof, alpha: float = 0.05) -> tuple:
    """Chi-square CI for an SD estimated with ``dof`` degrees of freedom."""
    variance_sum = np.asarray(dof) * np.square(sd)
    low = np.sqrt(variance_sum / stats.chi2.ppf(1 - alpha / 2, dof))
    high = np.sqrt(variance_sum / stats.chi2.ppf(alpha / 2, dof))
    return low, high


def keeps_baseline_init(arm: pd.DataFrame, baseline: pd.DataFrame) -> tuple[bool, str]:
    """Whether an arm starts from the baseline's initial weights, and why.

    Compares ``init_fingerprint`` seed by seed; without comparable
    fingerprints uses the ``changes_init`` flag; failing both, assumes the
    initialisation changed.
    """
    baseline_prints = (baseline.dropna(subset=["init_fingerprint"])
                       .drop_duplicates("seed").set_index("seed")["init_fingerprint"])
    fingerprinted = arm.dropna(subset=["init_fingerprint"])
    expected = fingerprinted["seed"].map(baseline_prints)
    compared = expected.notna()
    if compared.any():
        if (fingerprinted["init_fingerprint"][compared] == expected[compared]).all():
            return True, "same init_fingerprint as baseline"
        return False, "init_fingerprint differs from baseline"
    flags = arm["changes_init"].dropna()
    if len(flags):
        changes = bool(flags.astype(bool).any())
        return not changes, f"changes_init={str(changes).lower()}"
    return False, "init fingerprints not comparable (no shared seeds); init noise assumed"


def arms_reusing_baseline_init(runs: pd.DataFrame) -> list[str]:
    baseline = runs[runs["intervention"] == BASELINE]
    return [name for name, arm in runs.groupby("intervention")
            if name != BASELINE and keeps_baseline_init(arm, baseline)[0]]


def init_identity(runs: pd.DataFrame) -> pd.Series:
    """A label of each run's initial weights: the owning arm and the seed."""
    reusing = arms_reusing_baseline_init(runs)
    owner = runs["intervention"].where(~runs["intervention"].isin(reusing), BASELINE)
    return owner + "|" + runs["seed"].astype(str)


def single_run_cells(runs: pd.DataFrame) -> pd.DataFrame:
    """One run per seed cell: the first started of any exact repeats."""
    return runs.sort_values("order", kind="stable").drop_duplicates(CELL, keep="first")


def _independent_init_draws(cells: pd.DataFrame) -> pd.DataFrame:
    """Single-run cells in which every set of initial weights appears once."""
    own_init = cells[~cells["intervention"].isin(arms_reusing_baseline_init(cells))]
    levels = own_init.groupby(NOISE_GROUPS["init"]).size()
    widest = (levels.sort_values(ascending=False, kind="stable")
              .groupby(level="intervention").head(1))
    return own_init[own_init.set_index(NOISE_GROUPS["init"]).index.isin(widest.index)]


def noise_groups(runs: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The runs that measure one noise kind, with a ``group`` label.

    Only groups with at least two runs are kept (a lone run says nothing
    about noise).
    """
    if kind == "repeat":
        source = runs
    elif kind == "init":
        source = _independent_init_draws(single_run_cells(runs))
    else:
        source = single_run_cells(runs)
    grouped = source.groupby(NOISE_GROUPS[kind], sort=False)
    return source.assign(group=grouped.ngroup())[grouped["test_loss"].transform("size") >= 2]


def pooled_noise(values: pd.Series, groups: pd.Series, kind: str, alpha: float) -> NoiseEstimate:
    """Pooled within-group SD: residual SD of the OLS ``value ~ C(group)``."""
    if len(values) == 0:
        return NoiseEstimate(kind, np.nan, np.nan, np.nan, 0, 0, 0)
    design = pd.get_dummies(groups.to_numpy(), dtype=float)
    fit = sm.OLS(values.to_numpy(dtype=float), design).fit()
    dof = int(round(fit.df_resid))
    sd = float(np.sqrt(fit.scale)) if dof > 0 else np.nan
    low, high = sd_confidence_interval(sd, dof, alpha) if dof > 0 else (np.nan, np.nan)
    return NoiseEstimate(kind, sd, float(low), float(high), len(values), design.shape[1], dof)


def estimate_noise(runs: pd.DataFrame, alpha: float = 0.05) -> dict[str, NoiseEstimate]:
    """The ``init``, ``train`` and ``repeat`` noise estimates of a study."""
    estimates = {}
    for kind in NOISE_GROUPS:
        grouped = noise_groups(runs, kind)
        estimates[kind] = pooled_noise(grouped["test_loss"], grouped["group"], kind, alpha)
    return estimates


def residuals_by_kind(runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's deviation from its group mean, per noise kind (for plots)."""
    frames = []
    for kind in NOISE_GROUPS:
        grouped = noise_groups(runs, kind)
        deviation = grouped["test_loss"] - grouped.groupby("group")["test_loss"].transform("mean")
        frames.append(pd.DataFrame({"kind": kind, "deviation": deviation.to_numpy()}))
    return pd.concat(frames, ignore_index=True)


def checkpoint_noise(
    histories: pd.DataFrame, final_periods: int = 5, alpha: float = 0.05
) -> NoiseEstimate:
    """SD of ``train_loss_avg`` between the final checkpoints of each run.

    Takes the last ``final_periods`` finite values of each run (runs with at
    least three), fits a line per run (OLS on the period index) so that the
    remaining downward trend is not counted as noise, and pools the residual
    variance over runs: ``sum(SSR) / sum(dof)``.
    """
    averages = histories[histories["metric"] == "train_loss_avg"]
    averages = averages.assign(value=pd.to_numeric(averages["value"], errors="coerce"))
    averages = averages[np.isfinite(averages["value"])]
    final = averages.sort_values("step").groupby("run_id").tail(final_periods)
    fits = [
        sm.OLS(run["value"].to_numpy(), sm.add_constant(np.arange(len(run), dtype=float))).fit()
        for _, run in final.groupby("run_id") if len(run) >= 3
    ]
    dof = int(sum(round(fit.df_resid) for fit in fits))
    if dof == 0:
        return NoiseEstimate("checkpoint", np.nan, np.nan, np.nan, 0, 0, 0)
    sd = float(np.sqrt(sum(fit.ssr for fit in fits) / dof))
    low, high = sd_confidence_interval(sd, dof, alpha)
    return NoiseEstimate(
        "checkpoint", sd, float(low), float(high), int(sum(fit.nobs for fit in fits)),
        len(fits), dof,
    )


def noise_table(estimates: dict[str, NoiseEstimate]) -> pd.DataFrame:
    """The estimates as a table, one row per noise kind."""
    rows = [asdict(e) | {"description": e.description} for e in estimates.values()]
    return pd.DataFrame(rows)


def grid_arms(runs: pd.DataFrame) -> list[str]:
    """Arms whose runs cover a full grid of >= 2 init seeds x >= 2 train seeds."""
    arms = []
    for arm, group in runs.groupby("intervention"):
        n_seeds, n_train = group["seed"].nunique(), group["train_seed"].nunique()
        n_cells = len(group.drop_duplicates(["seed", "train_seed"]))
        if n_seeds >= 2 and n_train >= 2 and n_cells == n_seeds * n_train:
            arms.append(arm)
    return arms


def variance_components(runs: pd.DataFrame) -> tuple[pd.DataFrame | None, str]:
    """Init, train and residual variance components of the grid arms.

    A nested random-effects model (statsmodels ``MixedLM``, REML): a random
    intercept per set of initial weights (arms reusing the baseline's share
    it), a train-seed effect per (arm, train seed) nested in it, and the
    residual, which is the run-to-run noise of exact repeats.  Arms enter as
    fixed effects.  The loss is standardised for the fit and the variances
    scaled back; the derivative-free optimisers (Powell, then Nelder-Mead)
    are used because the gradient ones stall on these small variances.
    Without exact repeats the train and residual components cannot be told
    apart, and the train row holds both.  Returns the table (or None when no
    arm is a grid) and a note.
    """
    arms = grid_arms(runs)
    if not arms:
        return None, "no arm covers a grid of init seeds x train seeds"
    data = runs[runs["intervention"].isin(arms)]
    scale = data["test_loss"].std()
    data = data.assign(
        loss=(data["test_loss"] - data["test_loss"].mean()) / scale,
        init_weights=init_identity(data),
        train_cell=data["intervention"] + "|" + data["train_seed"],
    )
    has_repeats = data.duplicated(CELL).any()
    model = smf.mixedlm(
        "loss ~ C(intervention)" if len(arms) > 1 else "loss ~ 1", data,
        groups=data["init_weights"], re_formula="1",
        vc_formula={"train": "0 + C(train_cell)"} if has_repeats else None,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = model.fit(reml=True, method=["powell", "nm"])
    variances = {
        "init": float(fit.cov_re.iloc[0, 0]),
        "train": float(fit.vcomp[0]) if has_repeats else float(fit.scale),
        "residual": float(fit.scale) if has_repeats else np.nan,
    }
    table = pd.DataFrame({"component": list(variances),
                          "variance": np.array(list(variances.values())) * scale**2})
    table["sd"] = np.sqrt(table["variance"].clip(lower=0))
    table["share"] = table["variance"] / table["variance"].sum()
    notes = [f"arms: {', '.join(arms)}; {len(data)} runs"]
    if not has_repeats:
        notes.append("no exact repeats, so the train row includes run-to-run noise")
    if not fit.converged:
        notes.append("MixedLM did not converge; treat the components as rough")
    notes += sorted({str(w.message).splitlines()[0] for w in caught
                     if "boundary" in str(w.message)})
    return table, "; ".join(notes)
