"""Errors a user can act on. The CLI prints them without a traceback."""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager


class CptkitError(Exception):
    """A problem with the user's input or environment: the message says what, where, and what to do."""


class ConfigError(CptkitError):
    """One or more problems in a config file, all reported together."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class Refused(CptkitError):
    """cptkit will not load something because loading it could run code: a model or tokenizer that needs
    its own code (without trust_remote_code), a weights file holding pickled objects."""


def is_pickle_refusal(e: BaseException) -> bool:
    """True for torch.load(weights_only=True) refusing a file that holds more than tensors and plain data."""
    return isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e)


def pickle_refusal(what: str, e: BaseException, advice: str) -> Refused:
    """The message for a file torch.load(weights_only=True) refused: what it holds, and `advice`."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    held = f"a pickled {found.group(1)}" if found else "pickled Python objects beyond tensors"
    return Refused(
        f"{what}: holds {held}, which could run code when loaded, so cptkit refuses it "
        f"(torch.load with weights_only=True); {advice}"
    )


_CONVERT = (
    "if you trust its source, convert it to safetensors (torch.load(..., weights_only=False), then "
    "save_pretrained(..., safe_serialization=True) or safetensors.torch.save_file) and use the converted copy"
)


@contextmanager
def load_refusals(what: str, trust_setting: str | None) -> Iterator[None]:
    """Turn the ways loading a model, tokenizer or adapter refuses or fails into one CptkitError line each,
    naming `what` ("model.name_or_path: /models/x") and what to do:
    - custom code needed (transformers' ValueError asking for `trust_remote_code`): set `trust_setting`;
    - custom code allowed but its module missing (OSError) or needing a package (ImportError);
    - a pickled weights file refused by torch.load(weights_only=True): convert it to safetensors."""
    try:
        yield
    except pickle.UnpicklingError as e:
        if not is_pickle_refusal(e):
            raise
        raise pickle_refusal(what, e, _CONVERT) from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        fix = (
            f"set {trust_setting}: true if you trust that code"
            if trust_setting
            else "cptkit does not run a model's own code here"
        )
        raise Refused(f"{what}: needs its own Python code to load (custom code); {fix}") from None
    except ImportError as e:  # custom code importing a package that is not installed
        raise CptkitError(f"{what}: its code needs a package that is not installed: {e}") from None
    except OSError as e:  # a missing file (weights, the custom code's module), an unreadable folder
        raise CptkitError(f"{what}: cannot be loaded: {e}") from None
