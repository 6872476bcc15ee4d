"""`python -m harness [overrides]` runs one trial; `python -m harness +sweep=STUDY [overrides]` runs a study
(conf/sweep/); `python -m harness list` lists the interventions; `python -m harness runs` and
`python -m harness replay` look after the records in the store (harness/runs.py)."""

import os
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from harness.config import TrialConfig, as_dict, config_hash, flatten, to_trial_config
from harness.launch import launch
from harness.sweep import export_submitit_ranks
from interventions import REGISTRY, describe


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
    cfg.interventions = intervention_names(overrides)
    return to_trial_config(cfg)


def resumed_trial(cfg: TrialConfig, overrides: list[str]) -> Optional[tuple[TrialConfig, Path]]:
    """`resume=DIR` alone continues DIR's trial with its saved config, in its own store; with the original
    overrides repeated, they must compose to the same computation. None when the trial already FINISHED."""
    run_dir = Path(cfg.resume)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"resume={cfg.resume}: no config.yaml there; pass the trial's run directory")
    saved = to_trial_config(OmegaConf.load(run_dir / "config.yaml"))
    saved.resume = str(run_dir)
    from harness import checkpoint, records, tracking
    from harness.trainer import resume_run_id

    requested, source = (cfg.tracking.uri, "tracking.uri") if cfg.tracking.uri else \
        (os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
    uri = records.own_store(saved.tracking.uri, requested, source, f"resume={run_dir}")
    saved.tracking.uri = uri = uri or tracking.default_tracking_uri()
    others = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "hydra.", "tracking."))]
    if others and config_hash(saved) != config_hash(cfg):
        ours, theirs = flatten(as_dict(cfg)), flatten(as_dict(saved))
        differ = ", ".join(f"{k}: {theirs[k]!r} → {ours[k]!r}" for k in theirs
                           if ours.get(k) != theirs[k] and k != "resume" and not k.startswith("tracking."))
        raise ValueError(f"resume={run_dir}: these overrides change the trial ({differ}); "
                         f"resume with no other overrides to continue it as saved")
    if (run_dir / tracking.UNSENT_FILE).exists():
        raise ValueError(f"resume={run_dir}: {run_dir / tracking.UNSENT_FILE} holds records the store never received; "
                         f"send them first: python -m harness replay {run_dir}")
    done = records.finished_already(uri, resume_run_id(checkpoint.find(run_dir)), saved.tracking.connect_timeout)
    if done:
        print(f"resume={run_dir}: {done}", flush=True)
        return None
    return saved, run_dir


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def run(cfg: DictConfig) -> float:
    overrides = list(HydraConfig.get().overrides.task)
    trial_cfg = compose_trial(cfg, overrides)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if trial_cfg.resume:
        resumed = resumed_trial(trial_cfg, overrides)
        if resumed is None:
            return None
        trial_cfg, run_dir = resumed
    export_submitit_ranks()
    result = launch(trial_cfg, run_dir)
    if "test_loss" in result:
        print(f"test_loss {result['test_loss']:.6f}  run {result['run_id']}  dir {run_dir}")
    return result.get("test_loss")


def main() -> None:
    if sys.argv[1:2] == ["list"]:
        print(describe())
        return
    if sys.argv[1:2] in (["runs"], ["replay"]):
        from harness.runs import main as runs_main

        sys.exit(runs_main(sys.argv[1:]))
    run()


if __name__ == "__main__":
    main()
