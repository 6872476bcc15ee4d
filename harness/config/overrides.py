"""The command line's overrides checked before Hydra composes anything: unknown keys (with the nearest existing
key), values of the wrong type, group options that do not exist, plugin options no overlay set. Also the schema's
keys and their types, which the composed trial's checks share.
"""

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.config.checks import show
from harness.config.schema import TrialConfig
from harness.paths import CONF
from interventions import overlay_settings


def schema_fields(schema: type = TrialConfig, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of the schema (`optim.lr`, `seed`, …) and its type."""
    keys = {}
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.type):
            keys.update(schema_fields(f.type, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = f.type
    return keys


def type_text(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Union:
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return f"{type_text(inner[0])} or null"
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}
    return names.get(annotation, "a " + getattr(annotation, "__name__", str(annotation)).lower())


def type_problem(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", "") or "?"
    kind = type_text(schema_fields().get(key, object)) if key in schema_fields() else None
    value = getattr(error, "value", None)
    return f"{key}={show(value)}: must be {kind}" if kind else f"{key}: {str(error).splitlines()[0]}"


# What other trainers call a key, to the key's name here: `optim.learning_rate` is answered with `optim.lr`.
COMMON_NAMES = {
    "learning_rate": "lr",
    "max_lr": "lr",
    "wd": "weight_decay",
    "batch_size": "global_batch_size",
    "steps": "max_steps",
    "n_layers": "n_layer",
    "num_layers": "n_layer",
    "n_heads": "n_head",
    "num_heads": "n_head",
    "n_embd": "d_model",
    "block_size": "context_length",
}


def unknown_key_problem(key: str, value: Any = None, with_value: bool = False) -> str:
    """`optim.lrr=1: no such config key; did you mean optim.lr? …`"""
    keys = list(schema_fields())
    leaf = key.rsplit(".", 1)[-1]
    guess = [k for k in keys if k.rsplit(".", 1)[-1] == COMMON_NAMES.get(leaf)][:1]
    guess = guess or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not guess:  # a right name in the wrong section, or a bare name: compare the last part
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
        guess = [leaves[g] for g in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.75)]
    section = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k.rsplit(".", 1)[-1] for k in keys if (k.rsplit(".", 1)[0] if "." in k else "") == section]
    hint = f"did you mean {guess[0]}?" if guess else ""
    if siblings and section:
        hint += f"{' ' if hint else ''}({section} has: {', '.join(siblings)})"
    elif not guess:
        hint = "the sections are model, data, optim, trainer, tracking; see `python -m harness --help`"
    return f"{key}{'=' + show(value) if with_value else ''}: no such config key; {hint}"


def unknown_keys(node: Mapping, schema: type, prefix: str = "") -> list[str]:
    """Hydra's `+key=value` can add keys the schema lacks; a misspelt one must not pass silently."""
    known = {f.name: f.type for f in dataclasses.fields(schema)}
    problems = []
    for key in node:
        if key not in known:
            problems.append(unknown_key_problem(f"{prefix}{key}"))
        elif dataclasses.is_dataclass(known[key]) and isinstance(node[key], Mapping):
            problems += unknown_keys(node[key], known[key], f"{prefix}{key}.")
    return problems


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def override_problems(overrides: list[str]) -> list[str]:
    """Command-line overrides checked against the schema and `conf/` before Hydra composes anything:
    unknown keys (with the nearest existing key), values of the wrong type, options that do not exist."""
    parser = OverridesParser.create()
    grammar = []
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception as error:  # Hydra's grammar refuses it
            why = " ".join(str(error).split()).split(" See https://")[0][:200]
            grammar.append(
                f"{override}: not an override Hydra's grammar accepts ({why}); an override is key=value, and a value "
                f"holding spaces or characters such as ; needs quotes around it: key='a b'"
            )
    if grammar:
        return grammar
    parsed = parser.parse_overrides(overrides)
    fields, schema = schema_fields(), OmegaConf.structured(TrialConfig)
    groups = {path.name for path in CONF.iterdir() if path.is_dir() and path.name != "hydra"}
    problems = []
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra") or override.package is not None:
            continue
        if key in groups:
            problems += group_problems(override, key)
        elif key == "interventions":
            problems.append(
                "interventions: set from the overlays applied; use +intervention=NAME or "
                "+intervention=[NAME,NAME] (`python -m harness list` names them)"
            )
        elif key.startswith("plugins."):
            problems += plugin_option_problems(override, overrides)
        elif key not in fields:
            value = None if override.is_delete() else override.value()
            problems.append(unknown_key_problem(key, value, with_value=not override.is_delete()))
        elif not override.is_delete():
            if override.is_discrete_sweep():  # -m key=a,b,c: each value
                values = list(override.sweep_iterator())
            else:  # an interval is for a tuning sweeper to sample from
                values = [] if override.is_sweep_override() else [override.value()]
            for value in values:
                try:
                    OmegaConf.update(schema, key, value, merge=True)
                except OmegaConfBaseException:
                    problems.append(f"{key}={show(value)}: must be {type_text(fields[key])}")
    return problems


def plugin_option_problems(override, overrides: list[str]) -> list[str]:
    """`plugins.NAME.OPTION=VALUE` changes an option an overlay set; `+plugins.…` adds one (checked when built)."""
    if override.is_add() or override.is_force_add() or override.is_delete():
        return []
    key = override.key_or_group
    settings = {
        key: name
        for name in intervention_overlays(overrides)
        for key in overlay_settings(name)
        if key.startswith("plugins.")
    }
    if key in settings or any(k.startswith(key + ".") for k in settings):
        return []
    plugin = key.split(".")[1]
    options = sorted(k for k in settings if k.split(".")[1] == plugin)
    if options:
        guess = difflib.get_close_matches(key, options, n=1)
        return [
            f"{override.input_line}: plugin {plugin} has no such option as configured by "
            f"+intervention={settings[options[0]]}; {'did you mean ' + guess[0] + '? ' if guess else ''}"
            f"its options: {', '.join(options)}"
        ]
    return [
        f"{override.input_line}: plugin {plugin} is not enabled; enable it with its overlay "
        f"(`python -m harness list` names them), or add the option with +{override.input_line}"
    ]


def group_problems(override, group: str) -> list[str]:
    if override.is_delete() or override.is_sweep_override():
        return []
    options = group_options(group)
    value = override.value()
    problems = []
    for name in value if isinstance(value, list) else [value]:
        if name not in options:
            guess = difflib.get_close_matches(str(name), options, n=1)
            problems.append(
                f"{group}={show(name)}: no such {group} in conf/{group}/; "
                f"{'did you mean ' + guess[0] + '? ' if guess else ''}choose from {', '.join(options)}"
            )
    if group in ("intervention", "sweep") and not override.is_add():
        problems.append(
            f"{override.input_line}: add it with +{group}=… (the + is needed: no {group} is applied by default)"
        )
    return problems


def intervention_overlays(overrides: list[str]) -> list[str]:
    """The intervention overlays an override list applies, as listed (stacks not expanded)."""
    names = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.key_or_group == "intervention" and not override.is_delete():
            value = override.value()
            names += value if isinstance(value, list) else [value]
    return names


def overlay_file_problems(overrides: list[str], config_dir: str | None = None) -> list[str]:
    """An overlay the overrides apply whose YAML does not load (in conf/, or a `--config-dir` that shadows it)."""
    import yaml

    try:
        names = intervention_overlays(overrides)
    except Exception:  # a grammar error: override_problems names it
        return []
    problems = []
    for directory in ([Path(config_dir)] if config_dir else []) + [CONF]:
        for name in names:
            path = directory / "intervention" / f"{name}.yaml"
            try:
                if path.is_file():
                    yaml.safe_load(path.read_text())
            except yaml.YAMLError as error:
                why = " ".join(str(error).split())[:300]
                problems.append(f"+intervention={name}: {path} is not valid YAML ({why}); fix or remove the file")
    return problems
