"""A sequential study: rounds of init seeds, each followed by a look that decides which arms go on.

`run_study` runs round 1 and hands over to `SequentialStudy.next_round` whenever a round's trials have ended; each
look is recomputed from the store's FINISHED runs, so a resumed study takes the same decisions. The looks, the
stopping rules and the budgets are described in docs/study-runs.md."""

import math
import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from analysis.load import prepare_runs
from analysis.sequential.procedure import SequentialLook, last_look, method_text, sequential_decisions
from harness.study.design import (
    BASELINE,
    StudyConf,
    TrialSpec,
    round_trials,
    sequential_max_seeds,
    sequential_schedule,
    study_arms,
)
from harness.study.outcomes import PlannedTrial, collect_outcomes
from harness.study.store import StudyStore

ENDED_WELL = ("FINISHED", "SKIPPED")


class SequentialStudy:
    """The rounds of one execution of a sequential study. `plan(trials)` composes a round's trials and marks
    those FINISHED earlier (`earlier_run`), exactly as `run_study` plans round 1."""

    def __init__(
        self,
        study: StudyConf,
        tag: str,
        store: StudyStore,
        parent_id: str,
        plan: Callable[[list[TrialSpec]], list[PlannedTrial]],
    ):
        self.study, self.tag, self.store, self.parent_id, self.plan = study, tag, store, parent_id, plan
        self.arms = {TrialSpec(arm, 0, None).intervention: arm for arm in study_arms(study)}
        self.interventions = sorted(set(self.arms) - {BASELINE})
        self.schedule = sequential_schedule(study)
        self.max_seeds = sequential_max_seeds(study)
        self.round = 1
        self.look: SequentialLook | None = None
        self.stop_reason: str | None = None
        self.trials_spent, self.gpu_hours_spent = 0, 0.0
        self.store.patiently(self._log_settings)
        self.say(
            f"sequential: round 1 of at most {last_look(self.max_seeds, study.first_seeds)}, init seeds "
            f"{self.schedule[: study.first_seeds]}; schedule {self.schedule}; alpha={study.alpha}, "
            f"min_effect={study.min_effect:g}, {study.spending} spending"
            + self._budget_text()
            + f"\n{method_text(study.spending)}"
        )

    def say(self, text: str) -> None:
        print(f"[study {self.tag}] {text}", flush=True)

    def next_round(
        self, planned: list[PlannedTrial], pending: list[PlannedTrial], ended_early: dict
    ) -> list[PlannedTrial]:
        """Look at the rounds so far, then plan the next round: its trials join `planned`, those to run join
        `pending` and are returned. Rounds whose trials all FINISHED earlier are looked at in turn. Returns []
        when the study stops (`stop_reason` says why)."""
        while True:
            outcomes = collect_outcomes(planned, ended_early, self.store.children(self.parent_id))
            unfinished = [o for o in outcomes if o.status not in ENDED_WELL]
            if unfinished:
                self.stop_reason = (
                    f"round {self.round} did not finish ({len(unfinished)} of its trials: "
                    f"{', '.join(o.trial for o in unfinished)}); run the same command again"
                )
                return []
            runs = self._runs(outcomes)
            self.trials_spent = len(planned)
            self.gpu_hours_spent = sum(runs["gpu_hours"].dropna())
            self.look = sequential_decisions(
                runs,
                self.schedule,
                self.round,
                self.max_seeds,
                self.study.alpha,
                self.study.min_effect,
                self.study.first_seeds,
                self.interventions,
                self.study.spending,
            )
            self.stop_reason = self.look.stop_reason
            self.store.patiently(self._log_look)
            if self.stop_reason:
                return []
            trials = round_trials(self.study, [self.arms[name] for name in self.look.next_round], [self.look.next_seed])
            new = self.plan(trials)
            self.stop_reason = self._over_budget(new, runs)
            if self.stop_reason:
                return []
            self.round += 1
            to_run = [p for p in new if p.earlier_run is None]
            planned += new
            pending += to_run
            self.say(
                f"sequential: round {self.round}, init seed {self.look.next_seed} for "
                f"{', '.join(self.look.next_round)}: {len(new)} trials, {len(new) - len(to_run)} already "
                f"FINISHED (skipped), {len(to_run)} to run"
            )
            if to_run:
                return to_run

    def _runs(self, outcomes) -> pd.DataFrame:
        """The analysis run table of the planned trials' FINISHED runs, with each run's GPU-hours."""
        ids = {o.run_id for o in outcomes}
        found = {
            r.info.run_id: r
            for r in self.store.search(f"tags.study = '{self.tag}' and attributes.status = 'FINISHED'")
            if r.info.run_id in ids
        }
        missing = ids - set(found)
        if missing:  # a run reused a moment ago cannot vanish unless someone deleted it
            raise RuntimeError(f"study {self.tag}: FINISHED runs {sorted(missing)} are no longer in the store")
        rows = []
        for run in found.values():
            tags, metrics = run.data.tags, run.data.metrics
            rows.append(
                {
                    "run_id": run.info.run_id,
                    "intervention": tags.get("intervention"),
                    "seed": tags.get("seed"),
                    "train_seed": tags.get("train_seed"),
                    "data_seed": tags.get("data_seed"),
                    "init_fingerprint": tags.get("init_fingerprint"),
                    "status": run.info.status,
                    "test_loss": metrics.get("test_loss", math.nan),
                    "order": run.info.start_time,
                    "gpu_hours": gpu_hours(run),
                }
            )
        frame = pd.DataFrame(rows)
        table = prepare_runs(frame, self.tag, "mlflow").runs
        return table.assign(gpu_hours=table["run_id"].map(frame.set_index("run_id")["gpu_hours"]))

    def _over_budget(self, new: list[PlannedTrial], runs: pd.DataFrame) -> str | None:
        """Why the next round would break the budget, or None."""
        study, following = self.study, self.round + 1
        if study.budget_trials is not None and self.trials_spent + len(new) > study.budget_trials:
            return (
                f"budget spent: budget_trials={study.budget_trials}, the study has run {self.trials_spent} "
                f"trials and round {following} needs {len(new)} more"
            )
        if study.budget_gpu_hours is not None:
            estimate = self.next_round_gpu_hours(new, runs)
            if self.gpu_hours_spent + estimate > study.budget_gpu_hours:
                return (
                    f"budget spent: budget_gpu_hours={study.budget_gpu_hours:g}, the study has spent "
                    f"{self.gpu_hours_spent:.4g} GPU-hours and round {following} ({len(new)} trials) would need "
                    f"about {estimate:.4g} more at the {runs['gpu_hours'].mean():.4g} GPU-hours per trial "
                    f"observed so far"
                )
        return None

    def next_round_gpu_hours(self, new: list[PlannedTrial], runs: pd.DataFrame) -> float:
        """The next round's cost: the recorded cost of its trials FINISHED earlier, and the mean GPU-hours per
        trial observed so far for each of the others."""
        per_trial = runs["gpu_hours"].mean()
        per_trial = 0.0 if np.isnan(per_trial) else per_trial
        costs = [per_trial if p.earlier_run is None else gpu_hours(p.earlier_run) for p in new]
        return float(sum(per_trial if np.isnan(cost) else cost for cost in costs))

    def report(self, design: str, interrupted: bool) -> str:
        """Print the study's end (why it stopped, what stays open) and return the parent run's description part:
        `design` followed by the report."""
        look = self.look
        if interrupted and not self.stop_reason:
            self.stop_reason = f"interrupted in round {self.round}; run the same command again to go on"
        reason = self.stop_reason or f"stopped in round {self.round}"
        spent = (
            f"Trials: {self.trials_spent} in {self.round} rounds ({self.gpu_hours_spent:.4g} GPU-hours); the "
            f"fixed design with max_seeds={self.max_seeds} for every arm runs {self._fixed_design_trials()}."
        )
        if look is None:
            text = printed = f"**Sequential study** (stopped before its first look: {reason})"
        elif reason == look.stop_reason:  # the last look, printed a moment ago, says it all
            text, printed = look.markdown() + "\n\n" + spent, spent
        else:
            text = look.markdown(reason) + "\n\n" + spent
            printed = look.markdown(reason, method=False) + "\n\n" + spent
        self.say(f"sequential study stopped: {reason}\n{printed}")
        self.store.patiently(lambda: self._log_end(reason))
        return "\n\n".join(filter(None, [design, text]))

    def _fixed_design_trials(self) -> int:
        return len(self.arms) * self.max_seeds * len(self.study.train_seeds) + sum(
            r.runs - 1 for r in self.study.repeats
        )

    # --- the parent run -------------------------------------------------------------------------------------
    def _log_settings(self) -> None:
        client, run_id = self.store.client, self.parent_id
        client.set_tag(run_id, "sequential", "true")
        for key in ("max_seeds", "first_seeds", "alpha", "min_effect", "spending", "budget_trials", "budget_gpu_hours"):
            value = self.max_seeds if key == "max_seeds" else getattr(self.study, key)
            client.log_param(run_id, f"sequential.{key}", "none" if value is None else value)
        client.log_param(run_id, "sequential.schedule", str(self.schedule))

    def _log_look(self) -> None:
        """The look on the parent run: `sequential/look_K.md` and `.csv`, metrics at step K, a tag per decision,
        and the description."""
        client, run_id, look = self.store.client, self.parent_id, self.look
        text = look.markdown()
        self.say(f"sequential: look {look.look} after round {self.round}\n{look.markdown(method=False)}")
        client.log_text(run_id, text + "\n", f"sequential/look_{look.look}.md")
        client.log_text(run_id, look.table.to_csv(index=False), f"sequential/look_{look.look}.csv")
        metrics = look.counts() | {"trials_spent": self.trials_spent, "gpu_hours_spent": self.gpu_hours_spent}
        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            client.log_metric(run_id, f"sequential.{key}", value, timestamp, step=look.look)
        tags = {
            "sequential.look": str(look.look),
            "sequential.open": ",".join(look.table.loc[look.table["decision"] == "open", "intervention"]),
        }
        for row in look.table.itertuples():
            at = "" if row.decision == "open" else f" (look {row.decided_at_look:.0f})"
            tags[f"sequential.decision.{row.intervention}"] = row.decision + at
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        note = "\n\n".join(filter(None, [self.study.description, text]))
        client.set_tag(run_id, "mlflow.note.content", note)

    def _log_end(self, reason: str) -> None:
        self.store.client.set_tag(self.parent_id, "sequential.stop_reason", reason)
        self.store.client.log_metric(self.parent_id, "sequential.rounds", self.round)

    def _budget_text(self) -> str:
        budgets = [
            f"{key}={getattr(self.study, key):g}"
            for key in ("budget_trials", "budget_gpu_hours")
            if getattr(self.study, key) is not None
        ]
        return f"; {', '.join(budgets)}" if budgets else ""


def gpu_hours(run) -> float:
    """What a FINISHED run cost: train_seconds x world_size, in hours (NaN when it logged no train_seconds)."""
    seconds = run.data.metrics.get("train_seconds")
    return math.nan if seconds is None else seconds * int(run.data.tags.get("world_size", 1)) / 3600
