"""`python -m harness [overrides]` runs one trial; `python -m harness +sweep=STUDY [overrides]` runs a study
(conf/sweep/); `python -m harness list` lists the interventions; `python -m harness runs` and
`python -m harness replay` look after the records in the store (harness/runs.py); `python -m harness plan`
says what a trial or a study will cost (harness/plan.py); `python -m harness --help` says how.

Bad input is refused before anything runs, one line per problem: the overrides are checked against the
schema before Hydra composes, the composed trial before Hydra makes its output directory (a callback, see
harness/preflight.py). Imports stay inside the functions that need them: `list` loads neither Hydra nor
torch, `--help` and a refused config load the config layer only, and torch and MLflow load once a trial starts.
"""

import sys
from pathlib import Path


def run_trial(cfg) -> float:
    """Hydra's task function: one composed trial, run on its ranks."""
    from hydra.core.hydra_config import HydraConfig

    from harness.config import trial_to_run

    trial_cfg = trial_to_run(cfg, list(HydraConfig.get().overrides.task))
    run_dir = Path(trial_cfg.resume or HydraConfig.get().runtime.output_dir)
    if trial_cfg.resume:
        from harness.records import resumed_already_finished

        done = resumed_already_finished(trial_cfg)
        if done:
            print(f"resume={run_dir}: {done}", flush=True)
            return None
    from harness.launch import launch
    from harness.sweep import export_submitit_ranks

    export_submitit_ranks()
    result = launch(trial_cfg, run_dir)
    if "test_loss" in result:
        print(f"test_loss {result['test_loss']:.6f}  run {result['run_id']}  dir {run_dir}")
    return result.get("test_loss")


def main() -> None:
    arguments = sys.argv[1:]
    if arguments[:1] == ["list"]:
        from interventions import describe

        print(describe())
        return
    if arguments[:1] == ["plan"]:
        from harness.plan import main as plan_main

        sys.exit(plan_main(arguments[1:]))
    if arguments[:1] in (["runs"], ["replay"]):
        from harness.runs import main as runs_main

        sys.exit(runs_main(arguments))
    if "--help" in arguments or "-h" in arguments:
        from harness.usage import usage

        print(usage())
        return
    import hydra
    from hydra._internal.utils import get_args_parser

    from harness.config import CONF, ConfigError, override_problems
    from harness.preflight import refuse

    flags = get_args_parser().parse_args(arguments)
    if not (flags.hydra_help or flags.shell_completion or flags.info or flags.config_dir or flags.config_path
            or flags.config_name or flags.experimental_rerun):
        problems = override_problems(flags.overrides)
        if problems:
            refuse(ConfigError(problems))
    hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")(run_trial)()


if __name__ == "__main__":
    main()
