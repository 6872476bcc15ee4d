"""The commands' `KEY=VALUE` arguments: one splitter that every command's parser uses, so that each reads its
own settings the same way and says, in its own words, what it does not accept."""

from dataclasses import dataclass, field


@dataclass
class Arguments:
    settings: dict[str, str] = field(default_factory=dict)  # KEY=VALUE with a KEY the command knows (last wins)
    flags: set[str] = field(default_factory=set)  # --NAME the command knows
    rest: list[str] = field(default_factory=list)  # everything else, in order: overrides, paths, mistakes


def split(arguments: list[str], keys=(), flags=()) -> Arguments:
    """Sort `arguments` into the command's settings (`KEY=VALUE`, KEY in `keys`), its flags, and the rest."""
    found = Arguments()
    for argument in arguments:
        key, separator, value = argument.partition("=")
        if argument in flags:
            found.flags.add(argument)
        elif separator and key in keys:
            found.settings[key] = value
        else:
            found.rest.append(argument)
    return found


def whole_number(key: str, text: str) -> int:
    """`text` as a whole number, or a ValueError naming the key, the value and what is allowed."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{key}={text}: must be a whole number") from None
