"""What a trial needs from this machine and its data, checked by the process that launches it before any
rank is spawned, any output directory is made or any run is recorded.

The config layer checks each value's range; this checks what only the machine can answer: the device, the
tracking store, the checkpoint to resume, the plugins, and whether the data (HellaSwag too, when scored) exists,
is intact and holds what the trial will read. A damaged bundled cache is rebuilt here; damaged prepared data is refused with the
command that repairs it. torch is imported only when a check needs it (a CUDA device, a checkpoint, a plugin).
"""

import copy
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from harness.config.checks import ConfigError, show
from harness.config.compose import trial_to_run
from harness.config.schema import DEVICES, PRECISIONS, TRACKING_URI, TrainerConfig, TrialConfig, is_tracking_uri

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
FP16_NEEDS_CUDA = (
    "trainer.precision=fp16_amp: needs a CUDA device (fp16 autocast with GradScaler) and this trial runs "
    "on the CPU; use trainer.precision=tf32 or fp32 there (the same arithmetic on a CPU), or bf16_amp "
    "(runs, but ~15× slower on CPUs without bf16 matmul units); fp16 emulated on the CPU, several "
    "times slower than fp32, runs when asked for with trainer.device=cpu"
)


# The trials CheckBeforeRun composed and checked, by their overrides, until the task function takes its own.
CHECKED: dict[tuple[str, ...], TrialConfig] = {}


def checked_trial(cfg: DictConfig, overrides: list[str]) -> TrialConfig:
    """The trial `python -m harness OVERRIDES` runs, checked whole: its values, then what it needs from this
    machine and its data. Every problem is raised at once, in one ConfigError."""
    try:
        trial, problems = trial_to_run(cfg, overrides), []
    except ConfigError as error:
        if error.trial is None:
            raise
        trial, problems = error.trial, error.problems
    check_trial(trial, problems)
    return trial


def check_job(cfg: DictConfig, overrides: list[str]) -> None:
    """CheckBeforeRun's check of one job: its trial, checked, is kept for the task function (`trial_for_job`)."""
    CHECKED[tuple(overrides)] = checked_trial(cfg, overrides)


def trial_for_job(cfg: DictConfig, overrides: list[str]) -> TrialConfig:
    """The job's trial as CheckBeforeRun composed and checked it; composed and checked now where no callback
    did (a study's jobs, a launcher that runs the job in another process): its ConfigError fails that job."""
    checked = CHECKED.pop(tuple(overrides), None)
    return checked if checked is not None else checked_trial(cfg, overrides)


def check_trial(cfg: TrialConfig, problems: Sequence[str] = ()) -> None:
    """Raise a ConfigError listing `problems` (already found in cfg's values) and every problem of `cfg` on this
    machine. The resume and data checks need valid values, so they run only without such problems; a trial
    that cannot start anyway does not wait for its data's checksums."""
    machine = device_problems(cfg.trainer) + tracking_problems(cfg) + plugin_problems(cfg.plugins)
    if not problems and not machine:
        machine += memory_problems(cfg)
    if not problems:
        machine += resume_problems(cfg) + data_problems(cfg, verify=not machine) + eval_problems(cfg)
    if problems or machine:
        raise ConfigError([*problems, *machine])


def refuse(error: ConfigError) -> NoReturn:
    """Print the problems, one line each, and exit 2; `HYDRA_FULL_ERROR=1` raises instead, for the traceback."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    for problem in error.problems:
        print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)


class CheckBeforeRun(Callback):
    """Hydra callback (conf/config.yaml): a run's trial, or every trial of a value sweep (`-m`), is composed and
    checked before Hydra creates an output directory, so bad input leaves nothing behind and runs nothing.
    (A study, `+sweep=…`, checks its trials itself before it starts.)"""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            check_job(task_config(config), list(config.hydra.overrides.task))
        except ConfigError as error:
            refuse(error)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.sweeper._target_ != BASIC_SWEEPER:
            return
        loader = GlobalHydra.instance().config_loader()
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(list(config.hydra.overrides.task))
        swept = {override.get_key_element() for override in parsed if override.is_sweep_override()}
        problems = []
        for number, job in enumerate(BasicSweeper.split_arguments(parsed, None)[0]):
            try:
                check_job(task_config(loader.load_sweep_config(config, job)), job)
            except ConfigError as error:
                label = " ".join(o for o in job if o.split("=")[0] in swept)
                problems += [f"job {number} ({label}): {problem}" for problem in error.problems]
        if problems:
            refuse(ConfigError(problems))


def task_config(config: DictConfig) -> DictConfig:
    """The trial's part of a config Hydra composed (a copy without `hydra`)."""
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def is_node_leader() -> bool:
    """The one process per node that reads whole files to verify them (ranks started by torchrun share it)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def device_problems(t: TrainerConfig) -> list[str]:
    if t.device not in DEVICES or t.precision not in PRECISIONS or t.nproc_per_node < 1:
        return []  # refused with the config already
    if t.device == "cpu":
        return []  # fp16_amp included: asked for explicitly, it runs emulated (harness.trial.precision)
    if t.device == "auto" and t.precision != "fp16_amp" and t.nproc_per_node == 1:
        return []  # whatever this machine has
    torch_version = importlib.metadata.version("torch")
    if torch_version.endswith("+cpu"):  # a CPU-only wheel: known without importing torch (seconds)
        why = f"torch {torch_version} is built without CUDA"
    else:
        import torch

        from harness.trial.ranks import under_torchrun

        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            if t.nproc_per_node > count and not under_torchrun():
                return [
                    f"trainer.nproc_per_node={t.nproc_per_node}: must be ≤ the {count} CUDA devices of this machine"
                ]
            return []
        why = f"torch {torch_version} finds no GPU"
    problems = []
    if t.device == "cuda":
        problems.append(
            f"trainer.device=cuda: must be a device this machine has, and it has no CUDA device ({why}); "
            f"use trainer.device=auto or cpu"
        )
    if t.precision == "fp16_amp":
        problems.append(FP16_NEEDS_CUDA)
    return problems


def training_bytes_at_least(cfg: TrialConfig) -> tuple[int, int]:
    """(parameters, a lower bound of the bytes training them takes): fp32 weights, gradients and AdamW's two
    moments (16 bytes a parameter), plus one micro-batch's fp32 logits."""
    m, micro_batch = cfg.model, cfg.trainer.micro_batch_size
    per_layer = 12 * m.d_model**2 + 13 * m.d_model
    parameters = m.n_layer * per_layer + m.vocab_size * m.d_model * (1 if m.tie_weights else 2)
    parameters += m.context_length * m.d_model + 2 * m.d_model
    return parameters, 16 * parameters + 4 * micro_batch * m.context_length * m.vocab_size


def device_memory(t: TrainerConfig) -> tuple[int, str]:
    """(bytes, what) of the memory the trial trains in: the GPU's where it runs on one, else this machine's RAM."""
    if t.device != "cpu" and not importlib.metadata.version("torch").endswith("+cpu"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, f"the {torch.cuda.get_device_name(0)}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


def memory_problems(cfg: TrialConfig) -> list[str]:
    """A model that cannot fit is refused before anything is allocated."""
    from harness.trial.disk import format_bytes

    parameters, needed = training_bytes_at_least(cfg)
    available, where = device_memory(cfg.trainer)
    if needed <= available:
        return []
    m = cfg.model
    return [
        f"model.d_model={m.d_model}, model.n_layer={m.n_layer}, model.n_head={m.n_head}: {parameters:,} parameters "
        f"need at least {format_bytes(needed)} to train (weights, gradients and AdamW's moments, 16 bytes each, "
        f"plus one micro-batch's logits), more than the {format_bytes(available)} of {where}; use a smaller model"
    ]


def tracking_problems(cfg: TrialConfig) -> list[str]:
    """tracking.uri itself is checked with the config; the store it defaults to, here."""
    from harness.tracking.store import has_credentials, public_uri

    if cfg.tracking.uri and has_credentials(cfg.tracking.uri):
        return [
            f"tracking.uri={public_uri(cfg.tracking.uri)} (password hidden): a URI on the command line is written "
            f"to the run's records; give credentials as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, or "
            f"the whole URI as MLFLOW_TRACKING_URI"
        ]
    environment = os.environ.get("MLFLOW_TRACKING_URI")
    if cfg.tracking.uri is None and environment and not is_tracking_uri(environment):
        return [f"MLFLOW_TRACKING_URI={environment} (the store, as tracking.uri is not set): must be {TRACKING_URI}"]
    return []


def resume_problems(cfg: TrialConfig) -> list[str]:
    if not cfg.resume:
        return []
    from harness.trial import checkpoint

    held = checkpoint.run_lock_holder(Path(cfg.resume))
    if held:
        return [f"resume={cfg.resume}: {held}"]
    try:
        found = checkpoint.find(Path(cfg.resume))
    except (FileNotFoundError, ValueError) as error:
        return [f"resume={cfg.resume}: {error}"]
    problems = checkpoint.damaged_files(found)
    if not problems:
        try:
            checkpoint.check_plain(found)
        except checkpoint.CheckpointError as error:
            return [f"resume={cfg.resume}: {error}"]
        foreign = checkpoint.foreign_run(found, Path(cfg.resume))
        return [f"resume={cfg.resume}: {foreign}"] if foreign else []
    intact = [path.name for path in sorted(found.parent.glob("step_*")) if not checkpoint.damaged_files(path)]
    advice = (
        f"to resume from an earlier checkpoint, write one of {', '.join(intact)} into {found.parent / 'latest'}"
        if intact
        else "no intact checkpoint is left: start the trial again"
    )
    return [f"resume={cfg.resume}: {problem}; {advice}" for problem in problems]


def plugin_problems(plugins: dict) -> list[str]:
    if not plugins:
        return []
    from harness.trial.plugins import plugin_class

    problems = []
    for name, options in plugins.items():
        try:
            plugin_class(name)(**(options or {}))
        except KeyError as error:
            problems.append(f"plugins.{name}: {error.args[0]}")
        except TypeError as error:
            problems.append(f"plugins.{name}={show(options)}: {error}")
    return problems


def data_problems(cfg: TrialConfig, verify: bool = True) -> list[str]:
    """The dataset exists and is intact (`verify`: checksums too), and holds the training sequences and the test
    window the trial reads."""
    from harness.data.corpus import BUNDLED_CACHE, prepare_bundled
    from harness.data.shards import MANIFEST, DataError, Manifest, ManifestError, open_split

    data, verify = cfg.data, verify and cfg.data.verify_checksums and is_node_leader()
    if data.dataset == "bundled":
        if data.path is not None:
            return [
                f"data.path={data.path}: the bundled corpus takes no path (it is tokenized into {BUNDLED_CACHE}); "
                f"drop data.path, or set data.dataset=fineweb to read a prepared directory"
            ]
        where, directory = "data.dataset=bundled", prepare_bundled(BUNDLED_CACHE, data.holdout_fraction, verify)
    else:
        where, directory = (
            (f"data.path={data.path}" if data.path else f"data.dataset={data.dataset}"),
            data.prepared_directory(),
        )
        command = f"python -m harness.data prepare dataset={data.dataset}" + (f" out={data.path}" if data.path else "")
        if directory.exists() and not directory.is_dir():
            return [f"{where}: {directory} is a file; data.path names a prepared dataset directory"]
        if not (directory / MANIFEST).is_file():
            state = "does not exist" if not directory.exists() else "holds no prepared dataset (no manifest.json)"
            return [
                f"{where}: {directory} {state}; prepare it once with `{command}`, or point data.path at a "
                f"prepared directory"
            ]
    try:
        manifest = Manifest.load(directory)
    except ManifestError as error:  # only a prepared dataset's: the bundled cache rebuilds itself
        return [
            f"{where}: {error}; move it away and prepare the directory from the start with "
            f"`python -m harness.data prepare dataset={data.dataset} out={directory}`"
        ]
    try:
        train, test = (open_split(directory, split, verify) for split in ("train", "test"))
    except DataError as error:
        return [f"{where}: {error}"]
    if manifest.dataset != data.dataset:
        return [f"data.dataset={data.dataset}: {directory} holds {manifest.dataset}, not {data.dataset}"]
    if manifest.tokenizer != "gpt2":
        return [
            f"{where}: {directory} was tokenized with {manifest.tokenizer}, not the GPT-2 tokenizer the model reads"
        ]
    return fit_problems(cfg, len(train), len(test))


def eval_problems(cfg: TrialConfig) -> list[str]:
    """With eval.hellaswag=true: HellaSwag is prepared and intact, and every ending fits the model's context."""
    if not cfg.eval.hellaswag:
        return []
    from harness.trial.evaluation import hellaswag_examples

    try:
        hellaswag_examples(cfg.eval, cfg.model.context_length)
    except ValueError as error:  # HellaswagDataError
        return [str(error)]
    return []


def fit_problems(cfg: TrialConfig, train_tokens: int, test_tokens: int) -> list[str]:
    data, context, problems = cfg.data, cfg.model.context_length, []
    available = (train_tokens - 1) // context
    needed = cfg.trainer.max_steps * cfg.trainer.global_batch_size
    if available < 1:
        problems.append(
            f"model.context_length={context}: the training split of {train_tokens:,} tokens holds no "
            f"sequence of {context + 1:,} tokens"
        )
    elif needed / available > data.max_epochs:
        problems.append(
            f"data.max_epochs={show(data.max_epochs)}: the trial needs {needed:,} sequences of {context + 1} tokens "
            f"({needed * context:,} tokens) but the training split holds {available:,} ({train_tokens:,} tokens): "
            f"{needed / available:.2f} epochs > data.max_epochs={show(data.max_epochs)}. Use fewer steps or more "
            f"data, or raise data.max_epochs."
        )
    end = data.test_offset + data.test_tokens
    if end + 1 > test_tokens:
        problems.append(
            f"data.test_tokens={data.test_tokens}: the test window, tokens {data.test_offset:,} … {end:,} "
            f"(data.test_offset={data.test_offset}), needs {end + 1:,} tokens but the held-out split "
            f"holds {test_tokens:,}"
        )
    return problems
