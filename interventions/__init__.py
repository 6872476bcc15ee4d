"""The intervention registry: what YAML cannot say about each overlay in `conf/intervention/`, and what the
study found. What an overlay sets is read from its file (`Intervention.changes`), never repeated here.

An intervention is one YAML overlay `conf/intervention/<name>.yaml` plus, only when it needs code the
core lacks, one small module `interventions/<name>.py` that registers a plugin (see harness/trial/plugins.py).
Every overlay has exactly one entry here (a test checks).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OVERLAYS = Path(__file__).resolve().parents[1] / "conf" / "intervention"
BASELINE = "baseline"  # the arm, and the intervention tag, of a trial with no overlay


@dataclass(frozen=True)
class Intervention:
    name: str
    description: str
    changes_init: bool  # whether the initial weights differ from the baseline's for the same seed
    seed_result: str  # what the seeds' study found
    components: tuple[str, ...] = field(default=())  # for stacks: the interventions it combines
    # The noise the analysis judges it against ("train" or "init" seed noise), when the init_fingerprint
    # rule (same initial weights as the baseline -> train-seed noise) would judge it wrongly.
    noise_reference: str | None = None

    def __post_init__(self):
        if self.noise_reference not in (None, "train", "init"):
            raise ValueError(f"{self.name}: noise_reference={self.noise_reference!r}: must be 'train', 'init' or None")

    @property
    def changes(self) -> dict[str, Any]:
        """Config key -> value its overlay sets, read from conf/intervention/<name>.yaml."""
        return overlay_settings(self.name)

    def expanded(self) -> tuple[str, ...]:
        return self.components or (self.name,)


def overlay_settings(name: str) -> dict[str, Any]:
    """What conf/intervention/<name>.yaml sets, flattened (`optim.lr` -> 1.4e-3); {} when there is no such file."""
    path = OVERLAYS / f"{name}.yaml"
    return flatten(overlay_tree(path)) if path.is_file() else {}


def overlay_tree(path: Path) -> dict:
    """An overlay's settings, the overlays its defaults list names merged in order (as Hydra composes them)."""
    from omegaconf import OmegaConf

    own = OmegaConf.to_container(OmegaConf.load(path))
    defaults = own.pop("defaults", [])
    merged = OmegaConf.create()
    for entry in [*defaults, *([] if "_self_" in defaults else ["_self_"])]:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, own)
        elif isinstance(entry, str) and entry.startswith("/intervention/"):
            merged = OmegaConf.merge(merged, overlay_tree(OVERLAYS / f"{entry.removeprefix('/intervention/')}.yaml"))
        else:
            raise ValueError(f"{path}: defaults entry {entry!r}: must be /intervention/NAME or _self_")
    return OmegaConf.to_container(merged)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys; an empty mapping stays one value."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


NOT_RUN = "not run by the seeds (an idea they named)"

REGISTRY: dict[str, Intervention] = {
    i.name: i
    for i in [
        Intervention(
            "gradient_clipping",
            "clip the global L2 gradient norm at 3.5",
            False,
            "positive; kept in the stacked best (pre-clip norms ran 1.1–3; a threshold of 1.0 clipped almost every step)",
        ),
        Intervention(
            "no_dropout",
            "dropout 0.0 on embeddings, attention weights and residual branches",
            False,
            "positive; kept in the stacked best; ~8% faster",
        ),
        Intervention(
            "qkv_bias",
            "bias on the W_q, W_k, W_v projections (+27,648 parameters)",
            True,
            "positive alone, left out of the stacked best; judge against init-seed noise",
        ),
        Intervention(
            "lr_schedule",
            "peak lr 1.4e-3, 5% linear warmup from factor 1e-5, cosine decay to peak/10",
            False,
            "positive; kept in the stacked best; peak 1.4e-3 without the schedule diverged to NaN by step ~1,850",
        ),
        Intervention(
            "weight_decay",
            "AdamW weight decay 0.01 instead of 0.1",
            False,
            "positive; kept in the stacked best (the Cerebras-formula value 0.33724 was a clear negative)",
        ),
        Intervention(
            "weight_tying",
            "output head shares the token-embedding matrix (124,412,160 parameters)",
            True,
            "not among the positives; initial loss ~460 from the N(0,1) embedding init",
            # Every weight it has is the baseline's (the head is dropped, not redrawn): the seeds judged
            # it against train-seed noise, although its init_fingerprint differs.
            noise_reference="train",
        ),
        Intervention(
            "no_amp",
            "full fp32: no autocast, no GradScaler, highest matmul precision (no TF32)",
            False,
            "not among the positives; ~2.4× slower and more memory",
        ),
        Intervention(
            "stacked_best",
            "the seeds' stack: gradient_clipping + weight_decay + no_dropout + lr_schedule",
            False,
            "the seeds' final recipe (no QKV bias)",
            components=("gradient_clipping", "lr_schedule", "no_dropout", "weight_decay"),
        ),
        Intervention("bf16", "bf16 autocast instead of fp16 + GradScaler", False, NOT_RUN),
        Intervention(
            "lr_linear_to_zero",
            "lr_schedule's warmup to 1.4e-3, then linear decay to zero",
            False,
            NOT_RUN,
        ),
        Intervention(
            "lr_wsd",
            "warmup-stable-decay: warmup to 1.4e-3, plateau, linear decay to zero over the last 20%",
            False,
            NOT_RUN,
        ),
        Intervention(
            "no_decay_embeddings_norms_biases",
            "no weight decay on embeddings, LayerNorm parameters and biases",
            False,
            NOT_RUN,
        ),
        Intervention(
            "weight_decay_cerebras",
            "AdamW weight decay 0.33724 (the Cerebras formula)",
            False,
            "a clear negative: the negative control",
        ),
        Intervention(
            "weight_tying_scaled_init",
            "weight tying, shared matrix drawn as the head's U(±1/√d_model), not N(0,1)",
            True,
            "not run by the seeds: tests whether tying's initial loss of ~460 is what hurt it",
        ),
        Intervention(
            "z_loss",
            "z-loss: + 1e-4 × mean(logsumexp(logits)²) on the training loss",
            False,
            "not run by the seeds (code-level plugin example)",
        ),
    ]
}


def describe() -> str:
    """The registry as a table for `python -m harness list`."""
    lines = []
    for item in REGISTRY.values():
        settings = item.changes
        changes = ", ".join(f"{k}={v}" for k, v in settings.items())
        lines += [
            f"{item.name}",
            f"    {item.description}",
            f"    sets: {changes}",
            f"    changes initial weights: {'yes' if item.changes_init else 'no'}",
            *([f"    analysed against: {item.noise_reference}-seed noise (declared)"] if item.noise_reference else []),
            f"    seeds' result: {item.seed_result}",
        ]
        if item.components:
            lines.append(f"    combines: {', '.join(item.components)}")
        plugins = sorted({key.split(".")[1] for key in settings if key.startswith("plugins.")})
        if plugins:
            lines.append(f"    code: {', '.join(f'interventions/{name}.py' for name in plugins)}")
    return "\n".join(lines)
