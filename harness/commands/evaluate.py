"""`python -m harness evaluate PATH [best|latest] [hellaswag=true]`: a saved checkpoint's held-out test loss (and
HellaSwag), logged to its run.

PATH is a run directory, its `checkpoints/` directory or one `step_NNNNNN` checkpoint; the losses are logged as
`checkpoint_test_loss` and `checkpoint_test_loss_amp` into the trial's own MLflow run. docs/trial.md has the details;
docs/hellaswag.md those of HellaSwag scored after the fact."""

import dataclasses
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from harness.arguments import split, whole_number
from harness.data.loader import open_dataset
from harness.paths import default_tracking_uri
from harness.tracking.liveness import own_store
from harness.trial.evaluation import (
    FINAL_HELLASWAG,
    HELLASWAG_ARTIFACTS,
    INPUT_ERRORS,
    POINTERS,
    SavedTrial,
    error_message,
    evaluation_device,
    held_out_losses,
    hellaswag_examples,
    hellaswag_metrics,
    hellaswag_record,
    load_saved_trial,
    score_hellaswag,
    study_test_autocast,
)

USAGE = """\
usage: python -m harness evaluate PATH [best|latest] [hellaswag=true] [hellaswag_path=DIR] [hellaswag_batch_size=N]

Evaluates a saved checkpoint on its trial's held-out test window and logs the losses as
checkpoint_test_loss (full fp32) and checkpoint_test_loss_amp (the study's fp16-autocast evaluation), at the
checkpoint's step, into the trial's MLflow run.

  PATH                  a run directory, its checkpoints/ directory, or a step_NNNNNN checkpoint directory
  best                  the checkpoint with the lowest period-average training loss
  latest                the last checkpoint (the default)
  hellaswag=true        also score HellaSwag with the test loss's autocast: the final checkpoint of a trial not yet
                        scored gets its hellaswag_acc / hellaswag_acc_norm (with hellaswag/final.json), which the
                        study's analysis reads; any other score is logged as checkpoint_hellaswag_acc[_norm] with
                        hellaswag/evaluated_step_NNNNNN_TIME.json, and a recorded score is never replaced
  hellaswag_path=DIR    a prepared HellaSwag directory or jsonl file (default: the trial's eval.hellaswag_path)
  hellaswag_batch_size  rows per forward pass (default: the trial's eval.hellaswag_batch_size)
"""
HELLASWAG_KEYS = ("hellaswag", "hellaswag_path", "hellaswag_batch_size")


def mlflow_client(uri: str):
    """A client for an existing store; a missing sqlite file is an error, not a new empty store."""
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"no MLflow store at {uri}; set MLFLOW_TRACKING_URI to the store the trial logged to")
    return MlflowClient(uri)


def evaluate_checkpoint(
    path: Path, which: str | None = None, hellaswag: dict[str, str] | None = None
) -> tuple[dict[str, float], SavedTrial]:
    """Evaluate the checkpoint and log `checkpoint_test_loss` and `checkpoint_test_loss_amp` at its step into
    its trial's MLflow run; returns {"test_loss": …, "test_loss_amp": …} and the checkpoint. `hellaswag`: the
    HellaSwag settings (HELLASWAG_KEYS) given on the command line; with hellaswag=true it is scored too."""
    from mlflow.exceptions import MlflowException

    saved = load_saved_trial(path, which)
    eval_cfg = hellaswag_settings(saved, hellaswag or {})
    examples = (
        hellaswag_examples(eval_cfg, saved.cfg.model.context_length) if eval_cfg.hellaswag else []
    )  # before any compute
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
    autocast = study_test_autocast(saved.cfg.trainer.precision, device)
    losses = held_out_losses(saved.model.to(device), tokens, saved.cfg.data, autocast, show_progress=True)
    for name, value in losses.items():
        client.log_metric(saved.run_id, f"checkpoint_{name}", value, step=saved.step)
    if examples:
        result = score_hellaswag(saved.model, examples, eval_cfg, autocast, show_progress=True)
        # The final weights' first score becomes the trial's own; a score already recorded is never replaced.
        recorded = {Path(f.path).name for f in client.list_artifacts(saved.run_id, HELLASWAG_ARTIFACTS)}
        if saved.step == saved.cfg.trainer.max_steps and FINAL_HELLASWAG not in recorded:
            prefix, artifact = "", FINAL_HELLASWAG
        else:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            prefix, artifact = "checkpoint_", f"evaluated_step_{saved.step:06d}_{stamp}.json"
        for name, value in hellaswag_metrics(result).items():
            client.log_metric(saved.run_id, f"{prefix}{name}", value, step=saved.step)
        client.log_text(
            saved.run_id, hellaswag_record(result, examples, saved.step), f"{HELLASWAG_ARTIFACTS}/{artifact}"
        )
        losses |= {f"{prefix}{name}": value for name, value in hellaswag_metrics(result).items()}
    return losses, saved


def hellaswag_settings(saved: SavedTrial, given: dict[str, str]):
    """The trial's eval settings with the command line's HellaSwag settings on top (hellaswag=true|false)."""
    switch = given.get("hellaswag", "false").lower()
    if switch not in ("true", "false"):
        raise ValueError(f"hellaswag={given['hellaswag']}: must be true or false")
    changes = {"hellaswag": switch == "true"}
    if "hellaswag_path" in given:
        changes["hellaswag_path"] = given["hellaswag_path"]
    if "hellaswag_batch_size" in given:
        size = whole_number("hellaswag_batch_size", given["hellaswag_batch_size"])
        if size < 1:
            raise ValueError(f"hellaswag_batch_size={size}: must be at least 1")
        changes["hellaswag_batch_size"] = size
    return dataclasses.replace(saved.cfg.eval, **changes)


def main(arguments: list[str]) -> int:
    if not arguments or arguments[0] in ("-h", "--help", "help"):
        print(USAGE, end="", file=sys.stdout if arguments else sys.stderr)
        return 0 if arguments else 2
    path, *others = arguments
    given = split(others, HELLASWAG_KEYS)
    rest = given.rest
    if len(rest) > 1 or (rest and rest[0] not in POINTERS):
        print(
            f"error: unexpected arguments {rest}; after PATH give at most one of: {', '.join(POINTERS)}, "
            f"and {'=, '.join(HELLASWAG_KEYS)}=",
            file=sys.stderr,
        )
        return 2
    try:
        losses, saved = evaluate_checkpoint(Path(path), rest[0] if rest else None, given.settings)
    except INPUT_ERRORS as error:
        print(f"error: {error_message(error)}", file=sys.stderr)
        return 2
    scores = "".join(f"  {name} {value:.4f}" for name, value in losses.items() if "hellaswag_acc" in name)
    print(
        f"checkpoint_test_loss {losses['test_loss']:.6f}  checkpoint_test_loss_amp {losses['test_loss_amp']:.6f}"
        f"{scores}  step {saved.step}  run {saved.run_id}  checkpoint {saved.checkpoint}"
    )
    return 0
