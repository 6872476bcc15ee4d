"""The simulation table of docs/sequential.md: the sequential design against fixed designs on a study like the reproduced one.

    python -m analysis.sequential.table [repetitions=4000] [max_seeds=8] [min_effect=0]
        [spending=obrien_fleming|pocock]

The study, noise and effects simulated are described in docs/sequential.md.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from scipy import stats

from analysis.load import prepare_runs
from analysis.sequential.boundaries import SPENDING, normal_boundaries, paired_t_boundaries, spent_alpha
from analysis.sequential.simulate import SequentialDesign
from analysis.synthetic import SEEDS_NOISE, SyntheticStudy, generate_study, seeds_interventions

SCHEDULE = (42, 22, 67) + tuple(seed for seed in range(1, 40) if seed not in (22, 67))[:29]
"""The seeds' three init seeds, then 1, 2, ... (32 in all)."""
NOISE_STUDY_TRAIN_SEEDS = (23, 67)
TRAIN_SD = SEEDS_NOISE.single_run_train_sd
INIT_SD = float(np.hypot(SEEDS_NOISE.init_sd, TRAIN_SD))
OWN_INIT = "qkv_bias"
EQUAL_POWER_TOLERANCE = 0.01
SCENARIOS = (  # (label, planted interventions: None = all seven, effect in SDs)
    ("no effect (A/A)", None, 0.0),
    ("all seven at -1 SD", None, 1.0),
    ("all seven at -2 SD", None, 2.0),
    ("all seven at -4 SD", None, 4.0),
    ("lr_schedule, qkv_bias at -1 SD", ("lr_schedule", OWN_INIT), 1.0),
    ("lr_schedule, qkv_bias at -2 SD", ("lr_schedule", OWN_INIT), 2.0),
    ("lr_schedule, qkv_bias at -4 SD", ("lr_schedule", OWN_INIT), 4.0),
)


def planted_effects(names, effect_sd: float) -> dict[str, float]:
    """Test-loss effects of ``-effect_sd`` noise SDs of each arm's own reference."""
    return {name: -effect_sd * (INIT_SD if name == OWN_INIT else TRAIN_SD) for name in names}


def seeds_like_study(
    max_seeds: int,
    effects: dict[str, float] | None = None,
) -> tuple[SyntheticStudy, pd.DataFrame]:
    """The full design (every arm at ``max_seeds`` seeds) and its analysis run table."""
    seeds = SCHEDULE[:max_seeds]
    study = generate_study(
        seeds_interventions(**(effects or {})),
        baseline_cells=[(seed, "none") for seed in seeds]
        + [(seeds[0], train_seed) for train_seed in NOISE_STUDY_TRAIN_SEEDS],
        intervention_cells=[(seed, "none") for seed in seeds],
        baseline_repeats=1,
        noise=SEEDS_NOISE,
        periods=2,
    )
    return study, prepare_runs(study.runs, "sequential", "synthetic").runs


def simulated_losses(study: SyntheticStudy, runs: pd.DataFrame, repetitions: int, rng_seed: int) -> np.ndarray:
    """(repetitions, runs) test losses in the order of the analysis run table."""
    losses = study.simulate(repetitions, np.random.default_rng(rng_seed))
    return losses[:, pd.Index(study.runs["run_id"]).get_indexer(runs["run_id"])]


def compare_designs(
    design: SequentialDesign,
    planted: tuple[str, ...] | None,
    effect_sd: float,
    repetitions: int,
    rng_seed: int,
    alpha: float = 0.05,
    min_effect: float = 0.0,
    spending: str = "obrien_fleming",
) -> dict:
    """One scenario under both designs, on the same simulated studies.

    ``power``: share of planted arms found better; ``false``: share of
    studies with a better/worse verdict on an arm without an effect;
    ``fixed_power[n]`` and ``fixed_trials[n]``: the fixed design with n init
    seeds.
    """
    names = design.interventions
    planted = tuple(names) if planted is None else planted
    effects = planted_effects(planted, effect_sd) if effect_sd else {}
    study, runs = seeds_like_study(design.max_seeds, effects)
    if not (runs["run_id"].to_numpy() == design.runs["run_id"].to_numpy()).all():
        raise RuntimeError("the scenario's runs differ from the design's")
    losses = simulated_losses(study, runs, repetitions, rng_seed)
    effective = np.isin(names, list(effects))
    sequential = design.simulate(losses, alpha, min_effect, spending)
    result = {
        "power": (sequential.decision[:, effective] == "better").mean() if effective.any() else np.nan,
        "false": np.isin(sequential.decision[:, ~effective], ["better", "worse"]).any(axis=-1).mean(),
        "trials": sequential.trials.mean(),
        "fixed_power": {},
        "fixed_false": {},
        "fixed_trials": {},
    }
    for seeds in range(design.first_seeds, design.max_seeds + 1):
        decisions, trials = design.fixed(losses, seeds, alpha, min_effect)
        verdict = decisions.verdict
        result["fixed_power"][seeds] = (verdict[:, effective] == "better").mean() if effective.any() else np.nan
        result["fixed_false"][seeds] = (verdict[:, ~effective] != "inconclusive").any(axis=-1).mean()
        result["fixed_trials"][seeds] = trials
    return result


def simulation_table(
    repetitions: int = 4000,
    max_seeds: int = 8,
    min_effect_sd: float = 0.0,
    alpha: float = 0.05,
    rng_seed: int = 0,
    spending: str = "obrien_fleming",
) -> pd.DataFrame:
    """The README table: each scenario under the sequential and the fixed design.

    ``saved``: the fixed design's trials with ``max_seeds`` minus the
    sequential design's mean.  ``equal_power_seeds``: the fewest init seeds
    with which the fixed design's power is at least the sequential design's
    less ``EQUAL_POWER_TOLERANCE`` (no fixed design can beat a sequential
    one whose power is ~1 by more than simulation noise);
    ``saved_at_equal_power``: that design's trials minus the sequential mean.
    """
    _, runs = seeds_like_study(max_seeds)
    design = SequentialDesign(runs, SCHEDULE, max_seeds)
    rows = []
    for number, (label, planted, effect_sd) in enumerate(SCENARIOS):
        result = compare_designs(
            design, planted, effect_sd, repetitions, rng_seed + number, alpha, min_effect_sd * TRAIN_SD, spending
        )
        equal = [
            seeds for seeds, power in result["fixed_power"].items() if power >= result["power"] - EQUAL_POWER_TOLERANCE
        ]
        rows.append(
            {
                "scenario": label,
                "power": result["power"],
                "fixed_power": result["fixed_power"][max_seeds],
                "false_verdicts": result["false"],
                "fixed_false_verdicts": result["fixed_false"][max_seeds],
                "trials": result["trials"],
                "fixed_trials": result["fixed_trials"][max_seeds],
                "equal_power_seeds": min(equal) if equal else np.nan,
                "equal_power_trials": result["fixed_trials"][min(equal)] if equal else np.nan,
            }
        )
    table = pd.DataFrame(rows)
    table["saved"] = table["fixed_trials"] - table["trials"]
    table["saved_at_equal_power"] = table["equal_power_trials"] - table["trials"]
    return table


def markdown(table: pd.DataFrame, max_seeds: int) -> str:
    def number(value, digits: int) -> str:
        return "-" if not np.isfinite(value) else f"{value:.{digits}f}"

    lines = [
        f"| true effects | power: sequential / fixed {max_seeds} seeds | "
        f"false verdicts: sequential / fixed | trials: sequential (mean) / fixed | saved | "
        "fixed design at equal power | saved at equal power |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        equal = (
            "-"
            if not np.isfinite(row.equal_power_seeds)
            else f"{row.equal_power_seeds:.0f} seeds, {row.equal_power_trials:.0f} trials"
        )
        lines.append(
            f"| {row.scenario} | {number(row.power, 3)} / {number(row.fixed_power, 3)} | "
            f"{row.false_verdicts:.3f} / {row.fixed_false_verdicts:.3f} | "
            f"{row.trials:.1f} / {row.fixed_trials} | {row.saved:.1f} "
            f"({row.saved / row.fixed_trials:.0%}) | {equal} | "
            f"{number(row.saved_at_equal_power, 1)} |"
        )
    return "\n".join(lines)


def boundary_table(
    max_seeds: int = 8,
    alpha: float = 0.05,
    interventions: int = 7,
    noise_dof: int = 2,
    baseline_runs: int = 3,
    spending: str = "obrien_fleming",
) -> pd.DataFrame:
    """What each look can conclude in the seeds-like study, at the first Holm level.

    At ``alpha / interventions`` (the level of the first rejection): the
    alpha spent, the |t| boundary (look 1: the prediction test on
    ``noise_dof`` dof against ``baseline_runs`` baseline runs; then the paired
    t over n seeds), the boundary the usual nominal-level transfer of the
    normal-theory boundary would give, and the smallest difference that
    crosses, in the arm's noise SDs.
    """
    level = alpha / interventions
    seeds = np.arange(1, max_seeds + 1)
    spent = spent_alpha(seeds / max_seeds, level, spending)
    increments = np.diff(spent, prepend=0.0)
    paired = paired_t_boundaries(seeds[1:], increments[1:])
    first = stats.t.isf(increments[0] / 2, noise_dof)
    nominal = 2 * stats.norm.sf(normal_boundaries(seeds / max_seeds, level, spending=spending))
    dof = np.concatenate([[noise_dof], seeds[1:] - 1])
    scale = np.concatenate([[np.sqrt(1 + 1 / baseline_runs)], np.sqrt(2 / seeds[1:])])
    boundary = np.concatenate([[first], paired])
    return pd.DataFrame(
        {
            "look": seeds,
            "init_seeds": seeds,
            "test": ["prediction"] + ["paired"] * (max_seeds - 1),
            "dof": dof,
            "alpha_spent": spent,
            "boundary": boundary,
            "nominal_transfer": stats.t.isf(nominal / 2, dof),
            "smallest_difference_sd": boundary * scale,
        }
    )


def boundary_markdown(table: pd.DataFrame) -> str:
    lines = [
        "| look | init seeds | test (dof) | alpha spent | \\|t\\| boundary | "
        "nominal-level transfer | smallest difference that decides (noise SDs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        lines.append(
            f"| {row.look} | {row.init_seeds} | {row.test} ({row.dof}) | "
            f"{row.alpha_spent:.2g} | {row.boundary:.4g} | {row.nominal_transfer:.4g} | "
            f"{row.smallest_difference_sd:.3g} |"
        )
    return "\n".join(lines)


def nominal_transfer_error(
    max_seeds: int = 8,
    alpha: float = 0.05,
    paths: int = 1_000_000,
    rng_seed: int = 0,
    spending: str = "obrien_fleming",
) -> tuple[float, float]:
    """Null false-positive rates of paired looks at 2..max_seeds seeds: nominal transfer, exact.

    Monte Carlo on normal per-seed differences: the share of paths whose t
    statistic crosses the normal-theory boundary's nominal level at some
    look, and the share crossing the exact t boundaries.
    """
    seeds = np.arange(2, max_seeds + 1)
    fractions = seeds / max_seeds
    exact = paired_t_boundaries(seeds, np.diff(spent_alpha(fractions, alpha, spending), prepend=0.0))
    nominal = stats.t.isf(stats.norm.sf(normal_boundaries(fractions, alpha, spending=spending)), seeds - 1)
    differences = np.random.default_rng(rng_seed).normal(size=(paths, max_seeds))
    means = differences.cumsum(axis=1)[:, seeds - 1] / seeds
    variances = ((differences**2).cumsum(axis=1)[:, seeds - 1] - seeds * means**2) / (seeds - 1)
    statistic = np.abs(means) / np.sqrt(variances / seeds)
    return float((statistic >= nominal).any(axis=1).mean()), float((statistic >= exact).any(axis=1).mean())


def main(argv: list[str] | None = None) -> int:
    options = dict(argument.split("=", 1) for argument in (argv or []))
    unknown = set(options) - {"repetitions", "max_seeds", "min_effect", "spending"}
    if unknown:
        print(
            f"unknown keys: {', '.join(sorted(unknown))}; known: repetitions, max_seeds, "
            "min_effect (in train-seed SDs), spending",
            file=sys.stderr,
        )
        return 2
    repetitions = int(options.get("repetitions", 4000))
    max_seeds = int(options.get("max_seeds", 8))
    min_effect = float(options.get("min_effect", 0.0))
    spending = options.get("spending", "obrien_fleming")
    if spending not in SPENDING:
        print(f"spending={spending}; choose from {', '.join(SPENDING)}", file=sys.stderr)
        return 2
    table = simulation_table(repetitions, max_seeds, min_effect, spending=spending)
    print(
        f"{repetitions} simulated studies per scenario, max_seeds={max_seeds}, alpha=0.05, "
        f"min_effect={min_effect:g} train SDs, spending={spending}; seeds-like study "
        "(7 interventions, SEEDS_NOISE)"
    )
    print(markdown(table, max_seeds))
    print(f"\nBoundaries at alpha/7 (the first rejection among the seven), max_seeds={max_seeds}:")
    print(boundary_markdown(boundary_table(max_seeds, spending=spending)))
    nominal, exact = nominal_transfer_error(max_seeds, spending=spending)
    print(
        f"\nPaired looks at 2..{max_seeds} of {max_seeds} seeds, alpha 0.05, 1,000,000 null "
        f"paths: the nominal-level transfer crosses in {nominal:.2%}, the exact t boundaries in "
        f"{exact:.2%}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
