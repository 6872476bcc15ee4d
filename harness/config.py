"""The trial's structured config: one validated dataclass per component, composed by Hydra from `conf/`.

This is the config layer: it imports neither torch nor MLflow, so commands that only compose or check a
config answer at once. The components re-export their dataclass (`from harness.model import ModelConfig`).
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from interventions import REGISTRY

DATASETS = ("bundled", "fineweb", "fineweb_edu")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "wsd")
PRECISIONS = ("fp32", "tf32", "fp16_amp", "bf16_amp")


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    dropout: float = 0.1
    qkv_bias: bool = False
    tie_weights: bool = False
    tied_init: str = "embedding"  # tied matrix drawn as the embedding's N(0,1) (the seeds') or as the head's Linear init
    ln_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
        if self.tied_init not in ("embedding", "head"):
            raise ValueError(f"model.tied_init={self.tied_init!r}; choose embedding or head")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")


@dataclass
class DataConfig:
    dataset: str = "bundled"
    path: Optional[str] = None  # prepared dataset directory; default <project root>/data/<dataset>
    holdout_fraction: float = 0.05  # bundled corpus only; prepared datasets fix theirs at preparation
    seed: Optional[int] = None  # None: in order (the seeds' behaviour); an int: shuffled sequence order
    max_epochs: float = 1.0  # refuse a trial that would read the training split more often than this
    test_offset: int = 0  # first token of the test window in the held-out split
    test_tokens: int = 32768  # tokens in the test window: a whole number of eval batches
    eval_batch_size: int = 8
    verify_checksums: bool = True

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"data.dataset={self.dataset!r}; choose one of {', '.join(DATASETS)}")


@dataclass
class OptimConfig:
    lr: float = 4e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: Optional[float] = None  # max global L2 norm; None = no clipping
    schedule: str = "constant"
    warmup_fraction: float = 0.05
    warmup_start_factor: float = 1e-5
    final_lr_ratio: float = 0.1  # the decay ends at lr * final_lr_ratio at the last step
    decay_fraction: float = 0.2  # wsd: the final share of steps spent decaying (linearly) from the plateau

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be positive")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip} must be positive (or null for no clipping)")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"optim.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if not 0.0 < self.decay_fraction <= 1.0 - self.warmup_fraction:
            raise ValueError(f"optim.decay_fraction={self.decay_fraction} must be in (0, 1 - warmup_fraction]")


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto = cuda when available, else cpu
    precision: str = "fp16_amp"  # fp32 | tf32 | fp16_amp | bf16_amp (the AMP modes also use TF32 matmuls)
    global_batch_size: int = 96  # sequences per optimizer step, across all ranks and micro-steps
    micro_batch_size: int = 6  # sequences per rank per forward pass
    nproc_per_node: int = 1
    max_steps: int = 33165
    checkpoint_interval: int = 617
    exploding_grad_norm: float = 10.0  # a finite pre-clip norm above this is counted as exploding (kind a)
    divergence_patience: int = 10  # stop after this many consecutive steps with a non-finite loss
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 20
    sample_top_k: int = 25
    sample_temperature: float = 1.0
    deterministic: bool = False
    compile: bool = False  # torch.compile the training forward/backward (same computation, fused kernels)
    progress: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        for name in ("global_batch_size", "micro_batch_size", "nproc_per_node", "max_steps", "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be at least 1")
        if self.global_batch_size % (self.micro_batch_size * self.nproc_per_node):
            raise ValueError(
                f"trainer.global_batch_size={self.global_batch_size} is not divisible by "
                f"micro_batch_size × ranks = {self.micro_batch_size} × {self.nproc_per_node}"
            )

    def grad_accum_steps(self, world_size: int) -> int:
        if self.global_batch_size % (self.micro_batch_size * world_size):
            raise ValueError(f"trainer.global_batch_size={self.global_batch_size} is not divisible by "
                             f"micro_batch_size × world size = {self.micro_batch_size} × {world_size}")
        return self.global_batch_size // (self.micro_batch_size * world_size)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # default sqlite:///<project root>/mlflow.db; any MLflow tracking URI
    experiment: str = "harness"
    parent_run_id: Optional[str] = None  # a study's parent run; the trial becomes its child in `mlflow ui`
    log_interval: int = 10  # steps between batched uploads of per-step metrics


@dataclass
class TrialConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 42  # set before the model is built: fixes the initial weights
    train_seed: Optional[int] = None  # re-seed right after the model is built; None continues the stream
    scale: str = "smoke"
    study: Optional[str] = None
    resume: Optional[str] = None  # a run directory (or checkpoint) to continue, in its own MLflow run
    rerun: bool = False  # run even when a FINISHED run with the same config_hash exists (sweeps skip those)
    interventions: list[str] = field(default_factory=list)  # filled from the composed overlays
    plugins: dict[str, Any] = field(default_factory=dict)  # intervention code: {plugin name: {option: value}}


ConfigStore.instance().store(name="trial_schema", node=TrialConfig)

# Keys that say where a trial is recorded, not what it computes: left out of config_hash.
BOOKKEEPING_KEYS = ("tracking", "study", "resume", "rerun")


def intervention_names(overrides: list[str]) -> list[str]:
    """The interventions an override list applies, stacks expanded to their components, sorted."""
    names = set()
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.key_or_group == "intervention" and not override.is_delete():
            value = override.value()
            for name in value if isinstance(value, list) else [value]:
                names.update(REGISTRY[name].expanded())
    return sorted(names)


def compose_trial(cfg: DictConfig, overrides: list[str]) -> TrialConfig:
    """The trial config of a Hydra-composed `cfg` and the overrides that composed it."""
    cfg.interventions = intervention_names(overrides)
    return to_trial_config(cfg)


def resumed_trial(cfg: TrialConfig, overrides: list[str]) -> TrialConfig:
    """`resume=DIR` alone continues DIR's trial with its saved config; with the original overrides
    repeated, they must compose to the same computation."""
    run_dir = Path(cfg.resume)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"resume={cfg.resume}: no config.yaml there; pass the trial's run directory")
    saved = to_trial_config(OmegaConf.load(run_dir / "config.yaml"))
    saved.resume = str(run_dir)
    others = [o for o in overrides if not o.startswith(("resume=", "hydra."))]
    if others and config_hash(saved) != config_hash(cfg):
        ours, theirs = flatten(as_dict(cfg)), flatten(as_dict(saved))
        differ = ", ".join(f"{k}: {theirs[k]!r} → {ours[k]!r}" for k in theirs if ours.get(k) != theirs[k] and k != "resume")
        raise ValueError(f"resume={run_dir}: these overrides change the trial ({differ}); "
                         f"resume with no other overrides to continue it as saved")
    return saved


def to_trial_config(cfg: DictConfig) -> TrialConfig:
    """Resolve, type-check and value-check the composed config."""
    _reject_unknown_keys(cfg, TrialConfig)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrialConfig), cfg))


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> None:
    """Hydra's `+key=value` can add keys the schema lacks; a misspelt one must not pass silently."""
    known = {f.name: f.type for f in dataclasses.fields(schema)}
    for key in node:
        if key not in known:
            raise KeyError(f"unknown config key '{prefix}{key}'; {schema.__name__} has: {', '.join(known)}")
        if dataclasses.is_dataclass(known[key]):
            _reject_unknown_keys(node[key], known[key], f"{prefix}{key}.")


def as_dict(cfg: TrialConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def config_hash(cfg: TrialConfig) -> str:
    computed = {k: v for k, v in as_dict(cfg).items() if k not in BOOKKEEPING_KEYS}
    return hashlib.sha256(json.dumps(computed, sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def intervention_tag(names: list[str]) -> str:
    return "+".join(sorted(names)) or "baseline"
