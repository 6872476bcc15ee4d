"""`hydra/sweeper=study`: runs a study from `conf/sweep/` through whichever Hydra launcher is configured.

Hydra finds this module by scanning the `hydra_plugins` namespace package at every start, so the work
lives in `harness/study/run.py` and is imported only when a study runs.
"""

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from harness.study.design import StudyConf

ConfigStore.instance().store(group="hydra/sweeper", name="study", node=StudyConf, provider="harness")


class StudySweeper(Sweeper):
    def __init__(self, **_: object) -> None:
        """Hydra passes the keys of `hydra.sweeper`; setup() reads them from the config, type-checked."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.study = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StudyConf), config.hydra.sweeper))
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list:
        from harness.study.run import run_study

        return run_study(self.study, self.config, self.hydra_context.config_loader, self.launcher, arguments)
