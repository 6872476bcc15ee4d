"""Realistic synthetic studies with known effects and noise.

Used by the tests and the notebook.  The test loss of a run is

    baseline_loss + effect + init_noise + train_noise + repeat_noise

``init_noise`` is drawn once per initial-weights fingerprint, so arms that
keep the baseline's initialisation share it seed by seed, while arms with
``changes_init`` get their own draw.  ``train_noise`` is drawn per (arm, init
seed, train seed) cell: the same dropout masks do not give the same trajectory
under a different intervention.  ``repeat_noise`` is drawn per run (exact
repeats differ only by it).  So the SD across train seeds is
``sqrt(train_sd**2 + repeat_sd**2)`` and the SD across init seeds is
``sqrt(init_sd**2 + train_sd**2 + repeat_sd**2)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.load import BASELINE, mlflow_store


@dataclass(frozen=True)
class NoiseModel:
    init_sd: float = 0.02
    train_sd: float = 0.006
    repeat_sd: float = 0.002
    checkpoint_sd: float = 0.01


@dataclass(frozen=True)
class PlantedIntervention:
    """An arm of the synthetic study and its true effect on test loss."""

    name: str
    effect: float
    changes_init: bool = False


@dataclass
class SyntheticStudy:
    runs: pd.DataFrame
    histories: pd.DataFrame
    noise: NoiseModel
    interventions: list[PlantedIntervention] = field(default_factory=list)

    def true_effects(self) -> dict[str, float]:
        return {arm.name: arm.effect for arm in self.interventions}


def fingerprint(arm: str, seed: int, changes_init: bool) -> str:
    """Stand-in for the sha256 of the initial weights."""
    return hashlib.sha256(f"{arm if changes_init else BASELINE}:{seed}".encode()).hexdigest()


def generate_study(
    interventions: list[PlantedIntervention],
    *,
    init_seeds=(42, 22, 67),
    train_seeds=(23, 67),
    baseline_repeats: int = 3,
    failed_runs: int = 0,
    noise: NoiseModel = NoiseModel(),
    baseline_loss: float = 3.3,
    periods: int = 10,
    steps_per_period: int = 100,
    rng_seed: int = 0,
) -> SyntheticStudy:
    """Every arm runs the grid ``init_seeds x train_seeds`` once.

    The baseline's first cell is run ``baseline_repeats`` times in all (exact
    repeats); ``failed_runs`` extra baseline runs end FAILED without a test
    loss.  ``train_seeds`` may contain ``"none"``.
    """
    rng = np.random.default_rng(rng_seed)
    arms = [PlantedIntervention(BASELINE, 0.0)] + list(interventions)
    init_noise: dict[str, float] = {}
    rows = []
    for arm in arms:
        for seed in init_seeds:
            weights_id = fingerprint(arm.name, seed, arm.changes_init)
            init_noise.setdefault(weights_id, rng.normal(0, noise.init_sd))
            for train_seed in train_seeds:
                train_noise = rng.normal(0, noise.train_sd)
                first_cell = (seed, train_seed) == (init_seeds[0], train_seeds[0])
                repeats = baseline_repeats if arm.name == BASELINE and first_cell else 1
                for _ in range(repeats):
                    loss = (baseline_loss + arm.effect + init_noise[weights_id] + train_noise
                            + rng.normal(0, noise.repeat_sd))
                    rows.append((arm.name, seed, str(train_seed), weights_id, arm.changes_init,
                                 "FINISHED", loss))
    for _ in range(failed_runs):
        seed = init_seeds[0]
        rows.append((BASELINE, seed, str(train_seeds[0]), fingerprint(BASELINE, seed, False),
                     False, "FAILED", np.nan))
    runs = pd.DataFrame(rows, columns=["intervention", "seed", "train_seed", "init_fingerprint",
                                       "changes_init", "status", "test_loss"])
    runs.insert(0, "run_id", [f"synthetic-{i:04d}" for i in range(len(runs))])
    histories = _histories(runs, noise, periods, steps_per_period, rng)
    return SyntheticStudy(runs, histories, noise, list(interventions))


def _histories(runs, noise, periods, steps_per_period, rng) -> pd.DataFrame:
    """``train_loss_avg`` per checkpoint period, decaying towards the run's level."""
    steps = steps_per_period * np.arange(1, periods + 1)
    decay = 8.0 * np.exp(-12.0 * steps / steps[-1])
    levels = runs["test_loss"].fillna(3.5).to_numpy()[:, None] - 0.05
    values = levels + decay + rng.normal(0, noise.checkpoint_sd, (len(runs), periods))
    return pd.DataFrame({
        "run_id": np.repeat(runs["run_id"].to_numpy(), periods),
        "metric": "train_loss_avg",
        "step": np.tile(steps, len(runs)),
        "value": values.ravel(),
    })


def log_study_to_mlflow(
    study: SyntheticStudy,
    study_name: str,
    experiment: str,
    tracking_uri: str,
    artifact_location: str | None = None,
) -> str:
    """Write the study into an MLflow store the way the training harness does.

    A study parent run (``study_parent=true``) and one run per trial with the
    contract's tags and metrics; FAILED runs end with status FAILED.  Returns
    the experiment id.
    """
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    with mlflow_store(tracking_uri) as mlflow:
        found = mlflow.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found else
                         mlflow.create_experiment(experiment, artifact_location=artifact_location))
        with mlflow.start_run(experiment_id=experiment_id, run_name=study_name):
            mlflow.set_tags({"study": study_name, "study_parent": "true"})
        for run in study.runs.itertuples():
            mlflow.start_run(experiment_id=experiment_id,
                             run_name=f"{run.intervention}-{run.seed}")
            mlflow.set_tags({
                "intervention": run.intervention, "seed": str(run.seed),
                "train_seed": run.train_seed, "data_seed": "none",
                "init_fingerprint": run.init_fingerprint,
                "config_hash": hashlib.sha256(run.intervention.encode()).hexdigest()[:12],
                "study": study_name, "scale": "synthetic",
            })
            if np.isfinite(run.test_loss):
                mlflow.log_metric("test_loss", run.test_loss)
            history = study.histories[study.histories["run_id"] == run.run_id]
            client.log_batch(mlflow.active_run().info.run_id, metrics=[
                Metric(h.metric, float(h.value), 0, int(h.step)) for h in history.itertuples()
            ])
            mlflow.end_run(status=run.status)
    return experiment_id
