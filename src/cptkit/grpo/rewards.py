"""Reward functions built from the `grpo.rewards` config, with TRL's reward signature.

Each function is called as TRL calls reward functions,
`fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]`, where `columns`
holds the prompt records' other fields, one value per completion (e.g. `answer`). Every problem a config
can have (a bad regex, a function that cannot be found) is refused when the rewards are built, with the
YAML path of the setting, so nothing fails after a model has loaded.

None means "not applicable" (TRL averages rewards NaN-aware): a reward that compares with a reference
gives None for a completion whose record has no reference (the field is null), and `numeric` gives None
when the reference is not a number. A batch with no such field at all is a CptkitError naming the reward:
the prompt file is missing the column the reward reads.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptkit.config.grpo import RewardConfig
from cptkit.errors import CptkitError

Rewards = list[float | None]
ANSWER = "{answer}"
# A number as people write it: optional sign, thousands commas (1,234,567), decimals, an exponent.
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")


@dataclass
class ScoredCompletions:
    """Rewards of a batch of completions: `total` is the weighted sum (None counted as 0);
    `per_function` keeps each function's rewards by name, None written as float('nan')."""

    total: list[float]
    per_function: dict[str, list[float]]


class RewardFunction:
    """A reward callable with TRL's signature; `__name__` is its unique log name (rewards/NAME/mean).

    It pickles as its config and is rebuilt when unpickled (a user function is imported again), so it can
    cross to worker processes."""

    def __init__(self, name: str, config: RewardConfig, where: str):
        self.__name__ = name
        self.config = config
        self.where = where  # the YAML path, e.g. grpo.rewards[2]
        builder = _BUILDERS.get(config.type)
        if builder is None:
            raise CptkitError(f"{where}.type: {config.type!r} is not a reward type ({', '.join(_BUILDERS)})")
        self._score, self.default_name = builder(config, where)

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **columns):
        return self._score(prompts, completions, completion_ids, columns)

    def __reduce__(self):
        return (RewardFunction, (self.__name__, self.config, self.where))

    def __repr__(self) -> str:
        return f"RewardFunction({self.__name__!r}, type={self.config.type!r})"


def completion_text(completion: Any) -> str:
    """The text of a completion: a string as is, a chat list ([{"role": "assistant", "content": ...}])
    as its assistant turns' contents joined (all turns' when none is marked assistant)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list):
        turns = [t for t in completion if isinstance(t, dict)]
        chosen = [t for t in turns if t.get("role") == "assistant"] or turns
        return "".join(_content_text(t.get("content")) for t in chosen)
    return "" if completion is None else str(completion)


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def parse_number(text: Any) -> float | None:
    """A number from a reference or an extracted answer: int/float as is, else the last number written in
    the text (commas as thousands separators accepted); None when there is none."""
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, numbers.Real):
        return float(text)
    found = NUMBER.findall(str(text))
    return float(found[-1].replace(",", "")) if found else None


def build_rewards(configs: list[RewardConfig], where: str = "grpo.rewards") -> list[RewardFunction]:
    """One RewardFunction per config, named `name`, else the type (function: the function's __name__);
    repeated names get _2, _3, ... Every problem is refused here with its YAML path."""
    functions, taken = [], set()
    for i, cfg in enumerate(configs):
        function = RewardFunction("", cfg, f"{where}[{i}]")
        function.__name__ = _unique(cfg.name or function.default_name, taken)
        functions.append(function)
    return functions


def reward_weights(configs: list[RewardConfig]) -> list[float]:
    """The weights of the rewards, in order (TRL's reward_weights)."""
    return [float(cfg.weight) for cfg in configs]


def score_completions(
    functions: list[RewardFunction],
    weights: list[float],
    prompts: list,
    completions: list,
    columns: dict[str, list],
) -> ScoredCompletions:
    """Every function's rewards for the completions and their weighted total. A None reward counts as 0
    in the total (a reward that does not apply adds nothing) and is float('nan') in `per_function`, so a
    NaN-aware mean skips it as TRL's logs do."""
    if len(functions) != len(weights):
        raise ValueError(f"{len(functions)} reward functions but {len(weights)} weights")
    total = [0.0] * len(completions)
    per_function = {}
    for fn, weight in zip(functions, weights, strict=True):
        rewards = fn(prompts=prompts, completions=completions, completion_ids=None, **columns)
        per_function[fn.__name__] = [math.nan if r is None else float(r) for r in rewards]
        for k, r in enumerate(rewards):
            if r is not None and not math.isnan(r):
                total[k] += weight * float(r)
    return ScoredCompletions(total, per_function)


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


def _compile(pattern: str, flags: int, setting: str) -> re.Pattern:
    try:
        return re.compile(pattern, flags)
    except re.error as e:
        raise CptkitError(f"{setting}: {pattern!r} is not a valid regular expression: {e}") from None


def _references(cfg: RewardConfig, path: str, columns: dict, count: int) -> list:
    """The reference of each completion (None where the record has none); the column must exist."""
    if cfg.answer_field not in columns:
        known = ", ".join(sorted(k for k in columns if k not in _TRL_EXTRAS)) or "none"
        raise CptkitError(
            f"{path}.answer_field: the prompt records have no {cfg.answer_field!r} field, which this "
            f"{cfg.type} reward compares with (their fields: {known}); add it to the records or set "
            "answer_field"
        )
    refs = list(columns[cfg.answer_field])
    if len(refs) != count:
        raise CptkitError(f"{path}: {len(refs)} references for {count} completions")
    return refs


def _against_references(cfg: RewardConfig, path: str, completions, columns: dict, judge) -> Rewards:
    """`judge(completion text, reference) -> float | None` for each completion; None where the record
    has no reference."""
    refs = _references(cfg, path, columns, len(completions))
    return [
        None if ref is None else judge(completion_text(completion), ref)
        for completion, ref in zip(completions, refs, strict=True)
    ]


_TRL_EXTRAS = ("trainer_state", "log_extra", "log_metric", "environments")


def _build_exact(cfg: RewardConfig, path: str):
    extract = _compile(cfg.extract, re.DOTALL, f"{path}.extract") if cfg.extract else None

    def norm(text: str) -> str:
        text = text.strip()
        return text if cfg.case_sensitive else text.casefold()

    def judge(text: str, ref) -> float:
        answer = _extracted(extract, text)
        return float(answer is not None and norm(answer) == norm(str(ref)))

    def score(prompts, completions, completion_ids, columns) -> Rewards:
        return _against_references(cfg, path, completions, columns, judge)

    return score, "exact"


def _extracted(extract: re.Pattern | None, text: str) -> str | None:
    """`extract`'s first group (the whole match when it has no group), or the text when there is no
    extract; None when the pattern is not found."""
    if extract is None:
        return text
    match = extract.search(text)
    if match is None:
        return None
    return match.group(1) if extract.groups else match.group(0)


def _needs_pattern(cfg: RewardConfig, path: str) -> str:
    if not cfg.pattern:
        raise CptkitError(f"{path}.pattern: type {cfg.type} needs a pattern (Python re syntax)")
    return cfg.pattern


def _build_regex(cfg: RewardConfig, path: str):
    _needs_pattern(cfg, path)
    flags = 0 if cfg.case_sensitive else re.IGNORECASE
    uses_answer = ANSWER in cfg.pattern
    # Checked with a stand-in reference now; the real one is escaped, so it cannot break the pattern.
    fixed = _compile(cfg.pattern.replace(ANSWER, "x"), flags, f"{path}.pattern")

    def judge(text: str, ref) -> float:
        pattern = re.compile(cfg.pattern.replace(ANSWER, re.escape(str(ref).strip())), flags)
        return float(pattern.search(text) is not None)

    def score(prompts, completions, completion_ids, columns) -> Rewards:
        if not uses_answer:
            return [float(fixed.search(completion_text(c)) is not None) for c in completions]
        return _against_references(cfg, path, completions, columns, judge)

    return score, "regex"


def _build_numeric(cfg: RewardConfig, path: str):
    extract = _compile(cfg.extract, re.DOTALL, f"{path}.extract") if cfg.extract else None

    def judge(text: str, ref) -> float | None:
        target = parse_number(ref)
        if target is None:  # a reference that is not a number: not applicable
            return None
        found = _extracted(extract, text)
        value = parse_number(found) if found is not None else None
        allowed = max(cfg.tolerance, cfg.relative_tolerance * abs(target))
        return float(value is not None and abs(value - target) <= allowed)

    def score(prompts, completions, completion_ids, columns) -> Rewards:
        return _against_references(cfg, path, completions, columns, judge)

    return score, "numeric"


def _build_format(cfg: RewardConfig, path: str):
    pattern = _compile(_needs_pattern(cfg, path), re.DOTALL, f"{path}.pattern")

    def score(prompts, completions, completion_ids, columns) -> Rewards:
        # Surrounding whitespace (a trailing newline before the end of text) does not break the format.
        return [float(pattern.fullmatch(completion_text(c).strip()) is not None) for c in completions]

    return score, "format"


def length_reward(chars: int, min_chars: int, max_chars: int) -> float:
    """1 inside [min_chars, max_chars], linear to 0 at 0 characters and at 2 * max_chars."""
    if min_chars <= chars <= max_chars:
        return 1.0
    if chars < min_chars:
        return chars / min_chars
    if max_chars == 0:
        return 0.0
    return max(0.0, (2 * max_chars - chars) / max_chars)


def _build_length(cfg: RewardConfig, path: str):
    def score(prompts, completions, completion_ids, columns) -> Rewards:
        return [length_reward(len(completion_text(c)), cfg.min_chars, cfg.max_chars) for c in completions]

    return score, "length"


def load_function(spec: str, setting: str) -> Callable:
    """`module:function` (imported) or `path/to/file.py:function` (a relative path is read from the
    working directory); every way it cannot be found is a CptkitError naming `setting`."""
    source, sep, attr = spec.rpartition(":")
    if not sep or not source or not attr:
        raise CptkitError(
            f"{setting}: {spec!r} is not module:function or path/to/file.py:function "
            "(e.g. mypkg.rewards:score)"
        )
    if source.endswith(".py") or "/" in source or "\\" in source:
        module = _module_from_file(Path(source), setting)
    else:
        module = _module_from_name(source, setting)
    if not hasattr(module, attr):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise CptkitError(
            f"{setting}: {source} has no {attr!r} (its functions: {', '.join(found) or 'none'})"
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise CptkitError(f"{setting}: {source}:{attr} is a {type(fn).__name__}, not a function")
    return fn


def _module_from_name(name: str, setting: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = e.name or name
        if name == missing or name.startswith(f"{missing}."):
            raise CptkitError(
                f"{setting}: module {name!r} not found (is it installed, or on PYTHONPATH? a file is "
                "given as path/to/file.py:function)"
            ) from None
        raise CptkitError(f"{setting}: module {name!r} needs {missing!r}, which is not installed") from None
    except Exception as e:  # the user's module failed while importing
        raise CptkitError(f"{setting}: importing {name!r} failed: {type(e).__name__}: {e}") from None


def _module_from_file(path: Path, setting: str):
    path = path if path.is_absolute() else Path.cwd() / path
    if not path.is_file():
        raise CptkitError(f"{setting}: {path} does not exist (a relative path is read from {Path.cwd()})")
    name = f"cptkit_user_reward_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CptkitError(f"{setting}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so the function pickles and dataclasses in the file work
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise CptkitError(f"{setting}: importing {path} failed: {type(e).__name__}: {e}") from None
    return module


def _build_function(cfg: RewardConfig, path: str):
    setting = f"{path}.function"
    if not cfg.function:
        raise CptkitError(
            f"{setting}: type function needs function: module:function or path/to/file.py:function"
        )
    fn = load_function(cfg.function, setting)

    def score(prompts, completions, completion_ids, columns) -> Rewards:
        result = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if inspect.isawaitable(result):
            result = asyncio.run(result)
        return _checked(result, len(completions), f"{setting}: {cfg.function}")

    return score, getattr(fn, "__name__", type(fn).__name__)


def _checked(result: Any, count: int, who: str) -> Rewards:
    """A user function's rewards as floats/None, or a CptkitError naming it."""
    try:
        values = list(result)
    except TypeError:
        raise CptkitError(
            f"{who} returned a {type(result).__name__}; expected a list of {count} numbers "
            "(None: not applicable)"
        ) from None
    if len(values) != count:
        raise CptkitError(f"{who} returned {len(values)} values for {count} completions (one per completion)")
    rewards: Rewards = []
    for k, value in enumerate(values):
        if value is None:
            rewards.append(None)
        elif isinstance(value, numbers.Real):
            rewards.append(float(value))
        else:
            raise CptkitError(
                f"{who} returned {value!r} ({type(value).__name__}) for completion {k}; "
                "expected a number or None"
            )
    return rewards


_BUILDERS = {
    "exact": _build_exact,
    "regex": _build_regex,
    "numeric": _build_numeric,
    "format": _build_format,
    "length": _build_length,
    "function": _build_function,
}
