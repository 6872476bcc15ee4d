"""Where the project lives: its root, the Hydra config directory, and the tracking store a trial defaults to."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF = PROJECT_ROOT / "conf"


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else the project's `mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
