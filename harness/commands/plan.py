"""`python -m harness plan`: what a trial or a study will cost, before anything runs.
Nothing is trained, written or recorded, and torch is not loaded."""

import dataclasses
import math
from pathlib import Path

from harness.arguments import split
from harness.config.checks import ConfigError
from harness.config.compose import intervention_tag
from harness.config.overrides import override_problems
from harness.config.schema import TrialConfig
from harness.paths import CONF
from harness.progress import format_duration
from harness.study import cost
from harness.trial.disk import format_bytes, retention

USAGE = """\
usage:
    python -m harness plan [TRIAL OVERRIDES] [gpu=h100] [gpus=N] [tokens_per_sec=N | mfu=F] [price_per_gpu_hour=P]
    python -m harness plan +sweep=STUDY [TRIAL OVERRIDES] [hydra.sweeper.KEY=VALUE] [the same options]

Prints, per trial and in all: parameters, steps, tokens, FLOPs, tokens/s per GPU, GPU-hours, wall time, the
checkpoint disk under the retention setting (trainer.keep_checkpoints) and the cost, and says where the throughput
and the price come from. A study's trials are composed exactly as the sweeper composes them. Nothing is trained,
written or recorded, and torch is not loaded.

  gpu=KIND               a100, h100 (default), h200, or a kind `make bench` measured (cpu, ...)
  gpus=N                 GPUs in all (default: one trial's, trainer.nproc_per_node): trials share them
  tokens_per_sec=N       what one GPU trains per second on the first trial (your measurement); the other trials
                         scale by their FLOPs per token and speed (precision, dropout)
  mfu=F                  or the matmul FLOPs utilisation one GPU achieves, in (0, 1]
  price_per_gpu_hour=P   US$ per GPU-hour (default: the GPU's list price in harness/study/cost.py, an assumption)
"""


def number(text: str, kind=float) -> float | None:
    try:
        value = kind(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


OPTIONS = {  # key: (parse, allowed, what it must be)
    "gpu": (str.lower, lambda v: bool(v), "a GPU kind: a100, h100, h200, or one `make bench` measured"),
    "gpus": (lambda t: number(t, int), lambda v: v >= 1, "a whole number ≥ 1"),
    "tokens_per_sec": (number, lambda v: v > 0, "a finite number > 0 (one GPU's tokens/s on the first trial)"),
    "mfu": (number, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "price_per_gpu_hour": (number, lambda v: v >= 0, "a finite number ≥ 0 (US$)"),
}


def parse(arguments: list[str]) -> tuple[dict, list[str], list[str]]:
    """(plan options, the trial's overrides, problems)."""
    given = split(arguments, OPTIONS, flags=("-m", "--multirun"))
    options, overrides, problems = {}, given.rest, []
    for key, text in given.settings.items():
        parse_value, allowed, what = OPTIONS[key]
        value = parse_value(text)
        if value is None or not allowed(value):
            problems.append(f"{key}={text}: must be {what}")
        options[key] = value
    for flag in sorted(given.flags):
        problems.append(f"{flag}: a plan covers one trial, or a study with +sweep=NAME; not value sweeps")
    if "tokens_per_sec" in options and "mfu" in options:
        problems.append("tokens_per_sec= and mfu= both give the throughput: give one")
    return options, overrides, problems


def unplannable(overrides: list[str]) -> list[str]:
    """Value sweeps (an override that does not parse is reported by `override_problems`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, problems = OverridesParser.create(), []
    for override in overrides:
        try:
            [parsed] = parser.parse_overrides([override])
        except Exception:
            continue
        if parsed.is_sweep_override():
            problems.append(
                f"{override}: a plan covers one trial, or a study with +sweep=NAME; plan each value on its own"
            )
    return problems


def compose_trials(overrides: list[str]) -> tuple[list[tuple[str, TrialConfig]], str]:
    """The trials the command would run, named, and a line saying what they are."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not any(o.key_or_group == "sweep" for o in OverridesParser.create().parse_overrides(overrides)):
        from harness.config.compose import compose

        cfg = compose(overrides)
        return [(trial_label(cfg), cfg)], f"1 trial at scale {cfg.scale}"
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from harness.study.design import StudyConf, study_trials
    from harness.study.run import check_command_line, compose_trial_config

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", overrides, run_mode=RunMode.MULTIRUN)
        study = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StudyConf), master.hydra.sweeper))
        arguments = list(master.hydra.overrides.task)
        try:
            check_command_line(arguments)
            trials = study_trials(study)
        except ValueError as error:
            raise ConfigError([f"study {master.study}: {error}"]) from None
        composed, planned = {}, []  # an arm is composed once: its trials differ only in their (checked) seeds
        for trial in trials:
            try:
                if trial.arm not in composed:
                    composed[trial.arm] = compose_trial_config(
                        loader, master, [*study.overrides, *arguments, *trial.overrides()]
                    )
                cfg = dataclasses.replace(composed[trial.arm], seed=trial.seed, train_seed=trial.train_seed)
            except ConfigError as error:
                raise ConfigError([f"study {master.study}, trial {trial.name}: {p}" for p in error.problems]) from None
            planned.append((trial.name, cfg))
    scales = sorted({cfg.scale for _, cfg in planned})
    return planned, f"study {master.study}, {len(planned)} trials at scale {', '.join(scales)}: {study.description}"


def trial_label(cfg: TrialConfig) -> str:
    train = "" if cfg.train_seed is None else f"-t{cfg.train_seed}"
    return f"{intervention_tag(cfg.interventions)}-s{cfg.seed}{train}"


def table(rows: list[list[str]]) -> str:
    """A Markdown table that also reads aligned in a terminal; numbers right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = [i > 0 for i in range(len(widths))]
    lines = [
        "| "
        + " | ".join(
            cell.rjust(w) if numeric[i] and r else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        )
        + " |"
        for r, row in enumerate(rows)
    ]
    lines.insert(
        1, "|" + "|".join("-" * (w + 2) if not numeric[i] else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    )
    return "\n".join(lines)


def flop_rate(per_sec: float) -> str:
    return f"{per_sec / 1e12:,.1f} TFLOP/s" if per_sec >= 1e11 else f"{per_sec / 1e9:,.2f} GFLOP/s"


def money(dollars: float) -> str:
    return f"${dollars:,.2f}" if dollars >= 0.01 or dollars == 0 else "< $0.01"


def hours(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def report(planned: list[tuple[str, TrialConfig]], what: str, options: dict) -> str:
    gpu = options.get("gpu", cost.DEFAULT_GPU)
    rate = cost.throughput(gpu, options.get("tokens_per_sec"), options.get("mfu"), first=planned[0][1])
    trials = [cost.trial_cost(name, cfg, rate) for name, cfg in planned]
    gpus = options.get("gpus") or max(t.gpus for t in trials)
    if gpus < max(t.gpus for t in trials):
        raise ConfigError(
            [f"gpus={gpus}: fewer than a trial's ranks (trainer.nproc_per_node={max(t.gpus for t in trials)})"]
        )
    known = cost.GPUS.get(gpu)
    price = options.get("price_per_gpu_hour")
    price_source = "given" if price is not None else known.price_source if known else "no list price for this kind"
    price = price if price is not None else known.price if known else 0.0
    gpu_name = known.name if known else gpu
    first = trials[0]
    achieved = first.tokens_per_sec * first.flops / first.tokens  # matmul FLOP/s of one GPU
    utilisation = (
        ""
        if known is None
        else f", {achieved / known.peak_flops:.1%} MFU of the {gpu_name}'s {known.peak_flops / 1e12:,.0f} TFLOP/s"
    )
    scaled = cost.speed_factors(planned[0][1], [cfg for _, cfg in planned])
    lines = [
        f"plan: {what}",
        f"on {gpu_name}{' GPUs' if known else ''}, {gpus} in all (gpus=); nothing runs, nothing is written",
        f"throughput: {first.tokens_per_sec:,.0f} tokens/s per GPU on {first.name} ({flop_rate(achieved)} of "
        f"matmuls{utilisation})",
        f"  from: {rate.source}",
        *([f"  other trials scale by their FLOPs per token and speed: {scaled}"] if scaled else []),
        "  your own: tokens_per_sec=N (one GPU, first trial) or mfu=F; gpu= a100, h100, h200 or a kind `make bench` "
        "measured",
        f"price: {money(price)} per GPU-hour ({price_source}); price_per_gpu_hour=P",
        "",
    ]
    rows = [
        [
            "trial",
            "params",
            "steps",
            "tokens",
            "FLOPs",
            "tokens/s/GPU",
            "GPUs",
            "GPU-hours",
            "wall",
            "checkpoints at most",
            "cost",
        ]
    ]
    for t in trials:
        rows.append(
            [
                t.name,
                f"{t.parameters:,}",
                f"{t.steps:,}",
                f"{t.tokens:,}",
                f"{t.flops:.3g}",
                f"{t.tokens_per_sec:,.0f}",
                str(t.gpus),
                hours(t.gpu_hours),
                format_duration(3600 * t.hours),
                f"{t.checkpoints_at_most} × {format_bytes(t.checkpoint_bytes)}",
                money(t.gpu_hours * price),
            ]
        )
    gpu_hours = sum(t.gpu_hours for t in trials)
    keep = {cfg.trainer.keep_checkpoints for _, cfg in planned}
    lines += [
        table(rows),
        "",
        hellaswag_line(trials),
        (
            f"total: {len(trials)} trial{'s' if len(trials) > 1 else ''}; {sum(t.tokens for t in trials):,} tokens; "
            f"{sum(t.flops for t in trials):.3g} FLOPs; {hours(gpu_hours)} GPU-hours; "
            f"{format_duration(3600 * cost.study_hours(trials, gpus))} on {gpus} GPU{'s' if gpus > 1 else ''}; "
            f"checkpoints: {format_bytes(cost.disk_needed(trials, gpus))} of disk at most "
            f"(keeping {' / '.join(retention(k) for k in keep)}, trainer.keep_checkpoints); {money(gpu_hours * price)}"
        ),
        f"not counted: each trial's final test evaluation ({first.test_tokens:,} tokens, forward only; on a GPU twice, "
        f"fp32 and fp16 autocast), start-up, samples and charts",
    ]
    lines += resume_savings(planned, trials)
    return "\n".join(lines)


def resume_savings(planned: list[tuple[str, TrialConfig]], trials: list) -> list[str]:
    """For a study whose store already exists: the trials that will continue an unfinished run from an intact
    checkpoint, and the steps and GPU-hours that saves (docs/cluster.md). The store is only read."""
    study = planned[0][1].study
    if study is None or any(cfg.rerun for _, cfg in planned):
        return []
    from harness.config.compose import config_hash
    from harness.paths import default_tracking_uri
    from harness.tracking.store import connect, normalize_uri
    from harness.tracking.version import code_version

    uri = normalize_uri(planned[0][1].tracking.uri or default_tracking_uri())
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return []
    from harness.trial.resumption import latest_intact, unfinished_runs  # loads torch and MLflow: a store exists

    try:
        client = connect(uri, timeout=planned[0][1].tracking.connect_timeout)
        experiment = client.get_experiment_by_name(planned[0][1].tracking.experiment)
        if experiment is None:
            return []
        found, taken = [], set()
        for (name, cfg), cost_of in zip(planned, trials):
            version = None if cfg.reuse_other_code_versions else code_version()
            runs = unfinished_runs(client, experiment.experiment_id, study, config_hash(cfg), version)
            for run in (r for r in runs if r.info.run_id not in taken):
                intact, _ = latest_intact(Path(run.data.tags["run_dir"]))
                if intact is not None:
                    taken.add(run.info.run_id)
                    done = checkpoint_step(intact.name)
                    found.append((name, run.info.run_id, intact.name, done, cost_of.gpu_hours * done / cost_of.steps))
                    break
    except Exception as error:  # the plan stays a plan without the store
        return ["", f"resume: the store {uri} could not be read ({str(error).splitlines()[0][:200]})"]
    if not found:
        return []
    lines = ["", f"resume: {len(found)} trial{'s' if len(found) > 1 else ''} continue an unfinished run:"]
    lines += [
        f"  {name}: run {run_id} from {step_dir}, {done:,} steps done ({hours(h)} GPU-hours saved)"
        for name, run_id, step_dir, done, h in found
    ]
    saved = sum(h for *_, h in found)
    lines.append(f"  saved in all: {hours(saved)} GPU-hours; the table above counts every step")
    return lines


def checkpoint_step(name: str) -> int:
    from harness.trial.checkpoint import STEP_DIR

    return int(STEP_DIR.fullmatch(name)[1])


def hellaswag_line(trials: list) -> str:
    """What HellaSwag adds (eval.hellaswag), estimated from its FLOPs at the training's throughput."""
    scored = [t for t in trials if t.hellaswag_scorings]
    if not scored:
        return "HellaSwag: not scored (eval.hellaswag=false); eval.hellaswag=true adds its time here"
    each = scored[0]
    return (
        f"HellaSwag: {len(scored)} of {len(trials)} trials score it; {each.name}: {each.hellaswag_scorings} × "
        f"{format_duration(each.hellaswag_seconds / each.hellaswag_scorings)} ({cost.HELLASWAG_EXAMPLES:,} examples, "
        f"forward only at the training's FLOP/s + {cost.HELLASWAG_OVERHEAD_S:.0f} s each; docs/hellaswag.md); "
        f"{format_duration(sum(t.hellaswag_seconds for t in scored))} in all, not in the GPU-hours above"
    )


def main(arguments: list[str]) -> int:
    """Exit status 0, or 2 with one line per problem (`HYDRA_FULL_ERROR=1` raises instead, for the traceback)."""
    from hydra.errors import HydraException

    from harness.trial.preflight import refuse

    if arguments and arguments[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    options, overrides, problems = parse(arguments)
    problems += override_problems(overrides) + unplannable(overrides)
    try:
        if problems:
            raise ConfigError(problems)
        planned, what = compose_trials(overrides)
        print(report(planned, what, options))
    except ConfigError as error:
        refuse(error)
    except (ValueError, HydraException) as error:  # no throughput for the GPU; Hydra's own composition errors
        refuse(ConfigError([str(error).strip().splitlines()[0]]))
    return 0
