"""The looks of a sequential study and their decisions: per-look tests, group-sequential Holm, the decision table.

:func:`sequential_decisions` replays a real study's looks; the procedure is described in docs/sequential.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from analysis.compare import ArmPlan, plan_comparisons, test_arm
from analysis.load import BASELINE
from analysis.noise import NoiseDesign, noise_designs, noise_statistics
from analysis.sequential.boundaries import SPENDING, paired_t_boundaries, spent_alpha
from analysis.stats import DifferenceTest, seeds_needed, t_test_power

OPEN, BETTER, WORSE, NO_EFFECT = 0, 1, 2, 3
DECISIONS = np.array(["open", "better", "worse", "no meaningful effect"])
TARGET_POWER = 0.8
METHOD = (  # {spending}: the spending function's name
    "Sequential design: after each round the study is analysed again. Each intervention is "
    "compared with the baseline as in the fixed analysis (prediction t against pooled noise with "
    "one init seed, paired t over init seeds from two). Repeated looks spend alpha by Lan-DeMets "
    "{spending}-type spending over the information fraction (paired init seeds / max_seeds); "
    "paired looks use exact boundaries for the sequence of t statistics, a one-seed look spends "
    "its share at its exact marginal level. Holm across interventions is group-sequential "
    "(Maurer-Bretz graphical approach): an arm is tested at alpha/m with m the interventions not "
    "yet rejected, and rejections are final. better/worse: the repeated confidence interval "
    "excludes zero and the difference is at least min_effect; no meaningful effect: the interval "
    "lies inside +-min_effect; open: neither, the arm gets the next init seed."
)


def method_text(spending: str = "obrien_fleming") -> str:
    """The method paragraph every look prints, naming its spending function."""
    return METHOD.format(spending=SPENDING[spending])


# --- the comparisons at one look ---------------------------------------------------------------


@dataclass
class LookTests:
    """Every intervention's comparison with the baseline at one look: (..., interventions)."""

    difference: np.ndarray
    statistic: np.ndarray
    standard_error: np.ndarray
    dof: np.ndarray
    noise_sd: np.ndarray  # of the arm's noise reference, for effect sizes and seeds needed


@dataclass
class LookPlan:
    """The comparisons of one look without losses: the fixed analysis's noise designs and arm plans.

    ``plans[i]`` is None for an intervention without runs; ``seeds[i]`` the
    init seeds its comparison rests on (paired seeds, or the arm's seeds
    for a one-look test).
    """

    interventions: list[str]
    designs: dict[str, NoiseDesign]
    plans: list[ArmPlan | None]
    seeds: np.ndarray

    def kind(self, arm: int) -> str | None:
        """``paired``, ``single`` (a one-look test, e.g. the prediction test) or None (no test)."""
        plan = self.plans[arm]
        if plan is None or plan.design == "none":
            return None
        return "paired" if plan.design == "paired" else "single"

    def noise(self, losses) -> dict[str, tuple]:
        return noise_statistics(self.designs, losses)

    def tests(self, losses) -> LookTests:
        """The tests of :mod:`analysis.compare` on ``losses`` (..., runs of the look)."""
        losses = np.asarray(losses, dtype=float)
        noise = self.noise(losses)
        shape = losses.shape[:-1] + (len(self.interventions),)
        fields = {name: np.full(shape, np.nan) for name in LookTests.__dataclass_fields__}
        for arm, plan in enumerate(self.plans):
            if plan is None:
                continue
            other = "init" if plan.reference == "train" else "train"
            reference = noise[plan.reference][0]
            fields["noise_sd"][..., arm] = np.where(np.isfinite(reference), reference, noise[other][0])
            if plan.design == "none":
                continue
            test = test_arm(plan, losses, noise)
            fields["difference"][..., arm] = test.difference
            fields["statistic"][..., arm] = test.statistic
            fields["dof"][..., arm] = test.dof
            fields["standard_error"][..., arm] = _standard_error(test)
        return LookTests(**fields)


def plan_look(runs: pd.DataFrame, interventions: list[str]) -> LookPlan:
    """The look's noise designs and comparisons (``runs``: the runs of the look)."""
    runs = runs.reset_index(drop=True)
    designs = noise_designs(runs)
    measurable = {kind for kind in ("train", "init") if designs[kind].dof > 0}
    plans = {plan.intervention: plan for plan in plan_comparisons(runs, measurable)}
    ordered = [plans.get(name) for name in interventions]
    seeds = np.array(
        [
            0
            if plan is None or plan.design == "none"
            else plan.treated.shape[0]
            if plan.design == "paired"
            else plan.n_intervention_seeds
            for plan in ordered
        ]
    )
    return LookPlan(list(interventions), designs, ordered, seeds)


def _standard_error(test: DifferenceTest, alpha: float = 0.05) -> np.ndarray:
    """The SE behind a test's (1 - alpha) t interval."""
    with np.errstate(invalid="ignore"):
        return (test.ci_high - test.difference) / stats.t.isf(alpha / 2, test.dof)


# --- the procedure, look by look ---------------------------------------------------------------


class SequentialProcedure:
    """Group-sequential Holm over the interventions, updated one look at a time.

    Arrays have the leading shape given (repetitions) and one entry per
    intervention.  ``decision`` holds OPEN, BETTER, WORSE or NO_EFFECT;
    ``rejected_at`` the ``m`` of the level ``alpha / m`` at which an arm's
    null hypothesis was rejected (0: not rejected); the other arrays what
    the latest look that tested each arm found.
    """

    def __init__(
        self,
        interventions: list[str],
        shape: tuple,
        max_seeds: int,
        alpha: float = 0.05,
        min_effect: float = 0.0,
        spending: str = "obrien_fleming",
    ):
        self.interventions = list(interventions)
        self.max_seeds, self.alpha, self.min_effect = max_seeds, alpha, min_effect
        self.spending = spending
        full = tuple(shape) + (len(self.interventions),)
        self.decision = np.full(full, OPEN)
        self.decided_at = np.zeros(full, dtype=int)
        self.rejected_at = np.zeros(full, dtype=int)
        self.history: list[list[tuple[str, int]]] = [[] for _ in self.interventions]
        self.looks = 0
        self.seeds = np.zeros(full, dtype=int)
        self.level = np.full(full, np.nan)
        self.boundary, self.dof = np.full(full, np.nan), np.full(full, np.nan)
        self.difference, self.standard_error = np.full(full, np.nan), np.full(full, np.nan)

    @property
    def open(self) -> np.ndarray:
        return self.decision == OPEN

    @property
    def current_level(self) -> np.ndarray:
        """Each arm's level now: ``alpha / m`` at its rejection, else with m those standing."""
        rejected = self.rejected_at > 0
        standing = np.maximum((~rejected).sum(axis=-1, keepdims=True), 1)
        return self.alpha / np.where(rejected, self.rejected_at, standing)

    @property
    def ci_low(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return self.difference - self.boundary * self.standard_error

    @property
    def ci_high(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return self.difference + self.boundary * self.standard_error

    def boundaries(self, arm: int, dof, future: tuple[int, ...] = ()) -> np.ndarray:
        """|t| boundaries of the arm's latest look (then of ``future`` paired looks) at every level.

        Returns (..., levels, looks): level ``m`` is ``alpha / m``; looks are
        the latest tested look followed by one per ``future`` seed count.
        """
        kinds = [kind for kind, _ in self.history[arm]] + ["paired"] * len(future)
        seeds = [n for _, n in self.history[arm]] + list(future)
        fractions = np.minimum(np.array(seeds, dtype=float) / self.max_seeds, 1.0)
        levels = self.alpha / np.arange(1, len(self.interventions) + 1)
        increments = np.diff(spent_alpha(fractions[:, None], levels, self.spending), axis=0, prepend=0.0)
        paired = [look for look, kind in enumerate(kinds) if kind == "paired"]
        if paired:
            chain = paired_t_boundaries([seeds[look] for look in paired], increments[paired])
        dof = np.asarray(dof, dtype=float)
        columns = []
        for look in range(len(kinds) - 1 - len(future), len(kinds)):
            if kinds[look] == "paired":
                columns.append(np.broadcast_to(chain[:, paired.index(look)], dof.shape + levels.shape))
            else:
                with np.errstate(invalid="ignore"):
                    columns.append(stats.t.isf(increments[look] / 2, dof[..., None]))
        return np.stack(columns, axis=-1)

    def update(self, plan: LookPlan, tests: LookTests) -> None:
        """Test every open arm that has new seeds, Holm-reject, and decide (docs/sequential.md)."""
        self.looks += 1
        count = len(self.interventions)
        critical = np.full(self.decision.shape + (count,), np.inf)
        tested = np.zeros(count, dtype=bool)
        for arm in range(count):
            kind, seeds = plan.kind(arm), int(plan.seeds[arm])
            if kind is None or seeds <= (self.history[arm][-1][1] if self.history[arm] else 0):
                continue
            self.history[arm].append((kind, seeds))
            tested[arm] = True
            critical[..., arm, :] = self.boundaries(arm, tests.dof[..., arm])[..., 0]
        testing = self.open & tested
        with np.errstate(invalid="ignore"):
            crossed = testing[..., None] & (np.abs(tests.statistic)[..., None] >= critical)
        self._holm(np.cumprod(crossed, axis=-1).sum(axis=-1))

        rejected = self.rejected_at > 0
        free = count - rejected.sum(axis=-1, keepdims=True)
        level = np.maximum(np.where(rejected, self.rejected_at, free), 1)
        boundary = np.take_along_axis(critical, (level - 1)[..., None], axis=-1)[..., 0]
        for name, value in (
            ("seeds", plan.seeds),
            ("level", self.alpha / level),
            ("boundary", boundary),
            ("dof", tests.dof),
            ("difference", tests.difference),
            ("standard_error", tests.standard_error),
        ):
            current = getattr(self, name)
            current[...] = np.where(testing, value, current)
        low, high, difference = self.ci_low, self.ci_high, self.difference
        with np.errstate(invalid="ignore"):
            resolved = testing & rejected & ((low > 0) | (high < 0))
            large = np.abs(difference) >= self.min_effect
            negligible = (self.min_effect > 0) & (low > -self.min_effect) & (high < self.min_effect)
        decision = np.where(
            resolved & large, np.where(difference < 0, BETTER, WORSE), np.where(testing & negligible, NO_EFFECT, OPEN)
        )
        newly = self.open & (decision != OPEN)
        self.decision = np.where(newly, decision, self.decision)
        self.decided_at = np.where(newly, self.looks, self.decided_at)

    def _holm(self, strictest: np.ndarray) -> None:
        """Holm's step-down, continued from the hypotheses rejected at earlier looks.

        ``strictest``: per arm the largest ``m`` such that this look crosses
        the boundaries of ``alpha / 1`` to ``alpha / m`` (0: none).  With ``r`` hypotheses
        still standing, the arm with the largest value is rejected if it
        crossed at ``alpha / r``, the next at ``alpha / (r - 1)``, and so on.
        """
        rejected = self.rejected_at > 0
        standing = (~rejected).sum(axis=-1, keepdims=True)
        candidate = np.where(rejected, 0, strictest)
        order = np.argsort(-candidate, axis=-1, kind="stable")
        ranked = np.take_along_axis(candidate, order, axis=-1)
        needed = standing - np.arange(candidate.shape[-1])
        passes = np.cumprod((ranked >= needed) & (ranked > 0), axis=-1).astype(bool)
        new = np.zeros_like(self.rejected_at)
        np.put_along_axis(new, order, np.where(passes, needed, 0), axis=-1)
        self.rejected_at = np.where(rejected, self.rejected_at, new)


# --- one real study: the decisions after a round -----------------------------------------------


def round_seeds(seeds, look: int, first_seeds: int = 1) -> list[int]:
    """The init seeds round ``look`` adds: the first ``first_seeds``, then one per round."""
    seeds = list(seeds)
    if look == 1:
        return seeds[:first_seeds]
    return seeds[first_seeds + look - 2 : first_seeds + look - 1]


def last_look(max_seeds: int, first_seeds: int = 1) -> int:
    """The look at which every open arm has ``max_seeds`` init seeds."""
    return max_seeds - first_seeds + 1


def check_design(
    seeds,
    look: int | None,
    max_seeds: int,
    alpha: float,
    min_effect: float,
    first_seeds: int,
    spending: str = "obrien_fleming",
) -> None:
    if spending not in SPENDING:
        raise ValueError(f"spending={spending!r}; choose from {', '.join(SPENDING)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the seed schedule repeats a seed: {list(seeds)}")
    if not 1 <= first_seeds <= max_seeds:
        raise ValueError(f"first_seeds={first_seeds} must be between 1 and max_seeds={max_seeds}")
    if len(seeds) < max_seeds:
        raise ValueError(f"the seed schedule lists {len(seeds)} init seeds; max_seeds={max_seeds} needs that many")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be between 0 and 1")
    if not min_effect >= 0:
        raise ValueError(f"min_effect={min_effect} must be >= 0")
    final = last_look(max_seeds, first_seeds)
    if look is not None and not 1 <= look <= final:
        raise ValueError(
            f"look={look}: a study with max_seeds={max_seeds} and first_seeds={first_seeds} has looks 1 to {final}"
        )


@dataclass
class BaselineNeeds:
    """What the baseline must still run."""

    seeds: int  # init seeds it has run
    next_seed: int | None  # the next round's init seed (None: the study stops)
    more_seeds: float  # the most any open arm still needs (NaN: unknown; inf: out of reach)
    noise: dict[str, tuple[float, float]]  # train/init noise (sd, dof) at this look


@dataclass
class SequentialLook:
    """The decisions of a sequential study after one look.

    ``table`` has one row per intervention (see :data:`TABLE_COLUMNS`);
    ``stop_reason`` is None while the study goes on, else ``nothing open``
    or ``max_seeds reached``; ``next_round`` lists the arms (baseline
    first) that run ``next_seed``; ``missing`` the (intervention, seed)
    pairs a round scheduled that have no finished run.
    """

    look: int
    max_seeds: int
    alpha: float
    min_effect: float
    table: pd.DataFrame
    baseline: BaselineNeeds
    stop_reason: str | None
    next_seed: int | None
    next_round: list[str]
    missing: list[tuple[str, int]] = field(default_factory=list)
    spending: str = "obrien_fleming"
    method: str = method_text()

    def counts(self) -> dict[str, int]:
        """Decisions by kind, plus the look: metrics for the study's parent run."""
        decided = self.table["decision"].value_counts()
        names = {"better": "n_better", "worse": "n_worse", "no meaningful effect": "n_no_effect", "open": "n_open"}
        return {"look": self.look} | {key: int(decided.get(kind, 0)) for kind, key in names.items()}

    def markdown(self, stop_reason: str | None = None, method: bool = True) -> str:
        """The look as Markdown: status, the decisions, what stays open, and the method.

        ``stop_reason`` overrides the study's own (e.g. a spent budget);
        ``method=False`` leaves the method paragraph out.
        """
        reason = stop_reason or self.stop_reason
        status = (
            f"stopped after look {self.look}: {reason}"
            if reason
            else f"look {self.look}; next round: init seed {self.next_seed} for {', '.join(self.next_round)}"
        )
        lines = [
            f"**Sequential study** ({status}; max_seeds={self.max_seeds}, "
            f"alpha={self.alpha}, min_effect={self.min_effect}, spending={self.spending})",
            "",
            "| intervention | decision | look | seeds | difference | RCI | level | "
            "boundary t | dof | method | more seeds |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in self.table.itertuples():
            more = _more(row.more_seeds, row.beyond_max_seeds) if row.decision == "open" else "-"
            lines.append(
                f"| {row.intervention} | {row.decision} | {_integer(row.decided_at_look)} | "
                f"{row.seeds} | {_loss(row.difference)} | "
                f"[{_loss(row.rci_low)}, {_loss(row.rci_high)}] | {_general(row.level)} | "
                f"{_general(row.boundary)} | {_integer(row.dof)} | {row.method} | {more} |"
            )
        open_rows = self.table[self.table["decision"] == "open"]
        if len(open_rows):
            needs = "; ".join(
                f"{row.intervention} {_more(row.more_seeds, row.beyond_max_seeds)}" for row in open_rows.itertuples()
            )
            lines += [
                "",
                f"Still open, with the further init seeds each would need for 80% power at its level: {needs}.",
            ]
            if not reason:
                lines[-1] += (
                    f" The baseline runs init seed {self.next_seed} with them; from look "
                    "2 on every test is paired, so its noise study needs nothing more."
                )
        if self.missing:
            lines += [
                "",
                "Scheduled without a finished run: " + ", ".join(f"{name} seed {seed}" for name, seed in self.missing),
            ]
        return "\n".join(lines + (["", self.method] if method else []))


TABLE_COLUMNS = [
    "intervention",
    "decision",
    "decided_at_look",
    "seeds",
    "method",
    "difference",
    "rci_low",
    "rci_high",
    "level",
    "boundary",
    "dof",
    "noise_reference",
    "noise_sd",
    "effect_in_sd",
    "more_seeds",
    "beyond_max_seeds",
]


def _loss(value) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:+.6f}"


def _general(value) -> str:
    return "-" if np.isnan(value) else f"{value:.4g}"


def _integer(value) -> str:
    return "-" if not np.isfinite(value) or value == 0 else f"{value:g}"


def _more(value, beyond: bool) -> str:
    if not np.isfinite(value):
        return "unknown" if np.isnan(value) else "out of reach"
    return f"{value:.0f}" + (" (beyond max_seeds)" if beyond else "")


def sequential_decisions(
    runs: pd.DataFrame,
    seeds,
    look: int,
    max_seeds: int,
    alpha: float = 0.05,
    min_effect: float = 0.0,
    first_seeds: int = 1,
    interventions: list[str] | None = None,
    spending: str = "obrien_fleming",
) -> SequentialLook:
    """Replay a sequential study's looks 1..``look`` on its runs and decide.

    ``runs``: the analysis run table (:func:`analysis.load.prepare_runs`,
    FINISHED runs with a finite test loss) of every round so far; runs at
    seeds outside the first rounds, or of an arm after it was decided, are
    left out.  ``seeds``: the init-seed schedule (at least ``max_seeds``).
    ``interventions``: the study's interventions (the Holm family; default:
    those in ``runs``).  ``spending``: ``obrien_fleming`` or ``pocock``.
    The result is a deterministic function of these, so a resumed study
    takes the same decisions again.
    """
    seeds = [int(seed) for seed in seeds]
    check_design(seeds, look, max_seeds, alpha, min_effect, first_seeds, spending)
    runs = runs.reset_index(drop=True)
    names = sorted(interventions if interventions is not None else set(runs["intervention"]) - {BASELINE})
    procedure = SequentialProcedure(names, (), max_seeds, alpha, min_effect, spending)
    is_baseline = runs["intervention"] == BASELINE
    scheduled = pd.Series(False, index=runs.index)
    missing = []
    for current in range(1, look + 1):
        if current > 1 and not procedure.open.any():
            break
        running = [BASELINE] + [name for name, open_ in zip(names, procedure.open) if open_]
        added = runs["seed"].isin(round_seeds(seeds, current, first_seeds))
        scheduled |= added & (is_baseline | runs["intervention"].isin(running))
        present = set(zip(runs.loc[scheduled, "intervention"], runs.loc[scheduled, "seed"]))
        missing += [
            (name, seed)
            for name in running
            for seed in round_seeds(seeds, current, first_seeds)
            if (name, seed) not in present
        ]
        at_look = runs[scheduled]
        plan = plan_look(at_look, names)
        tests = plan.tests(at_look["test_loss"].to_numpy(dtype=float))
        procedure.update(plan, tests)
    table = _decision_table(procedure, plan, tests)
    open_any = bool(procedure.open.any())
    stop_reason = (
        None
        if open_any and procedure.looks < last_look(max_seeds, first_seeds)
        else "max_seeds reached"
        if open_any
        else "nothing open"
    )
    next_seed = None if stop_reason else round_seeds(seeds, procedure.looks + 1, first_seeds)[0]
    noise = plan.noise(at_look["test_loss"].to_numpy(dtype=float))
    baseline = BaselineNeeds(
        int(at_look.loc[at_look["intervention"] == BASELINE, "seed"].nunique()),
        next_seed,
        _most(table.loc[table["decision"] == "open", "more_seeds"]),
        {kind: (float(noise[kind][0]), float(noise[kind][1])) for kind in ("train", "init")},
    )
    next_round = [] if stop_reason else [BASELINE] + table.loc[table["decision"] == "open", "intervention"].tolist()
    return SequentialLook(
        procedure.looks,
        max_seeds,
        alpha,
        min_effect,
        table,
        baseline,
        stop_reason,
        next_seed,
        next_round,
        missing,
        spending,
        method_text(spending),
    )


def _most(values: pd.Series) -> float:
    values = values.to_numpy(dtype=float)
    if not len(values) or np.isnan(values).all():
        return np.nan
    return float(np.nanmax(values))


def _decision_table(procedure: SequentialProcedure, look: LookPlan, tests: LookTests) -> pd.DataFrame:
    rows = []
    for arm, name in enumerate(procedure.interventions):
        plan = look.plans[arm]
        decision = int(procedure.decision[arm])
        noise_sd = float(tests.noise_sd[arm])
        difference = float(procedure.difference[arm])
        more, beyond = _more_seeds(procedure, arm, noise_sd) if decision == OPEN else (0.0, False)
        rows.append(
            {
                "intervention": name,
                "decision": DECISIONS[decision],
                "decided_at_look": int(procedure.decided_at[arm]) or np.nan,
                "seeds": int(procedure.seeds[arm]),
                "method": plan.method if plan is not None else "no runs",
                "difference": difference,
                "rci_low": float(procedure.ci_low[arm]),
                "rci_high": float(procedure.ci_high[arm]),
                "level": float(procedure.level[arm]),
                "boundary": float(procedure.boundary[arm]),
                "dof": float(procedure.dof[arm]),
                "noise_reference": plan.reference if plan is not None else "",
                "noise_sd": noise_sd,
                "effect_in_sd": difference / noise_sd if noise_sd > 0 else np.nan,
                "more_seeds": more,
                "beyond_max_seeds": beyond,
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _more_seeds(procedure: SequentialProcedure, arm: int, noise_sd: float) -> tuple[float, bool]:
    """Further init seeds for 80% power at the boundaries still ahead (NaN: cannot tell).

    From the arm's current difference and the pooled noise SD of its
    reference (paired differences have SD ``sqrt(2) * noise_sd``, as in
    :func:`analysis.compare.seeds_needed`): the first seed count up to
    ``max_seeds`` whose look would cross the boundary at the arm's current
    level with 80% probability.  If none would, the seeds a fixed design at
    that level needs (flagged as beyond ``max_seeds``).
    """
    effect = float(procedure.difference[arm])
    if not (np.isfinite(effect) and np.isfinite(noise_sd) and noise_sd > 0):
        return np.nan, False  # also an arm never tested
    level = float(procedure.current_level[arm])
    now = procedure.history[arm][-1][1]
    future = np.arange(max(now + 1, 2), procedure.max_seeds + 1)
    if future.size:
        level_index = int(round(procedure.alpha / level)) - 1
        boundaries = procedure.boundaries(arm, np.nan, tuple(future))[level_index, 1:]
        noncentrality = abs(effect) / (np.sqrt(2) * noise_sd) * np.sqrt(future)
        power = t_test_power(noncentrality, future - 1, critical=boundaries)
        reached = np.flatnonzero(power >= TARGET_POWER)
        if reached.size:
            return float(future[reached[0]] - now), False
    fixed = seeds_needed(effect, noise_sd, paired=True, alpha=level, power=TARGET_POWER)
    return float(max(fixed, procedure.max_seeds + 1) - now), True
