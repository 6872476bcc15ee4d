"""Each intervention against the baseline: the design-aware comparison (paired, prediction, Welch or none).

Plans which runs each arm is compared with and on what noise, runs the tests of :mod:`analysis.stats`, Holm-adjusts
across the study and builds the ranking table. Negative differences mean the intervention is better (lower loss).
The designs and what each verdict means are described in docs/analysis.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from analysis.load import BASELINE
from analysis.noise import NoiseEstimate, ReferenceChoice, noise_designs, noise_statistics, reference_choices
from analysis.stats import (
    THIN_DOF,
    DifferenceTest,
    bootstrap_interval,
    holm_adjust,
    no_test,
    paired_test,
    prediction_test,
    probability_better,
    seeds_needed,
    verdicts,
    welch_test,
)

RANKING_COLUMNS = [
    "rank",
    "intervention",
    "verdict",
    "baseline_loss",
    "intervention_loss",
    "difference",
    "ci_low",
    "ci_high",
    "boot_low",
    "boot_high",
    "p_value",
    "p_holm",
    "dof",
    "method",
    "thin_evidence",
    "warning",
    "p_better",
    "p_better_low",
    "p_better_high",
    "noise_reference",
    "noise_sd",
    "effect_in_sd",
    "seeds_needed",
    "design",
    "n_intervention_seeds",
    "n_baseline_seeds",
    "n_intervention_runs",
    "n_baseline_runs",
    "intervention_runs",
    "baseline_runs",
    "reference_rule",
    "reference_reason",
]


@dataclass(frozen=True)
class ArmPlan:
    """How one arm is compared with the baseline: the structure, without losses.

    ``treated`` and ``control`` are weight matrices (replicates x runs of the
    study): ``losses @ treated.T`` gives the arm's replicates (cell or seed
    means), ``losses @ control.T`` the baseline's.  In the paired design row
    i of both belongs to the same init seed.
    """

    intervention: str
    design: str  # paired | prediction | welch | none
    reference: str  # the noise the arm is judged against: train | init
    rule: str  # what decided the reference (see analysis.noise.REFERENCE_RULES)
    reason: str
    treated: sparse.csr_array
    control: sparse.csr_array
    intervention_runs: str
    baseline_runs: str
    n_intervention_runs: int
    n_baseline_runs: int
    n_intervention_seeds: int
    n_baseline_seeds: int

    @property
    def method(self) -> str:
        if self.design == "paired":
            return f"paired t over {self.treated.shape[0]} init seeds"
        if self.design == "welch":
            return f"Welch t, {self.treated.shape[0]} vs {self.control.shape[0]} init seeds"
        if self.design == "prediction":
            return f"prediction t vs {self.reference}-seed noise"
        return "no test"

    def replicates(self, losses) -> tuple[np.ndarray, np.ndarray]:
        losses = np.asarray(losses, dtype=float)
        flat = losses.reshape(-1, losses.shape[-1])
        treated, control = (self.treated @ flat.T).T, (self.control @ flat.T).T
        lead = losses.shape[:-1]
        return treated.reshape(lead + treated.shape[-1:]), control.reshape(lead + control.shape[-1:])


Cells = dict[tuple, list[int]]  # (seed, train_seed, data_seed) -> row positions of its runs, in run order


def _label(cell: tuple, n_runs: int) -> str:
    seed, train_seed, data_seed = cell
    data = "" if data_seed == "none" else f"/d{data_seed}"
    return f"s{seed}/{train_seed}{data}" + (f" x{n_runs}" if n_runs > 1 else "")


def _listing(cells: Cells) -> tuple[str, int]:
    n_runs = int(sum(len(positions) for positions in cells.values()))
    labels = ", ".join(_label(cell, len(positions)) for cell, positions in cells.items())
    return f"{n_runs} run{'s' if n_runs != 1 else ''}: {labels}", n_runs


def _mean_weights(replicates: list[Cells], n_runs: int) -> sparse.csr_array:
    """One row per replicate (a group of cells): the mean over its cells of the cell means (sparse)."""
    rows, columns, values = [], [], []
    for row, cells in enumerate(replicates):
        for positions in cells.values():
            rows += [row] * len(positions)
            columns += positions
            values += [1.0 / (len(cells) * len(positions))] * len(positions)
    return sparse.csr_array((values, (rows, columns)), shape=(len(replicates), n_runs))


def _by_unit(cells: Cells) -> dict[tuple, Cells]:
    """The cells of each (seed, data_seed) unit, units in order of appearance."""
    units: dict[tuple, Cells] = {}
    for cell, positions in cells.items():
        units.setdefault((cell[0], cell[2]), {})[cell] = positions
    return units


def _joined(parts) -> Cells:
    return {cell: positions for part in parts for cell, positions in part.items()}


def _seed_count(cells: Cells) -> int:
    return len({cell[0] for cell in cells})


def plan_arm(
    name: str, choice: ReferenceChoice, arm_cells: Cells, base_cells: Cells, n_runs: int, measurable
) -> ArmPlan:
    """Choose the design and the runs of one comparison (docs/analysis.md)."""
    reference, reason = choice.reference, choice.reason
    arm_units, base_units = _by_unit(arm_cells), _by_unit(base_cells)
    pairs = {}  # unit -> (arm cells, baseline cells) that pair at that unit
    for unit in (u for u in arm_units if u in base_units):
        shared = [cell for cell in arm_units[unit] if cell in base_units[unit]]
        if shared:
            pairs[unit] = ({c: arm_cells[c] for c in shared}, {c: base_cells[c] for c in shared})
        elif reference == "train":  # same initial weights: the seed pairs without a shared cell
            pairs[unit] = (arm_units[unit], base_units[unit])
    if len(pairs) >= 2:
        design = "paired"
        treated = _mean_weights([a for a, _ in pairs.values()], n_runs)
        control = _mean_weights([b for _, b in pairs.values()], n_runs)
        used_arm = _joined(a for a, _ in pairs.values())
        used_base = _joined(b for _, b in pairs.values())
    elif reference == "train" and pairs:
        design = "prediction"
        (unit,) = pairs
        used_arm, used_base = arm_units[unit], base_units[unit]
        treated = _mean_weights([{c: p} for c, p in used_arm.items()], n_runs)
        control = _mean_weights([{c: p} for c, p in used_base.items()], n_runs)
        if len(arm_units) > 1:
            reason += "; its runs at init seeds the baseline did not run are left out"
        if "train" not in measurable:
            reference = "init"
            reason += (
                "; train-seed noise not measured, init-seed noise used (conservative: it includes train-seed noise)"
            )
    elif len(arm_units) >= 2 and len(base_units) >= 2:
        design = "welch"
        if reference == "train":
            reference = "init"
            reason += "; no baseline run at its init seeds, so init-seed noise applies"
        treated = _mean_weights(list(arm_units.values()), n_runs)
        control = _mean_weights(list(base_units.values()), n_runs)
        used_arm, used_base = arm_cells, base_cells
    else:
        design = "prediction"
        if reference == "train":
            reason += "; no baseline run at its init seed, so init-seed noise applies"
        reference = "init"
        levels = {cell[1:] for cell in arm_cells}
        matching = {cell: positions for cell, positions in base_cells.items() if cell[1:] in levels}
        if not matching:
            matching = base_cells
            reason += "; no baseline run at its train seed, baseline seeds averaged over all"
        treated = _mean_weights(list(arm_units.values()), n_runs)
        control = _mean_weights(list(_by_unit(matching).values()), n_runs)
        used_arm, used_base = arm_cells, matching
    if design == "prediction" and reference not in measurable:
        design = "none"
        reason += f"; no {reference}-seed noise estimate to test against"
    (arm_text, n_arm), (base_text, n_base) = _listing(used_arm), _listing(used_base)
    return ArmPlan(
        name,
        design,
        reference,
        choice.rule,
        reason,
        treated,
        control,
        arm_text,
        base_text,
        n_arm,
        n_base,
        _seed_count(used_arm),
        _seed_count(used_base),
    )


def plan_comparisons(runs: pd.DataFrame, measurable: set[str]) -> list[ArmPlan]:
    """One plan per intervention, in name order; ``runs`` must have a RangeIndex.

    ``measurable``: the noise kinds (``train``, ``init``) the study estimates.
    """
    cells: dict[str, Cells] = {}
    keys = zip(runs["seed"].tolist(), runs["train_seed"].tolist(), runs["data_seed"].tolist(), strict=True)
    for position, (name, cell) in enumerate(zip(runs["intervention"].tolist(), keys, strict=True)):
        cells.setdefault(name, {}).setdefault(cell, []).append(position)
    choices = reference_choices(runs)
    return [
        plan_arm(name, choices[name], cells[name], cells[BASELINE], len(runs), measurable)
        for name in sorted(cells)
        if name != BASELINE
    ]


def test_arm(plan: ArmPlan, losses, noise: dict[str, tuple], alpha: float = 0.05) -> DifferenceTest:
    """The plan's test on ``losses`` (..., runs); ``noise``: ``{kind: (sd, dof)}``."""
    losses = np.asarray(losses, dtype=float)
    if plan.design == "none":
        return no_test(losses.shape[:-1])
    treated, control = plan.replicates(losses)
    if plan.design == "paired":
        return paired_test(treated - control, alpha)
    if plan.design == "welch":
        return welch_test(treated, control, alpha)
    noise_sd, noise_dof = noise[plan.reference]
    return prediction_test(treated, control, noise_sd, noise_dof, alpha)


@dataclass
class Decisions:
    """The tests and verdicts of every arm; arrays (..., arms)."""

    tests: list[DifferenceTest]
    difference: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_value: np.ndarray
    p_holm: np.ndarray
    dof: np.ndarray
    verdict: np.ndarray

    @property
    def thin_evidence(self) -> np.ndarray:
        return ~(self.dof >= THIN_DOF)


def decide(
    plans: list[ArmPlan], losses, noise: dict[str, tuple], alpha: float = 0.05, min_effect: float = 0.0
) -> Decisions:
    """Test every arm, Holm-adjust across all of them, and give the verdicts."""
    tests = [test_arm(plan, losses, noise, alpha) for plan in plans]
    shape = np.shape(losses)[:-1] + (len(plans),)

    def stacked(field: str) -> np.ndarray:
        if not tests:
            return np.zeros(shape)
        return np.stack([np.broadcast_to(getattr(test, field), shape[:-1]) for test in tests], axis=-1).astype(float)

    difference, p_value = stacked("difference"), stacked("p_value")
    p_holm = holm_adjust(p_value)
    return Decisions(
        tests,
        difference,
        stacked("ci_low"),
        stacked("ci_high"),
        p_value,
        p_holm,
        stacked("dof"),
        verdicts(difference, p_holm, alpha, min_effect),
    )


def decide_studies(
    runs: pd.DataFrame, losses, alpha: float = 0.05, min_effect: float = 0.0
) -> tuple[list[ArmPlan], Decisions]:
    """Verdicts for many studies with the design of ``runs``: ``losses`` is (..., runs).

    The analysis path, vectorised: the noise estimates of each study
    (:func:`analysis.noise.noise_statistics`), the plans of ``runs`` and
    :func:`decide`.  Used to prove the method by simulation.
    """
    runs = runs.reset_index(drop=True)
    designs = noise_designs(runs)
    plans = plan_comparisons(runs, {kind for kind in ("train", "init") if designs[kind].dof > 0})
    return plans, decide(plans, losses, noise_statistics(designs, losses), alpha, min_effect)


def noise_arrays(noise: dict[str, NoiseEstimate]) -> dict[str, tuple]:
    """``{kind: (sd, dof)}`` of a study's estimates, for :func:`decide`."""
    return {kind: (np.array(estimate.sd), np.array(float(estimate.dof))) for kind, estimate in noise.items()}


def measurable_kinds(noise: dict[str, NoiseEstimate]) -> set[str]:
    return {kind for kind in ("train", "init") if kind in noise and np.isfinite(noise[kind].sd) and noise[kind].dof > 0}


def compare_to_baseline(
    runs: pd.DataFrame,
    noise: dict[str, NoiseEstimate],
    alpha: float = 0.05,
    min_effect: float = 0.0,
    n_resamples: int = 9999,
    random_seed: int = 0,
) -> pd.DataFrame:
    """The ranking table: one row per intervention, sorted by difference.

    Bootstrap intervals, P(better) and seeds needed are computed for all arms at once (linear in the arms).
    """
    runs = runs.reset_index(drop=True)
    plans = plan_comparisons(runs, measurable_kinds(noise))
    if not plans:
        return pd.DataFrame(columns=RANKING_COLUMNS)
    losses = runs["test_loss"].to_numpy(dtype=float)
    decisions = decide(plans, losses, noise_arrays(noise), alpha, min_effect)
    replicates = [plan.replicates(losses) for plan in plans]
    boot_low, boot_high = _bootstrap_intervals(plans, replicates, alpha, n_resamples, random_seed)
    tested = np.array([plan.design != "none" for plan in plans])
    stacked = DifferenceTest(
        *(
            np.array([float(getattr(test, field)) for test in decisions.tests])
            for field in ("difference", "ci_low", "ci_high", "p_value", "statistic", "dof", "standardiser")
        )
    )
    p_better = np.where(tested, probability_better(stacked, alpha), np.nan)
    rows = [
        _row(plan, test, treated, control, noise)
        for plan, test, (treated, control) in zip(plans, decisions.tests, replicates, strict=True)
    ]
    table = pd.DataFrame(rows)
    table["boot_low"], table["boot_high"] = boot_low, boot_high
    table["p_better"], table["p_better_low"], table["p_better_high"] = p_better
    paired_follow_up = [plan.design == "paired" or plan.reference == "train" for plan in plans]
    table["seeds_needed"] = seeds_needed(table["difference"], table["noise_sd"], paired_follow_up, alpha)
    table["p_holm"] = decisions.p_holm
    table["verdict"] = decisions.verdict
    table["thin_evidence"] = decisions.thin_evidence
    table["warning"] = [
        _warning(dof) if thin else "" for dof, thin in zip(decisions.dof, decisions.thin_evidence, strict=True)
    ]
    table = table.sort_values("difference", na_position="last", kind="stable")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table.reset_index(drop=True)[RANKING_COLUMNS]


BOOTSTRAP_CHUNK = 64  # arms per scipy bootstrap call: bounds memory at 64 x resamples x seeds


def _bootstrap_intervals(plans, replicates, alpha, n_resamples, random_seed) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap CIs of the paired and Welch arms, arms of one shape in one call (each call draws the
    resamples from the same seed, so an arm's interval does not depend on the others); NaN for the rest."""
    low, high = np.full(len(plans), np.nan), np.full(len(plans), np.nan)
    batches: dict[tuple, list[int]] = {}
    for i, (plan, (treated, control)) in enumerate(zip(plans, replicates, strict=True)):
        if plan.design in ("paired", "welch"):
            batches.setdefault((plan.design, treated.shape[-1], control.shape[-1]), []).append(i)
    for (design, _, _), members in batches.items():
        for start in range(0, len(members), BOOTSTRAP_CHUNK):
            chunk = members[start : start + BOOTSTRAP_CHUNK]
            treated = np.stack([replicates[i][0] for i in chunk])
            control = np.stack([replicates[i][1] for i in chunk])
            samples = (treated - control,) if design == "paired" else (treated, control)
            low[chunk], high[chunk] = bootstrap_interval(samples, alpha, n_resamples, random_seed)
    return low, high


def _warning(dof: float) -> str:
    if not np.isfinite(dof):
        return "no test"
    return f"thin evidence: {dof:.1f} dof < {THIN_DOF}"


def _row(plan: ArmPlan, test: DifferenceTest, treated, control, noise) -> dict:
    reference, reason = plan.reference, plan.reason
    if not np.isfinite(noise[reference].sd):  # for the effect size only: no test uses it
        other = "init" if reference == "train" else "train"
        if np.isfinite(noise[other].sd):
            reason += f"; {reference}-seed noise not measured, {other} used for the effect size"
            reference = other
    noise_sd = noise[reference].sd
    difference = treated.mean() - control.mean()
    return {
        "intervention": plan.intervention,
        "baseline_loss": control.mean(),
        "intervention_loss": treated.mean(),
        "difference": difference,
        "ci_low": float(test.ci_low),
        "ci_high": float(test.ci_high),
        "p_value": float(test.p_value),
        "dof": float(test.dof),
        "method": plan.method,
        "noise_reference": reference,
        "noise_sd": noise_sd,
        "effect_in_sd": difference / noise_sd,
        "design": plan.design,
        "n_intervention_seeds": plan.n_intervention_seeds,
        "n_baseline_seeds": plan.n_baseline_seeds,
        "n_intervention_runs": plan.n_intervention_runs,
        "n_baseline_runs": plan.n_baseline_runs,
        "intervention_runs": plan.intervention_runs,
        "baseline_runs": plan.baseline_runs,
        "reference_rule": plan.rule,
        "reference_reason": reason,
    }
