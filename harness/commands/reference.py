"""`python -m harness reference path=DIR [trial overrides]`: a Hugging Face GPT-2 as a study's `reference` run.

The overrides compose a trial as `python -m harness` would; the reference model is scored on that trial's held-out
window (`harness.trial.evaluation.held_out_losses`), and on HellaSwag where the trial scores it (eval.hellaswag,
on at gpt2_small), and recorded as a run tagged `intervention=reference`. docs/trial.md has the details."""

import dataclasses
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from harness.config.compose import as_dict, compose_trial
from harness.config.schema import TrialConfig
from harness.data.loader import open_dataset
from harness.paths import PROJECT_ROOT
from harness.tracking.tracker import Tracker
from harness.trial import hf
from harness.trial.evaluation import (
    FINAL_HELLASWAG,
    HELLASWAG_ARTIFACTS,
    INPUT_ERRORS,
    error_message,
    evaluation_device,
    held_out_losses,
    hellaswag_examples,
    hellaswag_metrics,
    hellaswag_record,
    score_hellaswag,
    study_test_autocast,
)
from interventions import flatten

USAGE = """\
usage: python -m harness reference path=DIR [trial overrides, e.g. scale=gpt2_small]

Evaluates a Hugging Face GPT-2 directory (config.json + model.safetensors) on the held-out test window of
the trial the overrides compose, and records it as an MLflow run tagged intervention=reference.
Where that trial scores HellaSwag (eval.hellaswag=true; on at scale=gpt2_small), the reference is scored on it
the same way: hellaswag_acc, hellaswag_acc_norm and the per-example hellaswag/final.json.
"""


def compose_reference_trial(overrides: list[str]) -> TrialConfig:
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose_trial(compose("config", overrides=overrides), overrides)
    if cfg.interventions:
        raise ValueError(f"interventions {cfg.interventions} change training; a reference run evaluates fixed weights")
    return cfg


def evaluate_reference(source: Path, cfg: TrialConfig) -> dict:
    """Evaluate the Hugging Face GPT-2 in `source` on `cfg`'s test window (and HellaSwag, with eval.hellaswag);
    returns the metrics and run_id."""
    source = Path(source).resolve()
    model = hf.load_gpt2(source, context_length=cfg.model.context_length)
    tokens = open_dataset(cfg.data, "test")
    examples = (
        hellaswag_examples(cfg.eval, cfg.model.context_length) if cfg.eval.hellaswag else []
    )  # before the run is recorded
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    device = evaluation_device()
    autocast = study_test_autocast(cfg.trainer.precision, device)
    tags = {
        "intervention": "reference",
        "scale": cfg.scale,
        "reference_source": str(source),
        "device": str(device),
        "test_loss_amp_autocast": str(autocast or "none"),
    }
    params = {
        "scale": cfg.scale,
        "study": cfg.study,
        **flatten({"data": as_dict(cfg)["data"]}),
        **flatten({"model": dataclasses.asdict(model.cfg)}),
    }
    tracker.start(f"reference-{source.name}", tags, params)
    try:
        losses = held_out_losses(model.to(device), tokens, cfg.data, autocast, show_progress=True)
        tracker.log_metrics({**losses, "parameters": model.num_parameters()}, step=0)
        if examples:
            result = score_hellaswag(model, examples, cfg.eval, autocast, show_progress=True)
            losses |= hellaswag_metrics(result)
            tracker.log_metrics(hellaswag_metrics(result), step=0)
            tracker.log_text(hellaswag_record(result, examples, 0), f"{HELLASWAG_ARTIFACTS}/{FINAL_HELLASWAG}")
    except BaseException as error:
        tracker.set_tags({"failure_reason": f"{type(error).__name__}: {error}"[:5000]})
        tracker.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")
    return {**losses, "run_id": tracker.run_id}


def main(arguments: list[str]) -> int:
    if not arguments or arguments[0] in ("-h", "--help", "help"):
        print(USAGE, end="", file=sys.stdout if arguments else sys.stderr)
        return 0 if arguments else 2
    paths = [a.removeprefix("path=") for a in arguments if a.startswith("path=")]
    overrides = [a for a in arguments if not a.startswith("path=")]
    if len(paths) != 1 or not paths[0]:
        print("error: give the Hugging Face GPT-2 directory once, as path=DIR", file=sys.stderr)
        return 2
    try:
        result = evaluate_reference(Path(paths[0]), compose_reference_trial(overrides))
    except INPUT_ERRORS as error:
        print(f"error: {error_message(error)}", file=sys.stderr)
        return 2
    scores = "".join(
        f"  {name} {result[name]:.4f}" for name in ("hellaswag_acc", "hellaswag_acc_norm") if name in result
    )
    print(
        f"test_loss {result['test_loss']:.6f}  test_loss_amp {result['test_loss_amp']:.6f}{scores}  "
        f"run {result['run_id']}  reference {paths[0]}"
    )
    return 0
