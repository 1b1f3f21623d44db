"""`opt(default, help)`: a dataclass field that carries its own documentation."""

import dataclasses
from typing import Any


def opt(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING) -> Any:
    """A config field with a help string (shown in errors for required fields and in `cptkit config`)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
