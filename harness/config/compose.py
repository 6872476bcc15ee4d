"""Composing a trial: the schema registered with Hydra, `conf/` composed and checked into a `TrialConfig`
(`compose`, `compose_trial`, `trial_to_run`), a resumed trial's saved config, the overlays' conflicts, and the
records made of a trial config (`config_hash`, `flatten`, `as_dict`, `intervention_tag`).
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.config.checks import ConfigError, collecting_problems, show
from harness.config.overrides import intervention_overlays, type_problem, unknown_keys
from harness.config.schema import TrialConfig
from harness.paths import CONF, default_tracking_uri
from interventions import BASELINE, REGISTRY, flatten, overlay_settings

ConfigStore.instance().store(name="trial_schema", node=TrialConfig)

# Keys (dotted paths) that say where a trial is recorded, how it shows progress, what it checks or samples, but
# not what it computes: left out of config_hash. (Sampling uses its own generator.) `eval` scores the weights
# without changing them, so a trial scored later with `evaluate DIR hellaswag=true` keeps its hash.
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
    "eval",
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
    with collecting_problems() as problems:
        trial = OmegaConf.to_object(merged)
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
    changed = resume_changes(cfg, saved, others)
    if changed:
        raise ConfigError(
            [
                f"resume={run_dir}: these overrides change the trial ({', '.join(changed)}); "
                f"resume with no other overrides (bookkeeping such as trainer.progress aside) to continue it as saved"
            ]
        )
    from harness.tracking import liveness  # neither loads MLflow
    from harness.tracking.store import UNSENT_FILE, public_uri

    requested, source = (
        (cfg.tracking.uri, "tracking.uri")
        if cfg.tracking.uri
        else (os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
    )
    try:
        uri = liveness.own_store(saved.tracking.uri, requested, source, f"resume={run_dir}")
    except ValueError as error:
        raise ConfigError([str(error)]) from None
    # A URI with credentials reaches MLflow from the environment only, never through the config (which is written).
    from_environment = source == "MLFLOW_TRACKING_URI" and requested and public_uri(requested) != requested
    saved.tracking.uri = None if from_environment else uri or default_tracking_uri()
    if (run_dir / UNSENT_FILE).exists():
        raise ConfigError(
            [
                f"resume={run_dir}: {run_dir / UNSENT_FILE} holds records the store never "
                f"received; send them first: python -m harness replay {run_dir}"
            ]
        )
    return saved


def is_bookkeeping(key: str) -> bool:
    return any(key == bookkeeping or key.startswith(bookkeeping + ".") for bookkeeping in BOOKKEEPING_KEYS)


def resume_changes(cfg: TrialConfig, saved: TrialConfig, overrides: list[str]) -> list[str]:
    """What the overrides passed with `resume=` would change in the saved trial, one `key: saved → new` each; only
    keys that were passed are named. Bookkeeping keys (BOOKKEEPING_KEYS) are applied to `saved` instead."""
    ours, theirs = flatten(as_dict(cfg)), flatten(as_dict(saved))
    changed = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if is_bookkeeping(key):
            *parents, leaf = key.split(".")
            source, target = cfg, saved
            for parent in parents:
                source, target = getattr(source, parent), getattr(target, parent)
            setattr(target, leaf, getattr(source, leaf))
            continue
        leaves = [k for k in theirs if k == key or k.startswith(key + ".")]
        if leaves:
            changed += [f"{k}: {theirs[k]!r} → {ours.get(k)!r}" for k in leaves if ours.get(k) != theirs[k]]
        elif config_hash(saved) != config_hash(cfg):  # a config group (scale=…, +intervention=…)
            changed.append(f"{override} (a config group: the trial it composes differs from the saved one)")
    return changed


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


def intervention_tag(names: list[str]) -> str:
    return "+".join(sorted(names)) or BASELINE
