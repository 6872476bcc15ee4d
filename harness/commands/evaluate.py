"""`python -m harness evaluate PATH [best|latest]`: a saved checkpoint's held-out test loss, logged to its run.

PATH is a run directory, its `checkpoints/` directory or one `step_NNNNNN` checkpoint; the losses are logged as
`checkpoint_test_loss` and `checkpoint_test_loss_amp` into the trial's own MLflow run. docs/trial.md has the details."""

import os
import sys
from pathlib import Path

from harness.data.loader import open_dataset
from harness.paths import default_tracking_uri
from harness.tracking.liveness import own_store
from harness.trial.evaluation import (
    INPUT_ERRORS,
    POINTERS,
    SavedTrial,
    error_message,
    evaluation_device,
    held_out_losses,
    load_saved_trial,
    study_test_autocast,
)

USAGE = """\
usage: python -m harness evaluate PATH [best|latest]

Evaluates a saved checkpoint on its trial's held-out test window and logs the losses as
checkpoint_test_loss (full fp32) and checkpoint_test_loss_amp (the study's fp16-autocast evaluation), at the
checkpoint's step, into the trial's MLflow run.

  PATH    a run directory, its checkpoints/ directory, or a step_NNNNNN checkpoint directory
  best    the checkpoint with the lowest period-average training loss
  latest  the last checkpoint (the default)
"""


def mlflow_client(uri: str):
    """A client for an existing store; a missing sqlite file is an error, not a new empty store."""
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"no MLflow store at {uri}; set MLFLOW_TRACKING_URI to the store the trial logged to")
    return MlflowClient(uri)


def evaluate_checkpoint(path: Path, which: str | None = None) -> tuple[dict[str, float], SavedTrial]:
    """Evaluate the checkpoint and log `checkpoint_test_loss` and `checkpoint_test_loss_amp` at its step into
    its trial's MLflow run; returns {"test_loss": …, "test_loss_amp": …} and the checkpoint."""
    from mlflow.exceptions import MlflowException

    saved = load_saved_trial(path, which)
    uri = (
        own_store(
            saved.cfg.tracking.uri, os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI", f"evaluate {path}"
        )
        or default_tracking_uri()
    )
    client = mlflow_client(uri)
    try:
        client.get_run(saved.run_id)  # before the evaluation: a wrong store fails in seconds, not after it
    except MlflowException:
        raise FileNotFoundError(
            f"the checkpoint's MLflow run {saved.run_id} is not in {uri}; "
            f"set MLFLOW_TRACKING_URI to the store the trial logged to"
        ) from None
    tokens = open_dataset(saved.cfg.data, "test")
    device = evaluation_device()
    losses = held_out_losses(
        saved.model.to(device),
        tokens,
        saved.cfg.data,
        study_test_autocast(saved.cfg.trainer.precision, device),
        show_progress=True,
    )
    for name, value in losses.items():
        client.log_metric(saved.run_id, f"checkpoint_{name}", value, step=saved.step)
    return losses, saved


def main(arguments: list[str]) -> int:
    if not arguments or arguments[0] in ("-h", "--help", "help"):
        print(USAGE, end="", file=sys.stdout if arguments else sys.stderr)
        return 0 if arguments else 2
    path, *rest = arguments
    if len(rest) > 1 or (rest and rest[0] not in POINTERS):
        print(
            f"error: unexpected arguments {rest}; after PATH give at most one of: {', '.join(POINTERS)}",
            file=sys.stderr,
        )
        return 2
    try:
        losses, saved = evaluate_checkpoint(Path(path), rest[0] if rest else None)
    except INPUT_ERRORS as error:
        print(f"error: {error_message(error)}", file=sys.stderr)
        return 2
    print(
        f"checkpoint_test_loss {losses['test_loss']:.6f}  checkpoint_test_loss_amp {losses['test_loss_amp']:.6f}  "
        f"step {saved.step}  run {saved.run_id}  checkpoint {saved.checkpoint}"
    )
    return 0
