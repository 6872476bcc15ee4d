import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from harness.config import compose_trial
from harness.paths import PROJECT_ROOT

# A trial small enough for a few seconds on 2 CPU cores, through every real code path.
TINY = [
    "model.d_model=32", "model.n_head=2", "model.n_layer=1", "model.context_length=32",
    "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.max_steps=4",
    "trainer.checkpoint_interval=2", "data.test_tokens=256", "data.eval_batch_size=4",
    "trainer.progress=false", "trainer.sample_tokens=4", "tracking.log_interval=2",
]


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return compose_trial(cfg, list(overrides))


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for a whole test module (MLFLOW_TRACKING_URI points at it)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def run_harness(*args: str, cwd: Path, env_uri: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m harness ARGS` as a user runs it, in a fresh process."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": env_uri, "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode:
        raise AssertionError(f"harness failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
