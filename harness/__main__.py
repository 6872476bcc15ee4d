"""`python -m harness [overrides]` runs one trial; `python -m harness +sweep=STUDY [overrides]` runs a study
(conf/sweep/); `python -m harness list` lists the interventions.

Imports stay inside the functions that need them: `list` loads neither Hydra nor torch, and torch and
MLflow load only when a trial starts.
"""

import sys
from pathlib import Path


def run_trial(cfg) -> float:
    """Hydra's task function: one composed trial, run on its ranks."""
    from hydra.core.hydra_config import HydraConfig

    from harness.config import compose_trial, resumed_trial

    overrides = list(HydraConfig.get().overrides.task)
    trial_cfg = compose_trial(cfg, overrides)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if trial_cfg.resume:
        trial_cfg = resumed_trial(trial_cfg, overrides)
        run_dir = Path(trial_cfg.resume)
    from harness.launch import launch
    from harness.sweep import export_submitit_ranks

    export_submitit_ranks()
    result = launch(trial_cfg, run_dir)
    if "test_loss" in result:
        print(f"test_loss {result['test_loss']:.6f}  run {result['run_id']}  dir {run_dir}")
    return result.get("test_loss")


def main() -> None:
    if sys.argv[1:2] == ["list"]:
        from interventions import describe

        print(describe())
        return
    import hydra

    import harness.config  # noqa: F401  (stores the trial schema that conf/config.yaml names)

    hydra.main(config_path="../conf", config_name="config", version_base="1.3")(run_trial)()


if __name__ == "__main__":
    main()
