"""The validation framework of the config: what a field allows (`Allowed` and its builders), the `Checked`
dataclass that checks its fields when built, and `ConfigError`, which lists every problem at once, one line each:
the key, its value and what is allowed. It imports neither Hydra nor OmegaConf.
"""

import contextlib
import contextvars
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar


class ConfigError(ValueError):
    """Bad input, found before anything ran: one line per problem, each naming the key, its value and what
    is allowed. Not a Hydra exception: where Hydra runs the code, `harness.trial.preflight.refuse` prints the
    lines without a traceback and exits 2 (a study wraps them in its own CompactHydraException).

    `trial` is the trial config as built despite its problems, when it could be built at all: what the
    machine must offer can still be checked on it, so that every problem is reported at once.
    """

    def __init__(self, problems: list[str], trial: Any = None):
        self.problems, self.trial = list(problems), trial
        super().__init__("\n".join(self.problems))


def show(value: Any) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    return repr(value) if isinstance(value, float) else str(value)


# --- what a field allows ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Allowed:
    test: Callable[[Any], bool]
    text: str  # completes "must be …"

    def allows(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except TypeError:  # a value of the wrong type, in a dataclass built by hand
            return False


def at_least(low: int, note: str = "") -> Allowed:
    return Allowed(lambda v: v >= low, f"a whole number ≥ {low}{note}")


def positive(note: str = "") -> Allowed:
    return Allowed(lambda v: math.isfinite(v) and v > 0, f"a finite number > 0{note}")


def interval(
    low: float, high: float, low_open: bool = False, high_open: bool = False, kind: str = "a number"
) -> Allowed:
    def test(v):
        return math.isfinite(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)

    return Allowed(test, f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def one_of(*options: str) -> Allowed:
    return Allowed(lambda v: v in options, f"one of {', '.join(options)}")


def optional(rule: Allowed, meaning: str) -> Allowed:
    return Allowed(lambda v: v is None or rule.test(v), f"{rule.text}, or null ({meaning})")


def text(pattern: str = r".+", what: str = "non-empty text") -> Allowed:
    return Allowed(lambda v: isinstance(v, str) and re.fullmatch(pattern, v, re.DOTALL) is not None, what)


_collected: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("collected", default=None)


class Checked:
    """A config dataclass whose fields are checked when it is built: `section.key=value: must be …`.

    `allowed` maps a field to its range; `relations()` adds problems between fields. Inside
    `to_trial_config` the problems of every section are collected and reported together.
    """

    section: ClassVar[str]
    allowed: ClassVar[dict[str, Allowed]] = {}

    def problems(self) -> list[str]:
        found = [
            f"{self.key(name)}={show(getattr(self, name))}: must be {rule.text}"
            for name, rule in self.allowed.items()
            if not rule.allows(getattr(self, name))
        ]
        return found + self.relations()

    def relations(self) -> list[str]:
        return []

    def key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    def __post_init__(self):
        problems, collected = self.problems(), _collected.get()
        if collected is not None:
            collected.extend(problems)
        elif problems:
            raise ConfigError(problems)


@contextlib.contextmanager
def collecting_problems() -> Iterator[list[str]]:
    """Inside the block, `Checked` dataclasses add their problems to the yielded list instead of raising."""
    problems: list[str] = []
    token = _collected.set(problems)
    try:
        yield problems
    finally:
        _collected.reset(token)
