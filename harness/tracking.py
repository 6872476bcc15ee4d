"""MLflow tracking: one store for every run, written by rank 0 only."""

import fcntl
import hashlib
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from harness.paths import PROJECT_ROOT

log = logging.getLogger(__name__)


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def ensure_store(uri: str) -> None:
    """Create a new sqlite store's tables once, under a lock. MLflow creates them unlocked, so two
    processes opening a fresh store at the same moment break each other's schema migration."""
    if not uri.startswith("sqlite:"):
        return
    import mlflow

    lock_path = Path(tempfile.gettempdir()) / f"harness-mlflow-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        mlflow.MlflowClient(uri).search_experiments(max_results=1)  # the store, cached for this process


def git_state() -> tuple[Optional[str], bool]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return commit.stdout.strip(), bool(status.stdout.strip())


class Tracker:
    """A trial's MLflow run. Per-step metrics are buffered and sent in batches."""

    def __init__(self, uri: Optional[str], experiment: str):
        import mlflow  # imported here: non-zero ranks never load it

        self.mlflow = mlflow
        self.uri = uri or default_tracking_uri()
        ensure_store(self.uri)
        mlflow.set_tracking_uri(self.uri)
        if mlflow.get_experiment_by_name(experiment) is None:
            # A sqlite store keeps its artifacts beside the database file, wherever the cwd is.
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri() \
                if self.uri.startswith("sqlite:///") else None
            try:
                mlflow.create_experiment(experiment, artifact_location=location)
            except mlflow.exceptions.MlflowException:
                if mlflow.get_experiment_by_name(experiment) is None:  # not a lost creation race
                    raise
        mlflow.set_experiment(experiment)
        self.client = mlflow.MlflowClient(self.uri)
        self.run_id: Optional[str] = None
        self._buffer = []

    def start(self, run_name: str, tags: dict[str, str], params: dict) -> str:
        commit, dirty = git_state()
        if commit:
            tags = {**tags, "mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower()}
        run = self.mlflow.start_run(run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self.mlflow.log_params({k: ("None" if v is None else v) for k, v in params.items()})
        return self.run_id

    def resume(self, run_id: str) -> None:
        """Continue a trial's existing run (after `resume=`); its params are already logged."""
        self.run_id = self.mlflow.start_run(run_id=run_id).info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self) -> None:
        for start in range(0, len(self._buffer), 1000):  # MLflow's per-request limit
            self.client.log_batch(self.run_id, metrics=self._buffer[start : start + 1000])
        self._buffer = []

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.mlflow.log_text(text, artifact_file)

    def end(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED."""
        try:
            self.flush()
        finally:
            self.mlflow.end_run(status)


class NullTracker:
    """What ranks other than 0 hold: only rank 0 talks to MLflow."""

    run_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
