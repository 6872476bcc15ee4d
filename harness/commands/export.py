"""`python -m harness export PATH [best|latest] out=DIR`: a trial's weights as a Hugging Face GPT-2 directory.

DIR gets `config.json` and `model.safetensors` in the layout `GPT2LMHeadModel.save_pretrained` writes, so
`GPT2LMHeadModel.from_pretrained(DIR)` (and `harness.trial.hf.load_gpt2`) compute what the trial's model computes.
The safetensors header records where the weights came from (run id, step, config hash, checkpoint).
"""

import sys
from pathlib import Path

from harness.trial import hf
from harness.trial.evaluation import INPUT_ERRORS, POINTERS, error_message, load_saved_trial
from harness.trial.plugins import Plugin, plugin_class

USAGE = """\
usage: python -m harness export PATH [best|latest] out=DIR

Writes a trial's checkpoint as a Hugging Face GPT-2 directory (config.json + model.safetensors).

  PATH    a run directory, its checkpoints/ directory, or a step_NNNNNN checkpoint directory
  best    the checkpoint with the lowest period-average training loss
  latest  the last checkpoint (the default)
  out     the directory to create; it must not hold files already
"""


def export_checkpoint(path: Path, out: Path, which: str | None = None) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out={out} already holds files; choose a new directory")
    saved = load_saved_trial(path, which)
    reshaping = sorted(name for name in saved.cfg.plugins if plugin_class(name).build_model is not Plugin.build_model)
    if reshaping:
        raise ValueError(
            f"plugins {reshaping} change the model (their build_model hook); a GPT-2 directory "
            f"holds only the plain GPT-2 layout, so this trial cannot be exported"
        )
    provenance = {
        "harness_run_id": saved.run_id,
        "harness_step": str(saved.step),
        "harness_config_hash": saved.config_hash,
        "harness_checkpoint": str(saved.checkpoint.resolve()),
    }
    return hf.save_gpt2(saved.model, out, provenance)


def main(arguments: list[str]) -> int:
    if not arguments or arguments[0] in ("-h", "--help", "help"):
        print(USAGE, end="", file=sys.stdout if arguments else sys.stderr)
        return 0 if arguments else 2
    path, *rest = arguments
    outs = [a.removeprefix("out=") for a in rest if a.startswith("out=")]
    pointers = [a for a in rest if a in POINTERS]
    others = [a for a in rest if not a.startswith("out=") and a not in POINTERS]
    if len(outs) != 1 or len(pointers) > 1 or others or not outs[0]:
        print(f"error: expected PATH [best|latest] out=DIR, got {' '.join(arguments)}", file=sys.stderr)
        return 2
    try:
        out = export_checkpoint(Path(path), Path(outs[0]), pointers[0] if pointers else None)
    except (FileExistsError, *INPUT_ERRORS) as error:
        print(f"error: {error_message(error)}", file=sys.stderr)
        return 2
    print(out)
    return 0
