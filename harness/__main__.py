"""`python -m harness [overrides]` runs one trial; `python -m harness list` lists the interventions."""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from harness.config import to_trial_config
from harness.trainer import Trial
from interventions import REGISTRY, describe

log = logging.getLogger("harness")


def intervention_names(overrides: list[str]) -> list[str]:
    """The interventions an override list applies, stacks expanded to their components, sorted."""
    names = set()
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.key_or_group == "intervention" and not override.is_delete():
            value = override.value()
            for name in value if isinstance(value, list) else [value]:
                names.update(REGISTRY[name].expanded())
    return sorted(names)


def compose_trial(cfg: DictConfig, overrides: list[str]):
    cfg.interventions = intervention_names(overrides)
    return to_trial_config(cfg)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def run(cfg: DictConfig) -> float:
    trial_cfg = compose_trial(cfg, list(HydraConfig.get().overrides.task))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = Trial(trial_cfg, run_dir).run()
    print(f"test_loss {result['test_loss']:.6f}  run {result['run_id']}  dir {run_dir}")
    return result["test_loss"]


def main() -> None:
    if sys.argv[1:2] == ["list"]:
        print(describe())
        return
    run()


if __name__ == "__main__":
    main()
