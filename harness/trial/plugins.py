"""Hook points through which an intervention's code changes a trial without editing the training loop.

A plugin subclasses `Plugin`, overrides the hooks it needs and registers with `@register("name")`; a config
enables it with `plugins: {name: {option: value}}`. The hooks and their order are described in docs/trial.md."""

import importlib
from typing import Any

import torch

from harness.trial.model import GPTModel

PLUGINS: dict[str, type["Plugin"]] = {}


class Plugin:
    def build_model(self, model: GPTModel) -> GPTModel:
        return model

    def parameter_groups(self, model: GPTModel, groups: list[dict]) -> list[dict]:
        return groups

    def lr_factor(self, step: int, total_steps: int, factor: float) -> float:
        return factor

    def loss(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss

    def after_backward(self, model: GPTModel, step: int) -> None:
        pass


def register(name: str):
    def decorate(cls: type[Plugin]) -> type[Plugin]:
        PLUGINS[name] = cls
        return cls

    return decorate


def plugin_class(name: str) -> type[Plugin]:
    if name not in PLUGINS:
        try:
            importlib.import_module(f"interventions.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"interventions.{name}":
                raise
        if name not in PLUGINS:
            raise KeyError(
                f"no plugin named {name!r}; registered: {', '.join(sorted(PLUGINS)) or 'none'} "
                f"(shipped plugins are modules in interventions/ that call harness.trial.plugins.register)"
            )
    return PLUGINS[name]


class Plugins:
    """The enabled plugins, applied in name order at every hook."""

    def __init__(self, config: dict[str, dict[str, Any]]):
        self.active = []
        for name in sorted(config):
            try:
                self.active.append(plugin_class(name)(**(config[name] or {})))
            except TypeError as error:
                raise TypeError(f"plugins.{name}: {error}") from None

    def build_model(self, model: GPTModel) -> GPTModel:
        for plugin in self.active:
            model = plugin.build_model(model)
        return model

    def parameter_groups(self, model: GPTModel, groups: list[dict]) -> list[dict]:
        for plugin in self.active:
            groups = plugin.parameter_groups(model, groups)
        return groups

    def lr_factor(self, step: int, total_steps: int, factor: float) -> float:
        for plugin in self.active:
            factor = plugin.lr_factor(step, total_steps, factor)
        return factor

    def loss(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        for plugin in self.active:
            loss = plugin.loss(loss, logits, targets)
        return loss

    def after_backward(self, model: GPTModel, step: int) -> None:
        for plugin in self.active:
            plugin.after_backward(model, step)
