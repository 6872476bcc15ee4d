"""`python -m harness`: one command table. With no command (or `train`), the arguments are Hydra overrides for
one trial, or for a study with `+sweep=STUDY`; every other command is a `main(argv)` in its own module.

Bad input is refused before anything runs (docs/config.md). Imports stay inside the functions that need them:
`list` and `--help` load neither torch nor MLflow.
"""

import importlib
import os
import sys
from pathlib import Path

# name -> (module whose main(argv) runs it, what it does); the trial itself is the default command.
COMMANDS = {
    "train": ("", "one trial (the default: `python -m harness [overrides]`), or a study with +sweep=STUDY"),
    "plan": ("harness.commands.plan", "what a trial or a study will cost, before it runs"),
    "list": ("", "every intervention, what it sets, the seeds' result"),
    "runs": ("harness.commands.runs", "the runs in the store: stale, preempted, what resumes them"),
    "replay": ("harness.commands.runs", "send a run directory's unsent records to the store"),
    "evaluate": ("harness.commands.evaluate", "re-score a saved trial's checkpoint on the held-out window"),
    "export": ("harness.commands.export", "a saved trial as a Hugging Face GPT-2 directory"),
    "reference": ("harness.commands.reference", "a Hugging Face GPT-2 scored as a reference run"),
    "prepare": ("harness.data.__main__", "download, tokenize and verify a dataset"),
    "bench": ("harness.commands.bench", "throughput and MFU of configs side by side"),
    "bench-tracking": ("harness.commands.bench_tracking", "what tracking costs per step"),
    "gpu-check": ("harness.commands.gpucheck", "the CUDA path's acceptance and speed table in one run (docs/gpu.md)"),
    "analyze": ("analysis.__main__", "a study's seed noise and ranking of interventions"),
}
PASS_COMMAND_NAME = {"runs", "replay", "prepare"}  # their main() takes the command word itself


def run_trial(cfg) -> float:
    """Hydra's task function: one composed trial, run on its ranks."""
    from hydra.core.hydra_config import HydraConfig

    from harness.trial.preflight import trial_for_job
    from harness.trial.ranks import Ranks, export_submitit_ranks
    from harness.trial.resumption import resume_unfinished

    export_submitit_ranks()
    overrides = list(HydraConfig.get().overrides.task)
    world = Ranks.from_env().world if "WORLD_SIZE" in os.environ else None
    trial_cfg = resume_unfinished(trial_for_job(cfg, overrides), overrides, world)
    run_dir = Path(trial_cfg.resume or HydraConfig.get().runtime.output_dir)
    if trial_cfg.resume:
        from harness.tracking.liveness import resumed_already_finished

        done = resumed_already_finished(trial_cfg)
        if done:
            print(f"resume={run_dir}: {done}", flush=True)
            return None
        from harness.config.checks import ConfigError
        from harness.trial.checkpoint import hold_run_lock
        from harness.trial.preflight import refuse

        held = hold_run_lock(run_dir)  # for this process's life: a resume is exclusive
        if held:
            refuse(ConfigError([f"resume={run_dir}: {held}"]))
    from harness.trial.launch import launch

    result = launch(trial_cfg, run_dir, checked=True)
    if "test_loss" in result:
        print(f"test_loss {result['test_loss']:.6f}  run {result['run_id']}  dir {run_dir}")
    return result.get("test_loss")


def command_table() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
    return f"usage: python -m harness [COMMAND] [ARGS]\n\ncommands:\n{rows}\n"


def train(arguments: list[str]) -> None:
    import hydra
    from hydra._internal.utils import get_args_parser

    import harness.config.compose  # noqa: F401  (registers the schema that conf/config.yaml names: trial_schema)
    from harness.config.checks import ConfigError
    from harness.config.overrides import overlay_file_problems, override_problems
    from harness.paths import CONF
    from harness.trial.preflight import refuse

    flags = get_args_parser().parse_args(arguments)
    if not (
        flags.hydra_help
        or flags.shell_completion
        or flags.info
        or flags.config_dir
        or flags.config_path
        or flags.config_name
        or flags.experimental_rerun
    ):
        problems = override_problems(flags.overrides)
        if problems:
            refuse(ConfigError(problems))
    broken_overlays = overlay_file_problems(flags.overrides, flags.config_dir)
    if broken_overlays:
        refuse(ConfigError(broken_overlays))
    from harness.trial.preemption import Preempted, exit_status

    sys.argv = [sys.argv[0], *arguments]
    try:
        hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")(run_trial)()
    except (KeyboardInterrupt, Preempted) as stopped:  # the run says how it ended; no traceback
        print(f"stopped: {str(stopped) or 'interrupted (Ctrl-C)'}", file=sys.stderr, flush=True)
        sys.exit(exit_status(stopped))


def main(arguments: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if arguments is None else arguments
    command = arguments[0] if arguments and arguments[0] in COMMANDS else "train"
    rest = arguments[1:] if arguments[:1] == [command] else arguments
    if command == "list":
        from interventions import describe

        print(describe())
        return
    if command == "train":
        if "--help" in rest or "-h" in rest:
            from harness.config.usage import usage

            print(command_table() + "\n" + usage())
            return
        train(rest)
        return
    module = importlib.import_module(COMMANDS[command][0])
    status = module.main([command, *rest] if command in PASS_COMMAND_NAME else rest)
    sys.exit(status or 0)


if __name__ == "__main__":
    main()
