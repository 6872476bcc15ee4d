"""Realistic synthetic studies with known effects and noise, for the tests, the notebook and the simulations.

A run's test loss is ``baseline_loss + effect + init_noise + train_noise + repeat_noise``, each drawn at its own level
(init weights, (arm, init seed, train seed) cell, run); :meth:`SyntheticStudy.simulate` draws many studies of one
design at once. The model is described in docs/noise.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.load import BASELINE, PARAM_PREFIX, mlflow_store


@dataclass(frozen=True)
class NoiseModel:
    init_sd: float = 0.02
    train_sd: float = 0.006
    repeat_sd: float = 0.002
    checkpoint_sd: float = 0.01

    @property
    def single_run_train_sd(self) -> float:
        """What the train-seed noise estimate measures."""
        return float(np.hypot(self.train_sd, self.repeat_sd))


# The reproduced study (docs/study.md): a baseline noise study and each intervention once at seed 42.
SEEDS_BASELINE_CELLS = ((42, "none"), (22, "none"), (67, "none"), (42, 23), (42, 67), (22, 23), (67, 23))
SEEDS_INTERVENTION_CELLS = ((42, "none"),)
SEEDS_NOISE = NoiseModel(init_sd=0.012, train_sd=0.004, repeat_sd=0.0, checkpoint_sd=0.01)
SEEDS_BASELINE_LOSS = 3.69


@dataclass(frozen=True)
class PlantedIntervention:
    """An arm of the synthetic study and its true effect on test loss."""

    name: str
    effect: float
    changes_init: bool = False  # its init_fingerprint differs from the baseline's
    shares_init_noise: bool | None = None  # default: not changes_init

    @property
    def own_init_draw(self) -> bool:
        shares = not self.changes_init if self.shares_init_noise is None else self.shares_init_noise
        return not shares


def seeds_interventions(**effects: float) -> list[PlantedIntervention]:
    """The seven interventions of the reproduced study (docs/study.md) with the given effects (default 0)."""
    init_changes = {"qkv_bias": (True, False), "weight_tying": (True, True)}
    names = ("gradient_clipping", "no_dropout", "qkv_bias", "lr_schedule", "weight_decay", "weight_tying", "no_amp")
    unknown = set(effects) - set(names)
    if unknown:
        raise ValueError(f"not a seeds intervention: {', '.join(sorted(unknown))}")
    return [PlantedIntervention(name, effects.get(name, 0.0), *init_changes.get(name, (False,))) for name in names]


@dataclass
class SyntheticStudy:
    runs: pd.DataFrame
    histories: pd.DataFrame
    noise: NoiseModel
    interventions: list[PlantedIntervention] = field(default_factory=list)
    baseline_loss: float = 3.3
    init_offsets: dict[int, float] = field(default_factory=dict)

    def true_effects(self) -> dict[str, float]:
        return {arm.name: arm.effect for arm in self.interventions}

    def simulate(self, repetitions: int, rng: np.random.Generator) -> np.ndarray:
        """Test losses of fresh studies of this design: (repetitions, runs), NaN if not FINISHED."""
        runs, noise = self.runs, self.noise
        arms = {arm.name: arm for arm in self.interventions}
        own_draw = runs["intervention"].map(lambda name: name in arms and arms[name].own_init_draw)
        seed = runs["seed"].astype(str)
        draws = pd.factorize(runs["intervention"].where(own_draw, BASELINE) + "|" + seed)[0]
        cells = pd.factorize(runs["intervention"] + "|" + seed + "|" + runs["train_seed"])[0]
        effect = runs["intervention"].map(lambda name: arms[name].effect if name in arms else 0.0)
        offset = runs["seed"].map(lambda s: self.init_offsets.get(s, 0.0))
        losses = (
            self.baseline_loss
            + effect.to_numpy()
            + offset.to_numpy()
            + rng.normal(0, noise.init_sd, (repetitions, draws.max() + 1))[:, draws]
            + rng.normal(0, noise.train_sd, (repetitions, cells.max() + 1))[:, cells]
            + rng.normal(0, noise.repeat_sd, (repetitions, len(runs)))
        )
        return np.where((runs["status"] == "FINISHED").to_numpy(), losses, np.nan)


def fingerprint(arm: str, seed: int, changes_init: bool) -> str:
    """Stand-in for the sha256 of the initial weights."""
    return hashlib.sha256(f"{arm if changes_init else BASELINE}:{seed}".encode()).hexdigest()


def generate_study(
    interventions: list[PlantedIntervention],
    *,
    init_seeds=(42, 22, 67),
    train_seeds=(23, 67),
    baseline_cells=None,
    intervention_cells=None,
    baseline_repeats: int = 3,
    failed_runs: int = 0,
    noise: NoiseModel = NoiseModel(),
    baseline_loss: float = 3.3,
    init_offsets: dict[int, float] | None = None,
    periods: int = 10,
    steps_per_period: int = 100,
    rng_seed: int = 0,
) -> SyntheticStudy:
    """A study with its runs' test losses and training-loss histories.

    Every arm runs the grid ``init_seeds x train_seeds`` once, unless
    ``baseline_cells`` or ``intervention_cells`` list (seed, train_seed)
    cells (``SEEDS_BASELINE_CELLS`` and ``SEEDS_INTERVENTION_CELLS`` give the
    seeds' design).  The baseline's first cell is run ``baseline_repeats``
    times in all (exact repeats); ``failed_runs`` extra baseline runs end
    FAILED without a test loss.  ``train_seeds`` may contain ``"none"``.
    """
    grid = [(seed, train_seed) for seed in init_seeds for train_seed in train_seeds]
    baseline_cells = list(baseline_cells or grid)
    intervention_cells = list(intervention_cells or grid)
    arms = [PlantedIntervention(BASELINE, 0.0)] + list(interventions)
    rows = []
    for arm in arms:
        for seed, train_seed in baseline_cells if arm.name == BASELINE else intervention_cells:
            first_cell = (seed, train_seed) == baseline_cells[0]
            repeats = baseline_repeats if arm.name == BASELINE and first_cell else 1
            weights = fingerprint(arm.name, seed, arm.changes_init)
            rows += [(arm.name, seed, str(train_seed), weights, arm.changes_init, "FINISHED")] * repeats
    seed, train_seed = baseline_cells[0]
    rows += [(BASELINE, seed, str(train_seed), fingerprint(BASELINE, seed, False), False, "FAILED")] * failed_runs
    runs = pd.DataFrame(
        rows, columns=["intervention", "seed", "train_seed", "init_fingerprint", "changes_init", "status"]
    )
    runs.insert(0, "run_id", [f"synthetic-{i:04d}" for i in range(len(runs))])
    study = SyntheticStudy(runs, pd.DataFrame(), noise, list(interventions), baseline_loss, dict(init_offsets or {}))
    rng = np.random.default_rng(rng_seed)
    runs["test_loss"] = study.simulate(1, rng)[0]
    study.histories = _histories(runs, noise, periods, steps_per_period, rng)
    return study


def _histories(runs, noise, periods, steps_per_period, rng) -> pd.DataFrame:
    """``train_loss_avg`` per checkpoint period, decaying towards the run's level."""
    steps = steps_per_period * np.arange(1, periods + 1)
    decay = 8.0 * np.exp(-12.0 * steps / steps[-1])
    levels = runs["test_loss"].fillna(3.5).to_numpy()[:, None] - 0.05
    values = levels + decay + rng.normal(0, noise.checkpoint_sd, (len(runs), periods))
    return pd.DataFrame(
        {
            "run_id": np.repeat(runs["run_id"].to_numpy(), periods),
            "metric": "train_loss_avg",
            "step": np.tile(steps, len(runs)),
            "value": values.ravel(),
        }
    )


def log_study_to_mlflow(
    study: SyntheticStudy,
    study_name: str,
    experiment: str,
    tracking_uri: str,
    artifact_location: str | None = None,
) -> str:
    """Write the study into an MLflow store the way the training harness does.

    A study parent run (``study_parent=true``) and one run per trial nested
    under it with the contract's tags and metrics, and the runs' ``params.*`` columns (the flattened config) as
    params; FAILED runs end with status
    FAILED.  Returns the experiment id.
    """
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from harness.tracking.store import mark_experiment

    client = MlflowClient(tracking_uri)
    with mlflow_store(tracking_uri) as mlflow:
        found = mlflow.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id if found else mlflow.create_experiment(experiment, artifact_location=artifact_location)
        )
        mark_experiment(client, client.get_experiment(experiment_id))
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"study {study_name}") as parent:
            mlflow.set_tags({"study": study_name, "study_parent": "true"})
        param_columns = [c for c in study.runs.columns if c.startswith(PARAM_PREFIX)]
        for run, config in zip(study.runs.itertuples(), study.runs[param_columns].to_dict("records"), strict=True):
            params = {key.removeprefix(PARAM_PREFIX): value for key, value in config.items() if pd.notna(value)}
            mlflow.start_run(
                experiment_id=experiment_id,
                run_name=f"{run.intervention} s{run.seed}",
                tags={"mlflow.parentRunId": parent.info.run_id},
            )
            mlflow.set_tags(
                {
                    "intervention": run.intervention,
                    "seed": str(run.seed),
                    "train_seed": run.train_seed,
                    "data_seed": "none",
                    "init_fingerprint": run.init_fingerprint,
                    "config_hash": hashlib.sha256(
                        f"{run.intervention}|{run.seed}|{run.train_seed}|{params}".encode()
                    ).hexdigest()[:16],
                    "study": study_name,
                    "scale": "synthetic",
                }
            )
            mlflow.log_params(params)
            if np.isfinite(run.test_loss):
                mlflow.log_metric("test_loss", run.test_loss)
            history = study.histories[study.histories["run_id"] == run.run_id]
            client.log_batch(
                mlflow.active_run().info.run_id,
                metrics=[Metric(h.metric, float(h.value), 0, int(h.step)) for h in history.itertuples()],
            )
            mlflow.end_run(status=run.status)
    return experiment_id
