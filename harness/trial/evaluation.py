"""Held-out evaluation: the fixed test window's losses, in full fp32 and as the study scored its models, HellaSwag
with the same autocast and its per-example record, and loading a saved trial (config, weights, checkpoint) for
scoring by `evaluate`, `export` and `reference`."""

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf
from safetensors.torch import load_model

from harness import progress
from harness.config.compose import config_hash, to_trial_config
from harness.config.schema import DataConfig, EvalConfig, TrialConfig
from harness.data.hellaswag import Example, HellaswagDataError, load_hellaswag
from harness.data.loader import held_out_batches
from harness.data.shards import DataError
from harness.trial import checkpoint, hellaswag
from harness.trial.hellaswag import HellaswagResult
from harness.trial.model import GPTModel, cross_entropy
from harness.trial.weights import build_model


def study_test_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast of `test_loss_amp`: the study scored every model (its no_amp one too) under fp16 autocast
    (the reference's test_loss.py). On a CPU, where fp16 is emulated and several times slower than fp32, only
    fp16_amp trials pay for it; the others score without autocast there."""
    return torch.float16 if device.type == "cuda" or precision == "fp16_amp" else None


def held_out_losses(
    model: GPTModel, tokens, data_cfg: DataConfig, autocast: torch.dtype | None, show_progress: bool = False
) -> dict[str, float]:
    """The fixed held-out window's mean cross-entropy, dropout off, computed two ways:

    - `test_loss`: in full fp32 (highest matmul precision);
    - `test_loss_amp`: as the study computed its published losses (its test_loss.py): `inference_mode` under
      `autocast` (see `study_test_autocast`), the mean of the per-batch mean losses. Without autocast it is
      the same forward pass as `test_loss`, so it is not run twice.

    `show_progress`: a short bar over the eval batches of each pass, on a terminal.
    """
    full = batch_losses(model, tokens, data_cfg, None, show_progress)
    amp = batch_losses(model, tokens, data_cfg, autocast, show_progress) if autocast is not None else full
    return {"test_loss": math.fsum(full) / len(full), "test_loss_amp": sum(amp) / len(amp)}


@torch.inference_mode()
def batch_losses(
    model: GPTModel, tokens, data_cfg: DataConfig, autocast: torch.dtype | None, show_progress: bool = False
) -> list[float]:
    """Each eval batch's mean cross-entropy over the held-out window (all batches hold the same token count)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    context = model.cfg.context_length
    what = "fp32" if autocast is None else f"{str(autocast).removeprefix('torch.')} autocast"
    batches = progress.short_bar(
        held_out_batches(tokens, data_cfg, context),
        data_cfg.test_tokens // (data_cfg.eval_batch_size * context),
        f"test loss ({what})",
        "batch",
        show_progress,
    )
    with full_precision(), amp, batches:
        for inputs, targets in batches:
            losses.append(cross_entropy(model(inputs.to(device)), targets.to(device)).item())
    model.train(was_training)
    return losses


@contextlib.contextmanager
def full_precision():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


POINTERS = ("best", "latest")


# Errors that mean bad input (a wrong path, a missing store, a mismatched file): the commands print their
# message instead of a traceback.
INPUT_ERRORS = (FileNotFoundError, ValueError, KeyError, DataError, HydraException)  # CheckpointError is a ValueError


@dataclass
class SavedTrial:
    cfg: TrialConfig
    model: GPTModel
    checkpoint: Path
    run_id: str
    step: int
    config_hash: str


def load_saved_trial(path: Path, which: str | None = None) -> SavedTrial:
    """The checkpoint's trial config (from its run directory's config.yaml) and model with its weights, on the CPU.

    The model is built as the trial built it, code-level interventions (plugins) included.
    """
    found = checkpoint.find(path, which)
    config_file = found.parent.parent / "config.yaml"  # run_dir/checkpoints/step_NNNNNN
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: the checkpoint {found} needs its trial's saved config")
    cfg = to_trial_config(OmegaConf.load(config_file))
    checkpoint.require_intact(found)
    checkpoint.check_plain(found)  # a corrupt file, or one that is not plain data, is refused by name
    state = checkpoint.load_plain(found / checkpoint.STATE_FILE, mmap=True)
    expected = config_hash(cfg, state.get("world_size"))
    if state["config_hash"] != expected:
        raise ValueError(
            f"{found} was saved with config_hash {state['config_hash']}, but {config_file} "
            f"has {expected}: another config, or a checkpoint of a harness version whose "
            f"config_hash covered other keys"
        )
    model = build_model(cfg)
    load_model(model, str(found / checkpoint.MODEL_FILE))
    return SavedTrial(cfg, model.eval(), found, state["run_id"], state["step"], state["config_hash"])


def evaluation_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def error_message(error: BaseException) -> str:
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


# --- HellaSwag -------------------------------------------------------------------------------------------
HELLASWAG_ARTIFACTS = "hellaswag"  # the run's artifact directory of per-example results
FINAL_HELLASWAG = "final.json"  # the final weights' per-example results, the ones the analysis pairs


def hellaswag_prepare_command(eval_cfg: EvalConfig) -> str:
    out = f" out={eval_cfg.hellaswag_path}" if eval_cfg.hellaswag_path else ""
    return f"python -m harness prepare dataset=hellaswag{out}"


def hellaswag_examples(eval_cfg: EvalConfig, context_length: int) -> list[Example]:
    """The examples `eval_cfg` scores, each ending checked to fit `context_length`; a missing or damaged copy, or
    an ending too long, is a HellaswagDataError (one line, naming the prepare command where it helps)."""
    source = eval_cfg.hellaswag_source()
    if not source.exists():
        raise HellaswagDataError(
            f"eval.hellaswag=true: {source} does not exist; prepare it once with "
            f"`{hellaswag_prepare_command(eval_cfg)}`, or point eval.hellaswag_path at a prepared directory"
        )
    try:
        examples = load_hellaswag(source)
        for example in examples:
            hellaswag.example_rows(example, context_length)
    except ValueError as error:  # HellaswagDataError included
        raise HellaswagDataError(f"eval.hellaswag=true: {error}") from None
    return examples


def score_hellaswag(
    model: GPTModel,
    examples: list[Example],
    eval_cfg: EvalConfig,
    autocast: torch.dtype | None,
    show_progress: bool = False,
) -> HellaswagResult:
    """HellaSwag scored on the model's device under `autocast`, the held-out test loss's (`study_test_autocast`)."""
    device = next(model.parameters()).device
    return hellaswag.score(model, examples, eval_cfg.hellaswag_batch_size, device, autocast, show_progress)


def hellaswag_metrics(result: HellaswagResult) -> dict[str, float]:
    return {"hellaswag_acc": result.acc, "hellaswag_acc_norm": result.acc_norm, "hellaswag_examples": result.n}


def hellaswag_record(result: HellaswagResult, examples: list[Example], step: int) -> str:
    """The per-example results as JSON: which ending each rule chose and the label, by example `ind`, so that the
    analysis can pair two models on the same examples."""
    return json.dumps(
        {
            "step": step,
            "n": result.n,
            "acc": result.acc,
            "acc_norm": result.acc_norm,
            "ind": [example.ind for example in examples],
            "label": result.labels,
            "choice": result.choices,
            "choice_norm": result.choices_norm,
        }
    )
