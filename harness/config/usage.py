"""`python -m harness --help`: the commands, the config groups and every key with what it allows, from the schema."""

import dataclasses

from harness.config.overrides import group_options, type_text
from harness.config.schema import TrialConfig
from harness.paths import CONF

COMMANDS = """\
trial usage:
  python -m harness [KEY=VALUE ...]               run one trial (the baseline, scale=smoke on the bundled corpus)
  python -m harness +intervention=NAME [...]      ... with an intervention; +intervention=[A,B] stacks several
  python -m harness +sweep=STUDY [...]            run a study from conf/sweep/ (an MLflow parent run, a child per trial)
  python -m harness -m KEY=V1,V2 [...]            a Hydra multirun: one trial per value
  python -m harness resume=outputs/DATE/TIME      continue a trial from its latest checkpoint
  python -m harness list                          the interventions: what each sets, the seeds' result
  python -m harness plan [+sweep=STUDY] [...]     what it will cost, before anything runs: tokens, FLOPs, GPU-hours,
                                                  checkpoint disk, money (plan --help: gpu=, tokens_per_sec=, ...)
  python -m harness --cfg job [KEY=VALUE ...]     print the composed config instead of running it
  python -m harness --hydra-help                  Hydra's own flags

  Bad input is refused before anything runs, with one line per problem (exit status 2);
  HYDRA_FULL_ERROR=1 shows the traceback instead.
  The other commands are listed above; each takes --help.
"""


def usage() -> str:
    groups = [
        f"  {name:<14} {', '.join(group_options(name))}" for name in ("scale", "model", "data", "optim", "trainer")
    ]
    groups += [f"  +{name:<13} {', '.join(group_options(name))}" for name in ("intervention", "sweep")]
    keys = [f"  {key:<32} {allowed}" for key, allowed in key_descriptions(TrialConfig).items()]
    return "\n".join(
        [
            COMMANDS,
            f"config groups (GROUP=OPTION, from {CONF}):",
            *groups,
            "",
            "config keys (KEY=VALUE) and what each allows; `--cfg job` shows the values the composition gives:",
            *keys,
        ]
    )


def key_descriptions(schema: type, prefix: str = "") -> dict[str, str]:
    described = {}
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.type):
            described.update(key_descriptions(f.type, f"{prefix}{f.name}."))
        elif f.name != "interventions":  # derived from the +intervention overlays
            rule = schema.allowed.get(f.name)
            described[f"{prefix}{f.name}"] = rule.text if rule else type_text(f.type)
    return described
