"""How much test loss moves when nothing but randomness changes: init-seed, train-seed, repeat and checkpoint noise.

Pooled SDs of a single run's test loss with their degrees of freedom (conservative for init-seed noise), and the
noise reference each intervention is judged against. Functions taking ``losses`` are vectorised (last axis: the
study's runs, leading axes: repetitions). The noise model is described in docs/noise.md.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import sparse, stats

from analysis.load import BASELINE

CELL = ["intervention", "seed", "train_seed", "data_seed"]
# Exact repeats: one computation (config_hash) with the same seeds on the same thread count (it changes the bits).
REPEAT_KEY = CELL + ["config_hash", "cpu_threads"]
NOISE_GROUPS = {
    "init": ["intervention", "train_seed", "data_seed"],
    "train": ["intervention", "seed", "data_seed"],
    "repeat": REPEAT_KEY,
}
NOISE_DESCRIPTIONS = {
    "init": "across init seeds (train seed fixed; pooled over train-seed levels)",
    "train": "across train seeds (init seed fixed; pooled over init seeds)",
    "repeat": "across exact repeats (same seeds)",
    "checkpoint": "checkpoint to checkpoint (final periods, detrended)",
}
REFERENCE_RULES = {
    "registry": "declared in the intervention registry",
    "init_fingerprint": "init_fingerprint compared with the baseline's at the same seed",
    "changes_init": "changes_init flag of the runs",
    "assumed": "nothing to compare: init noise assumed",
}


@dataclass(frozen=True)
class NoiseEstimate:
    """A pooled SD with its chi-square confidence interval.

    ``dof`` is the effective number of degrees of freedom (used for the CI
    and for tests against this noise); ``nominal_dof`` is ``sum(n_group - 1)``.
    """

    kind: str
    sd: float
    ci_low: float
    ci_high: float
    n_runs: int
    n_groups: int
    dof: float
    nominal_dof: int = 0

    @property
    def description(self) -> str:
        return NOISE_DESCRIPTIONS[self.kind]


@dataclass(frozen=True)
class ReferenceChoice:
    """The noise an arm is judged against (``train`` or ``init``) and why."""

    reference: str
    rule: str  # a key of REFERENCE_RULES
    reason: str


def sd_confidence_interval(sd, dof, alpha: float = 0.05) -> tuple:
    """Chi-square CI for an SD estimated with ``dof`` degrees of freedom."""
    variance_sum = np.asarray(dof) * np.square(sd)
    low = np.sqrt(variance_sum / stats.chi2.ppf(1 - alpha / 2, dof))
    high = np.sqrt(variance_sum / stats.chi2.ppf(alpha / 2, dof))
    return low, high


def declared_noise_reference(intervention: str) -> str | None:
    """The noise reference the registry declares for an arm, if any.

    A combination ``a+b`` is judged against init noise when a component
    declares init noise, against train noise when every component keeps
    the baseline's initial weights or declares train noise (and one
    declares it); otherwise nothing is declared and the evidence decides.
    """
    from interventions import REGISTRY

    entries = [REGISTRY.get(name) for name in intervention.split("+")]
    if not entries or None in entries:
        return None
    declared = {entry.noise_reference for entry in entries} - {None}
    if "init" in declared:
        return "init"
    if "train" in declared and all(e.noise_reference == "train" or not e.changes_init for e in entries):
        return "train"
    return None


def _keeps_baseline_init(prints: list, flags: list, seeds: list, baseline_prints: dict) -> tuple[bool, str, str]:
    """Whether an arm starts from the baseline's initial weights: (answer, rule, reason).

    Compares ``init_fingerprint`` seed by seed; without comparable fingerprints uses the ``changes_init`` flag;
    failing both, assumes the initialisation changed.
    """
    compared = [
        (p, baseline_prints[s]) for p, s in zip(prints, seeds, strict=True) if p is not None and s in baseline_prints
    ]
    if compared:
        if all(mine == theirs for mine, theirs in compared):
            return True, "init_fingerprint", "same init_fingerprint as baseline"
        return False, "init_fingerprint", "init_fingerprint differs from baseline"
    flags = [flag for flag in flags if flag is not None]
    if flags:
        changes = any(flags)
        return not changes, "changes_init", f"changes_init={str(changes).lower()}"
    return (False, "assumed", "init fingerprints not comparable (no shared seeds); init noise assumed")


def reference_choices(runs: pd.DataFrame) -> dict[str, ReferenceChoice]:
    """Each arm's noise reference: train-seed noise for arms that keep the baseline's initial weights, else init.

    A reference declared in the intervention registry overrides the evidence of the runs (fingerprints, then the
    ``changes_init`` flag). One pass over the runs, so linear in the number of arms.
    """
    prints = [None if pd.isna(p) else p for p in runs["init_fingerprint"].tolist()]
    flags = [None if pd.isna(f) else bool(f) for f in runs["changes_init"].tolist()]
    seeds, names = runs["seed"].tolist(), runs["intervention"].tolist()
    rows: dict[str, list[int]] = {}
    for position, name in enumerate(names):
        rows.setdefault(name, []).append(position)
    baseline_prints: dict = {}
    for position in rows.get(BASELINE, []):
        if prints[position] is not None:
            baseline_prints.setdefault(seeds[position], prints[position])
    choices = {}
    for name, positions in rows.items():
        keeps, rule, reason = _keeps_baseline_init(
            [prints[i] for i in positions],
            [flags[i] for i in positions],
            [seeds[i] for i in positions],
            baseline_prints,
        )
        declared = declared_noise_reference(name)
        if declared:
            choices[name] = ReferenceChoice(
                declared, "registry", f"{declared}-seed noise declared in the registry ({reason})"
            )
        else:
            choices[name] = ReferenceChoice("train" if keeps else "init", rule, reason)
    return choices


def arms_reusing_baseline_init(runs: pd.DataFrame) -> list[str]:
    """Arms judged to share the baseline's initial weights at each seed."""
    return sorted(
        name for name, choice in reference_choices(runs).items() if name != BASELINE and choice.reference == "train"
    )


def init_identity(runs: pd.DataFrame) -> pd.Series:
    """A label of each run's initial weights: the owning arm and the seed."""
    reusing = arms_reusing_baseline_init(runs)
    owner = runs["intervention"].where(~runs["intervention"].isin(reusing), BASELINE)
    return owner + "|" + runs["seed"].astype(str)


def single_run_cells(runs: pd.DataFrame) -> pd.DataFrame:
    """One run per seed cell: the first started of any exact repeats."""
    return runs.sort_values("order", kind="stable").drop_duplicates(CELL, keep="first")


def noise_groups(runs: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The runs that measure one noise kind, with a ``group`` label 0, 1, ...

    Only groups with at least two runs are kept (a lone run says nothing
    about noise).  The rows keep the index of ``runs``.
    """
    source = runs if kind == "repeat" else single_run_cells(runs)
    key = [column for column in NOISE_GROUPS[kind] if column in runs]
    sizes = source.groupby(key, sort=False)["test_loss"].transform("size")
    kept = source[sizes >= 2]
    return kept.assign(group=kept.groupby(key, sort=False).ngroup())


@dataclass(frozen=True)
class NoiseDesign:
    """Which runs measure one noise kind and how: the structure, without losses."""

    kind: str
    positions: np.ndarray  # rows of the run table used
    groups: np.ndarray  # the group (0, 1, ...) of each of those rows
    n_groups: int
    dof: float  # effective degrees of freedom (docs/noise.md)

    @property
    def nominal_dof(self) -> int:
        return len(self.positions) - self.n_groups

    def deviations(self, losses: np.ndarray) -> np.ndarray:
        """``losses[..., positions]`` minus their group means (sparse sums: linear in the number of runs)."""
        used = losses[..., self.positions]
        flat = used.reshape(-1, len(self.positions))
        membership = _membership(self.groups, self.n_groups)
        means = (membership.T @ flat.T).T / np.bincount(self.groups, minlength=self.n_groups)
        return (flat - means[:, self.groups]).reshape(used.shape)


def _membership(labels: np.ndarray, n_labels: int) -> sparse.csr_array:
    """The (rows x labels) indicator matrix of ``labels``."""
    rows = np.arange(len(labels))
    return sparse.csr_array((np.ones(len(labels)), (rows, labels)), shape=(len(labels), n_labels))


def noise_design(runs: pd.DataFrame, kind: str) -> NoiseDesign:
    """The design of one noise kind; ``runs`` must have a RangeIndex."""
    grouped = noise_groups(runs, kind)
    groups = grouped["group"].to_numpy(dtype=np.int64)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    dof = float(len(grouped) - n_groups)
    if kind == "init" and dof > 0:
        draws = pd.factorize(init_identity(runs).loc[grouped.index])[0]
        dof = satterthwaite_dof(groups, n_groups, draws)
    return NoiseDesign(kind, grouped.index.to_numpy(), groups, n_groups, dof)


def satterthwaite_dof(groups: np.ndarray, n_groups: int, draws: np.ndarray) -> float:
    """Effective dof of the pooled within-group sum of squares ``y' M y`` when runs of one init draw share its
    effect (``cov(y)`` proportional to ``S = D D'``, ``D`` the draw indicators): ``tr(MS)^2 / tr(MSMS)``, from
    the draws x draws matrix ``A = D' M D`` (``tr(MS) = tr(A)``, ``tr(MSMS) = sum(A^2)``), so sparse throughout."""
    group_of, draw_of = _membership(groups, n_groups), _membership(draws, int(draws.max()) + 1)
    sizes = np.bincount(groups, minlength=n_groups)
    per_group = group_of.T @ draw_of  # groups x draws: runs of each draw in each group
    within = (draw_of.T @ draw_of) - per_group.T @ sparse.diags_array(1.0 / sizes) @ per_group
    return round(float(within.trace() ** 2 / within.multiply(within).sum()), 9)


def noise_designs(runs: pd.DataFrame) -> dict[str, NoiseDesign]:
    runs = runs.reset_index(drop=True)
    return {kind: noise_design(runs, kind) for kind in NOISE_GROUPS}


def pooled_variance(design: NoiseDesign, losses) -> np.ndarray:
    """Pooled within-group variance for every repetition (NaN without dof)."""
    losses = np.asarray(losses, dtype=float)
    if design.nominal_dof == 0:
        return np.full(losses.shape[:-1], np.nan)
    return np.square(design.deviations(losses)).sum(axis=-1) / design.nominal_dof


def noise_statistics(designs: dict[str, NoiseDesign], losses) -> dict[str, tuple]:
    """``{kind: (sd, dof)}`` for init, train and repeat noise, per repetition."""
    result = {}
    for kind, design in designs.items():
        sd = np.sqrt(pooled_variance(design, losses))
        result[kind] = (sd, np.full(sd.shape, design.dof))
    return result


def estimate_noise(runs: pd.DataFrame, alpha: float = 0.05) -> dict[str, NoiseEstimate]:
    """The ``init``, ``train`` and ``repeat`` noise estimates of a study."""
    runs = runs.reset_index(drop=True)
    designs = noise_designs(runs)
    statistics = noise_statistics(designs, runs["test_loss"].to_numpy(dtype=float))
    estimates = {}
    for kind, design in designs.items():
        sd, dof = (float(value) for value in statistics[kind])
        low, high = sd_confidence_interval(sd, dof, alpha) if dof > 0 else (np.nan, np.nan)
        estimates[kind] = NoiseEstimate(
            kind, sd, float(low), float(high), len(design.positions), design.n_groups, dof, design.nominal_dof
        )
    return estimates


def noise_levels(runs: pd.DataFrame) -> pd.DataFrame:
    """Each group behind the pooled init and train SDs, to check by hand.

    ``sd`` has ddof=1 (what is pooled); ``population_sd`` has ddof=0, the
    seeds' hand calculation: ``sd = population_sd * sqrt(n / (n - 1))``.
    """
    frames = []
    for kind in ("init", "train"):
        grouped = noise_groups(runs, kind)
        data = np.where(grouped["data_seed"] == "none", "", "/d" + grouped["data_seed"].astype(str))
        labelled = grouped.assign(label="s" + grouped["seed"].astype(str) + "/" + grouped["train_seed"] + data)
        by_group = labelled.groupby("group", sort=True)
        first = labelled.drop_duplicates("group").set_index("group").sort_index()
        level = "train_seed " + first["train_seed"] if kind == "init" else "seed " + first["seed"].astype(str)
        level += np.where(first["data_seed"] == "none", "", ", data_seed " + first["data_seed"].astype(str))
        loss = by_group["test_loss"]
        frames.append(
            pd.DataFrame(
                {
                    "noise": kind,
                    "intervention": first["intervention"],
                    "level": level,
                    "runs": by_group["label"].agg(", ".join),
                    "n": loss.size(),
                    "mean": loss.mean(),
                    "sd": loss.std(ddof=1),
                    "population_sd": loss.std(ddof=0),
                }
            )
        )
    columns = ["noise", "intervention", "level", "runs", "n", "mean", "sd", "population_sd"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def residuals_by_kind(runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's deviation from its group mean, per noise kind (for plots)."""
    frames = []
    for kind in NOISE_GROUPS:
        grouped = noise_groups(runs, kind)
        deviation = grouped["test_loss"] - grouped.groupby("group")["test_loss"].transform("mean")
        frames.append(pd.DataFrame({"kind": kind, "deviation": deviation.to_numpy()}))
    return pd.concat(frames, ignore_index=True)


def checkpoint_noise(histories: pd.DataFrame, final_periods: int = 5, alpha: float = 0.05) -> NoiseEstimate:
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
    ssr, dof, n_obs, n_fits = 0.0, 0, 0, 0
    lengths = final.groupby("run_id")["value"].transform("size")
    for length, runs_of_length in final[lengths >= 3].groupby(lengths[lengths >= 3]):
        # one least-squares line per run on the period index, all runs of one length at once
        values = np.stack(runs_of_length.groupby("run_id", sort=True)["value"].agg(list).to_numpy())
        index = np.arange(length, dtype=float) - (length - 1) / 2
        centred = values - values.mean(axis=1, keepdims=True)
        slopes = centred @ index / (index @ index)
        ssr += float(np.square(centred - slopes[:, None] * index).sum())
        dof, n_obs, n_fits = dof + len(values) * (length - 2), n_obs + values.size, n_fits + len(values)
    if dof == 0:
        return NoiseEstimate("checkpoint", np.nan, np.nan, np.nan, 0, 0, 0)
    sd = float(np.sqrt(ssr / dof))
    low, high = sd_confidence_interval(sd, dof, alpha)
    return NoiseEstimate("checkpoint", sd, float(low), float(high), int(n_obs), n_fits, dof, dof)


def noise_table(estimates: dict[str, NoiseEstimate]) -> pd.DataFrame:
    """The estimates as a table, one row per noise kind."""
    rows = [asdict(e) | {"description": e.description} for e in estimates.values()]
    return pd.DataFrame(rows)


def grid_arms(runs: pd.DataFrame) -> list[str]:
    """Arms whose runs separate init from train noise.

    At least two init seeds, and at least two train seeds at one of them: an
    incomplete grid such as the seeds' (3 init seeds, 3 train seeds at one and
    2 at the others) is enough for the mixed model.
    """
    per_seed = runs.groupby(["intervention", "seed"])["train_seed"].nunique()
    by_arm = per_seed.groupby(level="intervention")
    is_grid = (by_arm.size() >= 2) & (by_arm.max() >= 2)
    return sorted(is_grid.index[is_grid])


def variance_components(runs: pd.DataFrame) -> tuple[pd.DataFrame | None, str]:
    """Init, train and residual variance components of the grid arms.

    Unlike the pooled ``init`` SD (a single run's SD across init seeds, train
    noise included), the ``init`` component here is the init-seed part alone.

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
        return None, (
            "no arm covers a grid of init seeds x train seeds (>= 2 init seeds, >= 2 train seeds at one of them)"
        )
    data = runs[runs["intervention"].isin(arms)]
    scale = data["test_loss"].std()
    data = data.assign(
        loss=(data["test_loss"] - data["test_loss"].mean()) / scale,
        init_weights=init_identity(runs).loc[data.index],
        train_cell=data["intervention"] + "|" + data["train_seed"],
    )
    has_repeats = data.duplicated([column for column in REPEAT_KEY if column in data]).any()
    model = smf.mixedlm(
        "loss ~ C(intervention)" if len(arms) > 1 else "loss ~ 1",
        data,
        groups=data["init_weights"],
        re_formula="1",
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
    table = pd.DataFrame({"component": list(variances), "variance": np.array(list(variances.values())) * scale**2})
    table["sd"] = np.sqrt(table["variance"].clip(lower=0))
    table["share"] = table["variance"] / table["variance"].sum()
    notes = [f"arms: {', '.join(arms)}; {len(data)} runs"]
    if not has_repeats:
        notes.append("no exact repeats, so the train row includes run-to-run noise")
    if not fit.converged:
        notes.append("MixedLM did not converge; treat the components as rough")
    notes += sorted({str(w.message).splitlines()[0] for w in caught if "boundary" in str(w.message)})
    return table, "; ".join(notes)
