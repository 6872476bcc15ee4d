"""The trial's structured config: one validated dataclass per component, composed by Hydra from `conf/`."""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from harness.data.loader import DataConfig
from harness.model import ModelConfig
from harness.optim import OptimConfig

PRECISIONS = ("fp32", "tf32", "fp16_amp", "bf16_amp")


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
    reuse_other_code_versions: bool = False  # a sweep reuses FINISHED runs made by other code, not only by this code
    interventions: list[str] = field(default_factory=list)  # filled from the composed overlays
    plugins: dict[str, Any] = field(default_factory=dict)  # intervention code: {plugin name: {option: value}}


ConfigStore.instance().store(name="trial_schema", node=TrialConfig)

# Keys (dotted paths) that say where a trial is recorded, how it shows progress, what it checks or samples, but
# not what it computes or records as metrics: left out of config_hash. (Sampling uses its own generator.)
BOOKKEEPING_KEYS = ("tracking", "study", "resume", "rerun", "reuse_other_code_versions", "trainer.progress",
                    "trainer.sample_prompt", "trainer.sample_tokens", "trainer.sample_top_k",
                    "trainer.sample_temperature", "data.verify_checksums")


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
    """sha256 (16 hex) of the resolved config without BOOKKEEPING_KEYS: equal hashes = the same computation."""
    computed = as_dict(cfg)
    for key in BOOKKEEPING_KEYS:
        *parents, leaf = key.split(".")
        node = computed
        for parent in parents:
            node = node[parent]
        del node[leaf]
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
