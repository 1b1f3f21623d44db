"""Errors a user can act on. The CLI prints them without a traceback."""


class CptkitError(Exception):
    """A problem with the user's input or environment: the message says what, where, and what to do."""


class ConfigError(CptkitError):
    """One or more problems in a config file, all reported together."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")
