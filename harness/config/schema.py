"""The trial's structured config: one dataclass per section (model, data, optim, trainer, eval, tracking) and the
trial that holds them, each field's range declared next to it (`allowed`), and the constants those ranges use.

It imports neither Hydra, OmegaConf nor the interventions, so the components (`harness.trial.model` ...) load
without them; `harness.config.compose` registers it with Hydra and builds it from `conf/`. What the machine and
the data must offer (devices, paths, data sizes) is checked by `harness.trial.preflight`, before anything runs.
"""

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from harness.config.checks import Allowed, Checked, at_least, interval, one_of, optional, positive, show, text
from harness.paths import CONF, PROJECT_ROOT

DATASETS = ("bundled", "fineweb", "fineweb_edu", "fineweb_gpt2_tokens")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "wsd")
PRECISIONS = ("fp32", "tf32", "fp16_amp", "bf16_amp")
DEVICES = ("auto", "cpu", "cuda")
TOKENIZER_VOCAB = 50257  # GPT-2's token ids 0 … 50,256
SEED_MAX = 2**32 - 1  # numpy's seed range
STUDY_TAG = re.compile(r"[A-Za-z0-9_.-]+")
# MLflow stores that accept runs (a plain directory, MLflow's file store, no longer does).
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


def is_tracking_uri(uri: str) -> bool:
    """Whether MLflow can store runs at `uri` (a plain directory, MLflow's old file store, it no longer writes to)."""
    parsed = urlparse(uri)
    scheme = (parsed.scheme or uri).split("+")[0]  # postgresql+psycopg2://…, or a bare `databricks`
    if scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        return uri.startswith("sqlite:///") and bool(path) and not Path(path).is_dir()
    return scheme in TRACKING_SCHEMES and (bool(parsed.netloc) or scheme not in ("http", "https"))


TRACKING_URI = (
    "an MLflow tracking URI: sqlite:///PATH/mlflow.db (a file), http(s)://HOST:PORT, or a database "
    "(postgresql://, mysql://, mssql://) or databricks URI"
)


# --- the sections ------------------------------------------------------------------------------------
@dataclass
class ModelConfig(Checked):
    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    dropout: float = 0.1
    qkv_bias: bool = False
    tie_weights: bool = False
    tied_init: str = (
        "embedding"  # tied matrix drawn as the embedding's N(0,1) (the seeds') or as the head's Linear init
    )
    ln_eps: float = 1e-5

    section: ClassVar[str] = "model"
    allowed: ClassVar[dict[str, Allowed]] = {
        "vocab_size": at_least(TOKENIZER_VOCAB, " (the GPT-2 tokenizer's token ids are 0 … 50,256)"),
        "context_length": at_least(1),
        "n_layer": at_least(1),
        "n_head": at_least(1),
        "d_model": at_least(1),
        "dropout": interval(0, 1, high_open=True),
        "tied_init": one_of("embedding", "head"),
        "ln_eps": positive(),
    }

    def relations(self) -> list[str]:
        if self.n_head >= 1 and self.d_model % self.n_head:
            return [f"model.d_model={self.d_model}: must be divisible by model.n_head={self.n_head}"]
        return []


@dataclass
class DataConfig(Checked):
    dataset: str = "bundled"
    path: str | None = None  # prepared dataset directory; default <project root>/data/<dataset>
    holdout_fraction: float = 0.05  # bundled corpus only; prepared datasets fix theirs at preparation
    seed: int | None = None  # None: in order (the seeds' behaviour); an int: shuffled sequence order
    max_epochs: float = 1.0  # refuse a trial that would read the training split more often than this
    test_offset: int = 0  # first token of the test window in the held-out split
    test_tokens: int = 32768  # tokens in the test window: a whole number of eval batches
    eval_batch_size: int = 8
    verify_checksums: bool = True

    section: ClassVar[str] = "data"
    allowed: ClassVar[dict[str, Allowed]] = {
        "dataset": one_of(*DATASETS),
        "path": optional(text(), "the default directory"),
        "holdout_fraction": interval(0, 1, low_open=True, high_open=True),
        "seed": optional(at_least(0), "read in order"),
        "max_epochs": positive(),
        "test_offset": at_least(0),
        "test_tokens": at_least(1),
        "eval_batch_size": at_least(1),
    }

    def prepared_directory(self) -> Path:
        """Where a prepared dataset is read from (the bundled corpus is tokenized into its own cache)."""
        return Path(self.path) if self.path else PROJECT_ROOT / "data" / self.dataset


@dataclass
class OptimConfig(Checked):
    lr: float = 4e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = None  # max global L2 norm; None = no clipping
    schedule: str = "constant"
    warmup_fraction: float = 0.05
    warmup_start_factor: float = 1e-5
    final_lr_ratio: float = 0.1  # the decay reaches lr * final_lr_ratio one step after the last (as torch's schedulers)
    decay_fraction: float = 0.2  # wsd: the final share of steps spent decaying (linearly) from the plateau

    section: ClassVar[str] = "optim"
    allowed: ClassVar[dict[str, Allowed]] = {
        "lr": positive(),
        "weight_decay": Allowed(lambda v: math.isfinite(v) and v >= 0, "a finite number ≥ 0 (0 = no decay)"),
        "beta1": interval(0, 1, high_open=True),
        "beta2": interval(0, 1, high_open=True),
        "eps": positive(),
        "grad_clip": optional(positive(), "no clipping"),
        "schedule": one_of(*SCHEDULES),
        "warmup_fraction": interval(0, 1, high_open=True),
        "warmup_start_factor": interval(0, 1, low_open=True),
        "final_lr_ratio": interval(0, 1),
        "decay_fraction": interval(0, 1, low_open=True),
    }

    def relations(self) -> list[str]:
        if self.schedule == "wsd" and self.decay_fraction > 1 - self.warmup_fraction:
            return [
                f"optim.decay_fraction={show(self.decay_fraction)}: must be ≤ 1 - optim.warmup_fraction = "
                f"{1 - self.warmup_fraction:g} (warmup and decay cannot overlap)"
            ]
        return []


@dataclass
class TrainerConfig(Checked):
    device: str = "auto"  # auto = cuda when available, else cpu
    precision: str = "fp16_amp"  # fp32 | tf32 | fp16_amp | bf16_amp (the AMP modes also use TF32 matmuls)
    global_batch_size: int = 96  # sequences per optimizer step, across all ranks and micro-steps
    micro_batch_size: Any = 6  # sequences per rank per forward pass, or `auto`: the largest that fits (docs/gpu.md)
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
    preempt_signal: str = "USR1"  # besides SIGTERM, the signal that checkpoints and stops the trial (docs/cluster.md)
    # Besides `latest` and `best`, keep every K-th checkpoint (one per K × checkpoint_interval steps); 0 keeps
    # no others, null keeps every checkpoint. gpt2_small writes ~2 GB per checkpoint, 55 per trial.
    keep_checkpoints: int | None = 0

    section: ClassVar[str] = "trainer"
    allowed: ClassVar[dict[str, Allowed]] = {
        "device": one_of(*DEVICES),
        "precision": one_of(*PRECISIONS),
        "global_batch_size": at_least(1),
        "micro_batch_size": Allowed(
            lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
            "a whole number ≥ 1, or auto (the largest that fits on the device)",
        ),
        "nproc_per_node": at_least(1),
        "max_steps": at_least(1),
        "checkpoint_interval": at_least(1),
        "exploding_grad_norm": Allowed(lambda v: v > 0, "a number > 0 (inf: never)"),
        "divergence_patience": at_least(1, " (consecutive non-finite steps before the trial stops)"),
        "preempt_signal": one_of("USR1", "USR2", "TERM", "HUP"),
        "sample_prompt": text(),
        "sample_tokens": at_least(0),
        "sample_top_k": at_least(0, " (0 = sample from every token)"),
        "sample_temperature": positive(),
        "keep_checkpoints": optional(
            at_least(0, " (besides latest and best, every K-th checkpoint; 0 = none)"), "keep every checkpoint"
        ),
    }

    def relations(self) -> list[str]:
        if not isinstance(self.micro_batch_size, int):  # `auto`, or a value the field's own check refuses
            if self.nproc_per_node >= 1 and self.global_batch_size % self.nproc_per_node:
                return [
                    f"trainer.global_batch_size={self.global_batch_size}: must be divisible by "
                    f"trainer.nproc_per_node = {self.nproc_per_node}"
                ]
            return []
        ranks = self.micro_batch_size * self.nproc_per_node
        if ranks >= 1 and self.global_batch_size % ranks:
            return [
                f"trainer.global_batch_size={self.global_batch_size}: must be divisible by trainer.micro_batch_size "
                f"× trainer.nproc_per_node = {self.micro_batch_size} × {self.nproc_per_node}"
            ]
        return []

    def grad_accum_steps(self, world_size: int, micro_batch_size: int | None = None) -> int:
        """Micro-steps per optimizer step; `micro_batch_size` is the one chosen for trainer.micro_batch_size=auto."""
        micro = micro_batch_size or self.micro_batch_size
        if self.global_batch_size % (micro * world_size):
            raise ValueError(
                f"trainer.global_batch_size={self.global_batch_size} is not divisible by "
                f"micro_batch_size × world size = {micro} × {world_size}"
            )
        return self.global_batch_size // (micro * world_size)


@dataclass
class EvalConfig(Checked):
    """Benchmarks scored beside the held-out loss; they read the weights, never change them (docs/hellaswag.md)."""

    hellaswag: bool = False  # score HellaSwag at the end of the trial (hellaswag_acc, hellaswag_acc_norm)
    hellaswag_interval: int = 0  # also every N steps (0: only at the end)
    hellaswag_path: str | None = None  # a prepared directory or a jsonl file; default <project root>/data/hellaswag
    hellaswag_batch_size: int = 64  # rows (one per ending) per forward pass

    section: ClassVar[str] = "eval"
    allowed: ClassVar[dict[str, Allowed]] = {
        "hellaswag_interval": at_least(0, " (0 = only at the end)"),
        "hellaswag_path": optional(text(), "<project root>/data/hellaswag"),
        "hellaswag_batch_size": at_least(1),
    }

    def hellaswag_source(self) -> Path:
        return Path(self.hellaswag_path) if self.hellaswag_path else PROJECT_ROOT / "data" / "hellaswag"

    def due(self, step: int, max_steps: int) -> bool:
        """Whether HellaSwag is scored after `step` steps within the run (the end of the trial is scored anyway)."""
        interval = self.hellaswag_interval
        return self.hellaswag and interval > 0 and step % interval == 0 and step < max_steps


@dataclass
class TrackingConfig(Checked):
    uri: str | None = None  # default $MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db
    experiment: str = "harness/${scale}"  # one experiment per scale: the UI never groups trials of two scales
    parent_run_id: str | None = None  # a study's parent run; the trial becomes its child in `mlflow ui`
    log_interval: int = 10  # steps between batched uploads of per-step metrics
    heartbeat_interval: float = 30.0  # seconds between heartbeats; a run silent for 4 intervals counts as dead
    connect_timeout: float = 10.0  # seconds the first contact with the store may take before the trial fails
    flush_timeout: float = 60.0  # seconds the end of a trial waits for unsent records before saving them to disk
    claim_slots: int = 1  # a study trial runs only while fewer runs of its computation are FINISHED or live
    system_metrics: bool = True  # rank 0 records MLflow's system metrics (CPU, memory, GPUs) with the trial
    system_metrics_interval: float = 10.0  # seconds between system-metrics samples

    section: ClassVar[str] = "tracking"
    allowed: ClassVar[dict[str, Allowed]] = {
        "uri": optional(
            Allowed(is_tracking_uri, TRACKING_URI), "$MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db"
        ),
        "experiment": text(what="non-empty text (default harness/${scale}: one experiment per scale)"),
        "parent_run_id": optional(text(r"[0-9a-f]{32}", "an MLflow run id (32 hex digits)"), "no parent"),
        "log_interval": at_least(1),
        "heartbeat_interval": positive(" seconds"),
        "connect_timeout": positive(" seconds"),
        "flush_timeout": Allowed(lambda v: math.isfinite(v) and v >= 0, "a finite number ≥ 0 (seconds)"),
        "claim_slots": at_least(1),
        "system_metrics_interval": positive(" seconds"),
    }


@dataclass
class TrialConfig(Checked):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 42  # set before the model is built: fixes the initial weights
    train_seed: int | None = None  # re-seed right after the model is built; None continues the stream
    scale: str = "smoke"
    study: str | None = None
    resume: str | None = None  # a run directory (or checkpoint) to continue, in its own MLflow run
    rerun: bool = False  # run even when a FINISHED run with the same config_hash exists (sweeps skip those)
    reuse_other_code_versions: bool = False  # a sweep reuses FINISHED runs made by other code, not only by this code
    interventions: list[str] = field(default_factory=list)  # filled from the composed overlays
    plugins: dict[str, Any] = field(default_factory=dict)  # intervention code: {plugin name: {option: value}}

    section: ClassVar[str] = ""
    allowed: ClassVar[dict[str, Allowed]] = {
        "seed": interval(0, SEED_MAX, kind="a whole number"),
        "train_seed": optional(interval(0, SEED_MAX, kind="a whole number"), "no re-seeding"),
        "scale": text(),
        "study": optional(text(STUDY_TAG.pattern, "letters, digits, '_', '.' or '-'"), "no study"),
        "resume": optional(text(), "a new trial"),
        "interventions": Allowed(
            lambda v: all((CONF / "intervention" / f"{name}.yaml").is_file() for name in v),
            "names from `python -m harness list`",
        ),
        "plugins": Allowed(
            lambda v: all(isinstance(o, dict) or o is None for o in v.values()), "{plugin name: {option: value}}"
        ),
    }

    def relations(self) -> list[str]:
        data, context = self.data, self.model.context_length
        per_batch = data.eval_batch_size * context
        if data.eval_batch_size >= 1 and context >= 1 and data.test_tokens >= 1 and data.test_tokens % per_batch:
            return [
                f"data.test_tokens={data.test_tokens}: must be a whole number of eval batches, a multiple of "
                f"data.eval_batch_size × model.context_length = {data.eval_batch_size} × {context} = {per_batch}"
            ]
        return []
