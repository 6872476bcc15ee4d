"""Many simulated sequential studies through the same plans and procedure as one real study, and the fixed design.

Arrays have leading repetition axes; docs/sequential.md reports what the simulations show.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.compare import decide
from analysis.load import BASELINE
from analysis.sequential.procedure import (
    DECISIONS,
    SequentialProcedure,
    check_design,
    last_look,
    plan_look,
    round_seeds,
)


@dataclass
class SimulatedStudies:
    """Outcomes of simulated sequential studies: arrays (repetitions, interventions)."""

    interventions: list[str]
    decision: np.ndarray  # strings, as in the decision table
    decided_at: np.ndarray  # look of the decision (0: open at the end)
    seeds: np.ndarray  # init seeds each arm ran
    trials: np.ndarray  # (repetitions,) runs the study spent
    difference: np.ndarray  # at each arm's last test, with its repeated confidence interval
    ci_low: np.ndarray
    ci_high: np.ndarray


class SequentialDesign:
    """A sequential study's full design, planned once, for simulating many studies.

    ``runs`` is every arm at every seed of the schedule up to ``max_seeds``
    (the baseline with its noise study): what a study that never stops
    would run.  The plans of each look are made once; :meth:`simulate` and
    :meth:`fixed` then run any number of loss arrays (repetitions, runs)
    through them.
    """

    def __init__(self, runs: pd.DataFrame, seeds, max_seeds: int, first_seeds: int = 1):
        self.seeds = [int(seed) for seed in seeds]
        check_design(self.seeds, None, max_seeds, 0.05, 0.0, first_seeds)
        self.runs = runs.reset_index(drop=True)
        self.max_seeds, self.first_seeds = max_seeds, first_seeds
        self.interventions = sorted(set(self.runs["intervention"]) - {BASELINE})
        self.looks = []  # (runs of the look: bool mask, its plan, runs each arm adds, baseline's)
        arm = self.runs["intervention"]
        for look in range(1, last_look(max_seeds, first_seeds) + 1):
            at_look = self.runs["seed"].isin(self.seeds[: first_seeds + look - 1]).to_numpy()
            added = self.runs["seed"].isin(round_seeds(self.seeds, look, first_seeds))
            self.looks.append(
                (
                    at_look,
                    plan_look(self.runs[at_look], self.interventions),
                    np.array([(added & (arm == name)).sum() for name in self.interventions]),
                    int((added & (arm == BASELINE)).sum()),
                )
            )

    def simulate(
        self, losses, alpha: float = 0.05, min_effect: float = 0.0, spending: str = "obrien_fleming"
    ) -> SimulatedStudies:
        """The sequential design on these studies, through the code of :func:`sequential_decisions`.

        An arm decided in one repetition keeps its later runs in the look's
        table, which changes nothing for the open ones: from look 2 on their
        tests are paired and use only their own and the baseline's runs, and
        at look 1 every arm is in.  A round counts only the arms open in it.
        """
        check_design(self.seeds, None, self.max_seeds, alpha, min_effect, self.first_seeds, spending)
        losses = np.asarray(losses, dtype=float)
        procedure = SequentialProcedure(
            self.interventions, losses.shape[:-1], self.max_seeds, alpha, min_effect, spending
        )
        trials = np.zeros(losses.shape[:-1])
        ran = np.zeros(procedure.decision.shape, dtype=int)
        for look, (at_look, plan, arm_runs, baseline_runs) in enumerate(self.looks, start=1):
            running = procedure.open
            trials += running.any(axis=-1) * baseline_runs + running @ arm_runs
            ran += running * len(round_seeds(self.seeds, look, self.first_seeds))
            procedure.update(plan, plan.tests(losses[..., at_look]))
            if not procedure.open.any():
                break
        return SimulatedStudies(
            self.interventions,
            DECISIONS[procedure.decision],
            procedure.decided_at,
            ran,
            trials,
            procedure.difference,
            procedure.ci_low,
            procedure.ci_high,
        )

    def fixed(self, losses, seeds: int, alpha: float = 0.05, min_effect: float = 0.0):
        """The fixed design with every arm at the first ``seeds`` init seeds, analysed as the fixed analysis does.

        The noise estimates, plans, tests, Holm and verdicts of
        :func:`analysis.compare.decide` (what :func:`analysis.compare.decide_studies`
        runs), on that look's runs.  Returns (decisions, trials).
        """
        at_look, plan = self.looks[seeds - self.first_seeds][:2]
        looked = np.asarray(losses, dtype=float)[..., at_look]
        plans = [p for p in plan.plans if p is not None]
        return decide(plans, looked, plan.noise(looked), alpha, min_effect), int(at_look.sum())
