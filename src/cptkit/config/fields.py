"""`opt(default, help)`: a dataclass field that carries its own documentation; `at_least`: the lower
bounds of a section's counts, as its `check(path)` reports them."""

import dataclasses
from typing import Any


def opt(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING) -> Any:
    """A config field with a help string (shown in errors for required fields and in `cptkit config`)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def at_least(section: Any, path: str, **bounds: int) -> list[tuple[str, str]]:
    """A problem for each named field of `section` below its bound (None, where allowed, passes)."""
    problems = []
    for name, bound in bounds.items():
        value = getattr(section, name)
        if value is not None and value < bound:
            problems.append((f"{path}.{name}", f"{value} is too small (at least {bound})"))
    return problems
