"""The trial's structured config: one validated dataclass per component, composed by Hydra from `conf/`.

This is the config layer: it imports neither torch nor MLflow, so commands that only compose or check a
config answer at once. The components re-export their dataclass (`from harness.trial.model import ModelConfig`).

Every field's range is declared next to it (`allowed`); a config is checked whole, and a `ConfigError` lists
every problem at once, one line each: the key, its value and what is allowed. What the machine and the data
must offer (devices, paths, data sizes) is checked by `harness.trial.preflight`, before anything runs.
"""

import contextvars
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional
from urllib.parse import urlparse

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.paths import PROJECT_ROOT
from interventions import REGISTRY

CONF = PROJECT_ROOT / "conf"
DATASETS = ("bundled", "fineweb", "fineweb_edu", "fineweb_gpt2_tokens")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "wsd")
PRECISIONS = ("fp32", "tf32", "fp16_amp", "bf16_amp")
DEVICES = ("auto", "cpu", "cuda")
TOKENIZER_VOCAB = 50257  # GPT-2's token ids 0 … 50,256
SEED_MAX = 2**32 - 1  # numpy's seed range
STUDY_TAG = re.compile(r"[A-Za-z0-9_.-]+")
# MLflow stores that accept runs (a plain directory, MLflow's file store, no longer does).
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


class ConfigError(CompactHydraException, ValueError):
    """Bad input, found before anything ran: one line per problem, each naming the key, its value and what
    is allowed. (A CompactHydraException, so that Hydra, too, prints the lines without a traceback.)

    `trial` is the trial config as built despite its problems, when it could be built at all: what the
    machine must offer can still be checked on it, so that every problem is reported at once.
    """

    def __init__(self, problems: list[str], trial: Optional["TrialConfig"] = None):
        self.problems, self.trial = list(problems), trial
        super().__init__("\n".join(self.problems))


def show(value: Any) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    return repr(value) if isinstance(value, float) else str(value)


# --- what a field allows ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Allowed:
    test: Callable[[Any], bool]
    text: str  # completes "must be …"

    def allows(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except TypeError:  # a value of the wrong type, in a dataclass built by hand
            return False


def at_least(low: int, note: str = "") -> Allowed:
    return Allowed(lambda v: v >= low, f"a whole number ≥ {low}{note}")


def positive(note: str = "") -> Allowed:
    return Allowed(lambda v: math.isfinite(v) and v > 0, f"a finite number > 0{note}")


def interval(
    low: float, high: float, low_open: bool = False, high_open: bool = False, kind: str = "a number"
) -> Allowed:
    def test(v):
        return math.isfinite(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)

    return Allowed(test, f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def one_of(*options: str) -> Allowed:
    return Allowed(lambda v: v in options, f"one of {', '.join(options)}")


def optional(rule: Allowed, meaning: str) -> Allowed:
    return Allowed(lambda v: v is None or rule.test(v), f"{rule.text}, or null ({meaning})")


def text(pattern: str = r".+", what: str = "non-empty text") -> Allowed:
    return Allowed(lambda v: isinstance(v, str) and re.fullmatch(pattern, v, re.DOTALL) is not None, what)


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


_collected: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("collected", default=None)


class Checked:
    """A config dataclass whose fields are checked when it is built: `section.key=value: must be …`.

    `allowed` maps a field to its range; `relations()` adds problems between fields. Inside
    `to_trial_config` the problems of every section are collected and reported together.
    """

    section: ClassVar[str]
    allowed: ClassVar[dict[str, Allowed]] = {}

    def problems(self) -> list[str]:
        found = [
            f"{self.key(name)}={show(getattr(self, name))}: must be {rule.text}"
            for name, rule in self.allowed.items()
            if not rule.allows(getattr(self, name))
        ]
        return found + self.relations()

    def relations(self) -> list[str]:
        return []

    def key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    def __post_init__(self):
        problems, collected = self.problems(), _collected.get()
        if collected is not None:
            collected.extend(problems)
        elif problems:
            raise ConfigError(problems)


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
    # Besides `latest` and `best`, keep every K-th checkpoint (one per K × checkpoint_interval steps); 0 keeps
    # no others, null keeps every checkpoint. gpt2_small writes ~2 GB per checkpoint, 55 per trial.
    keep_checkpoints: int | None = 0

    section: ClassVar[str] = "trainer"
    allowed: ClassVar[dict[str, Allowed]] = {
        "device": one_of(*DEVICES),
        "precision": one_of(*PRECISIONS),
        "global_batch_size": at_least(1),
        "micro_batch_size": at_least(1),
        "nproc_per_node": at_least(1),
        "max_steps": at_least(1),
        "checkpoint_interval": at_least(1),
        "exploding_grad_norm": Allowed(lambda v: v > 0, "a number > 0 (inf: never)"),
        "divergence_patience": at_least(1, " (consecutive non-finite steps before the trial stops)"),
        "sample_prompt": text(),
        "sample_tokens": at_least(0),
        "sample_top_k": at_least(0, " (0 = sample from every token)"),
        "sample_temperature": positive(),
        "keep_checkpoints": optional(
            at_least(0, " (besides latest and best, every K-th checkpoint; 0 = none)"), "keep every checkpoint"
        ),
    }

    def relations(self) -> list[str]:
        ranks = self.micro_batch_size * self.nproc_per_node
        if ranks >= 1 and self.global_batch_size % ranks:
            return [
                f"trainer.global_batch_size={self.global_batch_size}: must be divisible by trainer.micro_batch_size "
                f"× trainer.nproc_per_node = {self.micro_batch_size} × {self.nproc_per_node}"
            ]
        return []

    def grad_accum_steps(self, world_size: int) -> int:
        if self.global_batch_size % (self.micro_batch_size * world_size):
            raise ValueError(
                f"trainer.global_batch_size={self.global_batch_size} is not divisible by "
                f"micro_batch_size × world size = {self.micro_batch_size} × {world_size}"
            )
        return self.global_batch_size // (self.micro_batch_size * world_size)


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
        "interventions": Allowed(lambda v: all(name in REGISTRY for name in v), "names from `python -m harness list`"),
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


ConfigStore.instance().store(name="trial_schema", node=TrialConfig)

# Keys (dotted paths) that say where a trial is recorded, how it shows progress, what it checks or samples, but
# not what it computes or records as metrics: left out of config_hash. (Sampling uses its own generator.)
BOOKKEEPING_KEYS = (
    "tracking",
    "study",
    "resume",
    "rerun",
    "reuse_other_code_versions",
    "trainer.progress",
    "trainer.sample_prompt",
    "trainer.sample_tokens",
    "trainer.sample_top_k",
    "trainer.sample_temperature",
    "data.verify_checksums",
    "trainer.keep_checkpoints",
)


# --- composition ---------------------------------------------------------------------------------------
def to_trial_config(cfg: DictConfig) -> TrialConfig:
    """Resolve, type-check and value-check the composed config; every problem is reported at once."""
    problems = unknown_keys(cfg, TrialConfig)
    if problems:
        raise ConfigError(problems)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrialConfig), cfg)
    except OmegaConfBaseException as error:
        raise ConfigError([type_problem(error)]) from None
    problems = []
    collecting = _collected.set(problems)
    try:
        trial = OmegaConf.to_object(merged)
    finally:
        _collected.reset(collecting)
    if problems:
        raise ConfigError(problems, trial)
    return trial


def compose_trial(cfg: DictConfig, overrides: list[str]) -> TrialConfig:
    """The trial config of a Hydra-composed `cfg` and the overrides that composed it."""
    problems, trial = overlay_conflicts(overrides), None
    try:
        cfg.interventions = intervention_names(overrides)
        trial = to_trial_config(cfg)
    except ConfigError as error:
        problems, trial = problems + error.problems, error.trial
    if problems:
        raise ConfigError(problems, trial)
    return trial


def compose(overrides: list[str]) -> TrialConfig:
    """Compose `conf/` with command-line style overrides, as `python -m harness` does (for the Python API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    return trial_to_run(cfg, list(overrides))


def trial_to_run(cfg: DictConfig, overrides: list[str]) -> TrialConfig:
    """The composed trial, or, with `resume=DIR`, the saved trial it continues."""
    trial = compose_trial(cfg, overrides)
    return resumed_trial(trial, overrides) if trial.resume else trial


def resumed_trial(cfg: TrialConfig, overrides: list[str]) -> TrialConfig:
    """`resume=DIR` alone continues DIR's trial with its saved config; with the original overrides
    repeated, they must compose to the same computation."""
    run_dir = Path(cfg.resume)
    saved_config = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ConfigError(
            [
                f"resume={cfg.resume}: must be the run directory of a trial; "
                f"{'it is a file' if run_dir.exists() else 'no such directory'}"
            ]
        )
    if not saved_config.is_file():
        raise ConfigError([f"resume={cfg.resume}: must be the run directory of a trial; it holds no config.yaml"])
    try:
        saved = to_trial_config(OmegaConf.load(saved_config))
    except ConfigError as error:
        raise ConfigError(
            [f"resume={cfg.resume}: its {saved_config.name} does not load: {problem}" for problem in error.problems]
        ) from None
    except Exception as error:  # not YAML at all
        raise ConfigError([f"resume={cfg.resume}: {saved_config} is not a readable config ({error})"]) from None
    saved.resume = str(run_dir)
    others = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "hydra.", "tracking."))]
    if others and config_hash(saved) != config_hash(cfg):
        ours, theirs = flatten(as_dict(cfg)), flatten(as_dict(saved))
        differ = ", ".join(
            f"{k}: {theirs[k]!r} → {ours[k]!r}"
            for k in theirs
            if ours.get(k) != theirs[k] and k != "resume" and not k.startswith("tracking.")
        )
        raise ConfigError(
            [
                f"resume={run_dir}: these overrides change the trial ({differ}); "
                f"resume with no other overrides to continue it as saved"
            ]
        )
    from harness.tracking import liveness  # neither loads MLflow
    from harness.tracking import store as tracking

    requested, source = (
        (cfg.tracking.uri, "tracking.uri")
        if cfg.tracking.uri
        else (os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
    )
    try:
        uri = liveness.own_store(saved.tracking.uri, requested, source, f"resume={run_dir}")
    except ValueError as error:
        raise ConfigError([str(error)]) from None
    saved.tracking.uri = uri or tracking.default_tracking_uri()
    if (run_dir / tracking.UNSENT_FILE).exists():
        raise ConfigError(
            [
                f"resume={run_dir}: {run_dir / tracking.UNSENT_FILE} holds records the store never "
                f"received; send them first: python -m harness replay {run_dir}"
            ]
        )
    return saved


def intervention_overlays(overrides: list[str]) -> list[str]:
    """The intervention overlays an override list applies, as listed (stacks not expanded)."""
    names = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.key_or_group == "intervention" and not override.is_delete():
            value = override.value()
            names += value if isinstance(value, list) else [value]
    return names


def intervention_names(overrides: list[str]) -> list[str]:
    """The interventions an override list applies, stacks expanded to their components, sorted."""
    names = set()
    for name in intervention_overlays(overrides):
        if name not in REGISTRY:
            raise ConfigError(
                [
                    f"intervention={name}: conf/intervention/{name}.yaml has no entry in the registry "
                    f"(interventions/__init__.py); add one"
                ]
            )
        names.update(REGISTRY[name].expanded())
    return sorted(names)


def overlay_settings(name: str) -> dict[str, Any]:
    path = CONF / "intervention" / f"{name}.yaml"
    return flatten(OmegaConf.to_container(OmegaConf.load(path))) if path.is_file() else {}


def overlay_conflicts(overrides: list[str]) -> list[str]:
    """Two overlays that set one key to different values: the last would win unseen, so it is an error,
    unless the command line sets that key itself."""
    explicit = {o.key_or_group for o in OverridesParser.create().parse_overrides(overrides)}
    overlays = intervention_overlays(overrides)
    first: dict[str, tuple[str, Any]] = {}
    problems = []
    for name in overlays:
        for key, value in overlay_settings(name).items():
            if key in first and first[key][1] != value and key not in explicit:
                other, other_value = first[key]
                problems.append(
                    f"{key}: +intervention=[{','.join(overlays)}] sets it twice, {other} to {show(other_value)} and "
                    f"{name} to {show(value)}, and the last would win unseen; apply one of them, or choose on the "
                    f"command line with {key}=VALUE"
                )
            first.setdefault(key, (name, value))
    return problems


# --- the keys and their types -----------------------------------------------------------------------------
def schema_fields(schema: type = TrialConfig, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of the schema (`optim.lr`, `seed`, …) and its type."""
    keys = {}
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.type):
            keys.update(schema_fields(f.type, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = f.type
    return keys


def type_text(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Union:
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return f"{type_text(inner[0])} or null"
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}
    return names.get(annotation, "a " + getattr(annotation, "__name__", str(annotation)).lower())


def type_problem(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", "") or "?"
    kind = type_text(schema_fields().get(key, object)) if key in schema_fields() else None
    value = getattr(error, "value", None)
    return f"{key}={show(value)}: must be {kind}" if kind else f"{key}: {str(error).splitlines()[0]}"


def unknown_key_problem(key: str, value: Any = None, with_value: bool = False) -> str:
    """`optim.lrr=1: no such config key; did you mean optim.lr? …`"""
    keys = list(schema_fields())
    guess = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not guess:  # a right name in the wrong section, or a bare name: compare the last part
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
        guess = [leaves[g] for g in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.75)]
    section = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k.rsplit(".", 1)[-1] for k in keys if (k.rsplit(".", 1)[0] if "." in k else "") == section]
    hint = f"did you mean {guess[0]}?" if guess else ""
    if siblings and section:
        hint += f"{' ' if hint else ''}({section} has: {', '.join(siblings)})"
    elif not guess:
        hint = "the sections are model, data, optim, trainer, tracking; see `python -m harness --help`"
    return f"{key}{'=' + show(value) if with_value else ''}: no such config key; {hint}"


def unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """Hydra's `+key=value` can add keys the schema lacks; a misspelt one must not pass silently."""
    known = {f.name: f.type for f in dataclasses.fields(schema)}
    problems = []
    for key in node:
        if key not in known:
            problems.append(unknown_key_problem(f"{prefix}{key}"))
        elif dataclasses.is_dataclass(known[key]) and isinstance(node[key], DictConfig):
            problems += unknown_keys(node[key], known[key], f"{prefix}{key}.")
    return problems


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def override_problems(overrides: list[str]) -> list[str]:
    """Command-line overrides checked against the schema and `conf/` before Hydra composes anything:
    unknown keys (with the nearest existing key), values of the wrong type, options that do not exist."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # a syntax error: Hydra's own message says where
        return []
    fields, schema = schema_fields(), OmegaConf.structured(TrialConfig)
    groups = {path.name for path in CONF.iterdir() if path.is_dir() and path.name != "hydra"}
    problems = []
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra") or override.package is not None:
            continue
        if key in groups:
            problems += group_problems(override, key)
        elif key == "interventions":
            problems.append(
                "interventions: set from the overlays applied; use +intervention=NAME or "
                "+intervention=[NAME,NAME] (`python -m harness list` names them)"
            )
        elif key.startswith("plugins."):
            problems += plugin_option_problems(override, overrides)
        elif key not in fields:
            value = None if override.is_delete() else override.value()
            problems.append(unknown_key_problem(key, value, with_value=not override.is_delete()))
        elif not override.is_delete():
            if override.is_discrete_sweep():  # -m key=a,b,c: each value
                values = list(override.sweep_iterator())
            else:  # an interval is for a tuning sweeper to sample from
                values = [] if override.is_sweep_override() else [override.value()]
            for value in values:
                try:
                    OmegaConf.update(schema, key, value, merge=True)
                except OmegaConfBaseException:
                    problems.append(f"{key}={show(value)}: must be {type_text(fields[key])}")
    return problems


def plugin_option_problems(override, overrides: list[str]) -> list[str]:
    """`plugins.NAME.OPTION=VALUE` changes an option an overlay set; `+plugins.…` adds one (checked when built)."""
    if override.is_add() or override.is_force_add() or override.is_delete():
        return []
    key = override.key_or_group
    settings = {
        key: name
        for name in intervention_overlays(overrides)
        for key in overlay_settings(name)
        if key.startswith("plugins.")
    }
    if key in settings or any(k.startswith(key + ".") for k in settings):
        return []
    plugin = key.split(".")[1]
    options = sorted(k for k in settings if k.split(".")[1] == plugin)
    if options:
        guess = difflib.get_close_matches(key, options, n=1)
        return [
            f"{override.input_line}: plugin {plugin} has no such option as configured by "
            f"+intervention={settings[options[0]]}; {'did you mean ' + guess[0] + '? ' if guess else ''}"
            f"its options: {', '.join(options)}"
        ]
    return [
        f"{override.input_line}: plugin {plugin} is not enabled; enable it with its overlay "
        f"(`python -m harness list` names them), or add the option with +{override.input_line}"
    ]


def group_problems(override, group: str) -> list[str]:
    if override.is_delete() or override.is_sweep_override():
        return []
    options = group_options(group)
    value = override.value()
    problems = []
    for name in value if isinstance(value, list) else [value]:
        if name not in options:
            guess = difflib.get_close_matches(str(name), options, n=1)
            problems.append(
                f"{group}={show(name)}: no such {group} in conf/{group}/; "
                f"{'did you mean ' + guess[0] + '? ' if guess else ''}choose from {', '.join(options)}"
            )
    if group in ("intervention", "sweep") and not override.is_add():
        problems.append(
            f"{override.input_line}: add it with +{group}=… (the + is needed: no {group} is applied by default)"
        )
    return problems


# --- records ---------------------------------------------------------------------------------------------
def as_dict(cfg: TrialConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def config_hash(cfg: TrialConfig, world_size: int | None = None) -> str:
    """Hash of what the trial computes. `world_size` is the number of ranks however they were launched
    (default: trainer.nproc_per_node): ranks split the batch and each draws its own dropout masks, so a 2-rank
    trial and a 1-rank trial with accumulation are different computations."""
    computed = as_dict(cfg)
    for key in BOOKKEEPING_KEYS:
        *parents, leaf = key.split(".")
        node = computed
        for parent in parents:
            node = node[parent]
        del node[leaf]
    if world_size is not None:
        computed["trainer"]["nproc_per_node"] = world_size
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
