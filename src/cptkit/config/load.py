"""Load a YAML config into typed dataclasses, with every problem reported at once.

Each problem names its YAML path (and line, where the file gives one) and what to do. Unknown keys
suggest the nearest known key. Overrides `section.key=value` (values parsed as YAML, list items as
`data.sources[1].weight=0.5`) are applied before validation, so they are checked the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from cptkit.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats: plain PyYAML takes `2e-5` (no dot) for a string,
    which would reach the optimizer as text."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


_OVERRIDE = re.compile(r"^(?P<key>[A-Za-z_][\w.\[\]-]*)=(?P<value>.*)$", re.S)
_PART = re.compile(r"([A-Za-z_][\w-]*)|\[(\d+)\]")


@dataclasses.dataclass
class YamlFile:
    """A parsed config file: its data, the 1-based line of each YAML path, and the problems found
    while reading it (a key given twice in one mapping, which plain YAML resolves to the last value)."""

    data: Any
    lines: dict[str, int]
    problems: list[str]


def parse_yaml(path: str | Path) -> YamlFile:
    """Parse a YAML file; a repeated key is a problem to report with the others, not a silent override."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"], source=str(path))
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], source=str(path)) from None
    parsed = YamlFile({}, {}, [])
    if node is None:
        return parsed
    _collect_lines(node, "", parsed)
    parsed.data = _load(text) or {}
    return parsed


def read_yaml(path: str | Path) -> tuple[Any, dict[str, int]]:
    """Parse a YAML file, returning the data and a map from YAML path to 1-based line number; a key
    given twice raises ConfigError."""
    parsed = parse_yaml(path)
    if parsed.problems:
        raise ConfigError(parsed.problems, source=str(path))
    return parsed.data, parsed.lines


def _collect_lines(node: yaml.Node, prefix: str, parsed: YamlFile) -> None:
    parsed.lines[prefix] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            line = key_node.start_mark.line + 1
            _collect_lines(value_node, key, parsed)
            if key in seen:
                parsed.problems.append(
                    f"{key} (lines {seen[key]} and {line}): given twice; keep one (YAML would silently "
                    "take the last)"
                )
            else:
                seen[key] = parsed.lines[key] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_lines(item, f"{prefix}[{i}]", parsed)


def apply_overrides(data: dict, overrides: list[str]) -> list[str]:
    """Apply `a.b[0].c=value` overrides in place; returns problems instead of raising."""
    problems = []
    for override in overrides:
        match = _OVERRIDE.match(override)
        if not match:
            problems.append(
                f"override {override!r}: expected KEY.PATH=VALUE, e.g. train.hf.learning_rate=1e-4"
            )
            continue
        parts = [(name, int(index) if index else None) for name, index in _PART.findall(match["key"])]
        try:
            value = _load(match["value"]) if match["value"] != "" else ""
        except yaml.YAMLError:
            value = match["value"]
        node: Any = data
        for i, (name, index) in enumerate(parts):
            last = i == len(parts) - 1
            if name:
                if not isinstance(node, dict):
                    problems.append(f"override {override!r}: {name} is not inside a mapping")
                    break
                if last:
                    node[name] = value
                else:
                    node = node.setdefault(name, {} if parts[i + 1][0] else [])
            else:
                if not isinstance(node, list) or index >= len(node):
                    problems.append(f"override {override!r}: index [{index}] does not exist")
                    break
                if last:
                    node[index] = value
                else:
                    node = node[index]
    return problems


class _Builder:
    """Turns plain YAML data into dataclass instances, collecting problems with their paths.

    A field whose value is wrong (type, choice, NaN) is built with its default, so the checks of
    every other field still run: one mistake never hides another. `wrong` holds the paths already
    reported; a check's finding at or under one of them is a consequence, not news, and is left out."""

    def __init__(self, lines: dict[str, int]):
        self.lines = lines
        self.problems: list[str] = []
        self.found: list[tuple[str, str]] = []  # the same problems as (path, message)
        self.wrong: set[str] = set()

    def problem(self, path: str, message: str, wrong: bool = True) -> None:
        line = self.lines.get(path)
        where = f"{path} (line {line})" if line else path
        self.problems.append(f"{where}: {message}")
        self.found.append((path, message))
        if wrong:
            self.wrong.add(path)

    def reported(self, path: str, below: bool = False) -> bool:
        """Whether `path` or a path above it (with `below`: also one under it) was reported wrong."""
        for wrong in self.wrong:
            if path == wrong or path.startswith((f"{wrong}.", f"{wrong}[")):
                return True
            if below and (not path or wrong.startswith((f"{path}.", f"{path}["))):
                return True
        return False

    def build(self, tp: Any, value: Any, path: str) -> Any:
        origin = get_origin(tp)
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp):
            return self.build_dataclass(tp, value, path)
        if origin in (Union, types.UnionType):
            options = get_args(tp)
            if value is None and type(None) in options:
                return None
            non_none = [o for o in options if o is not type(None)]
            for option in non_none:
                trial = _Builder(self.lines)
                result = trial.build(option, value, path)
                if not trial.problems:
                    return result
            if len(non_none) == 1:
                return self.build(non_none[0], value, path)
            self.problem(path, f"expected {_describe(tp)}, got {value!r}")
            return value
        if origin is Literal:
            choices = get_args(tp)
            if isinstance(value, bool) and {"on", "off"} <= set(choices):
                value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
            if value not in choices:
                hint = nearest_hint(str(value), [str(c) for c in choices])
                self.problem(path, f"{value!r} is not one of {', '.join(map(str, choices))}{hint}")
            return value
        if origin is list:
            (item_tp,) = get_args(tp) or (Any,)
            if not isinstance(value, list):
                self.problem(path, f"expected a list, got {type(value).__name__} {value!r}")
                return []
            return [self.build(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                self.problem(path, f"expected a mapping, got {type(value).__name__} {value!r}")
                return {}
            return dict(value)
        if tp is bool:
            if not isinstance(value, bool):
                self.problem(path, f"expected true or false, got {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.problem(path, f"expected an integer, got {value!r}")
            return value
        if tp is float:
            number = _number(value)
            if number is None:
                self.problem(path, f"expected a number, got {value!r}")
                return value
            if not math.isfinite(number):
                self.problem(path, f"{value!r} is not a finite number")
            return number
        if tp is str:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            if not isinstance(value, str):
                self.problem(path, f"expected a string, got {value!r}")
            return value
        return value

    def build_dataclass(self, cls: type, value: Any, path: str) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.problem(path or "(top level)", f"expected a mapping of {cls.__name__} fields, got {value!r}")
            self.wrong.add(path)
            value = {}
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in value:
            if key not in fields:
                hint = nearest_hint(str(key), list(fields))
                known = "" if hint else f" (known keys: {', '.join(fields)})"
                self.problem(_join(path, key), f"unknown key{hint}{known}", wrong=False)
        kwargs = {}
        for name, f in fields.items():
            sub = _join(path, name)
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if name in value:
                built = self.build(hints[name], value[name], sub)
                if sub not in self.wrong or required:  # else the default stands in, already reported
                    kwargs[name] = built
            elif required:
                if not self.reported(sub):  # else the section itself was not a mapping
                    self.problem(sub, f"required: {f.metadata.get('help', 'missing')}")
                kwargs[name] = None  # a stand-in, so the other fields are still checked
        try:
            obj = cls(**kwargs)
        except TypeError as e:
            self.problem(path or "(top level)", str(e))
            return None
        return obj

    def check(self, obj: Any, path: str) -> None:
        """Run each dataclass's own `check(path)` (cross-field, value and filesystem checks), depth first."""
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                self.check(getattr(obj, f.name), _join(path, f.name))
            checker = getattr(obj, "check", None)
            if not callable(checker):
                return
            try:
                found = checker(path) or []
            except (TypeError, AttributeError):
                if not self.reported(path, below=True):
                    raise
                found = []  # a required value reported above (missing or of the wrong type) broke the check
            for sub, message in found:
                if not self.reported(sub):
                    self.problem(sub, message)
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                self.check(item, f"{path}[{i}]")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def nearest_hint(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _number(value: Any) -> float | None:
    """`value` as a float where YAML gave a number (or a string that is one), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 2e-5 as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _describe(tp: Any) -> str:
    """A union as a user reads it: `true, false or auto`, `int or str`."""
    words = []
    for option in (a for a in get_args(tp) if a is not type(None)):
        if option is bool:
            words += ["true", "false"]
        elif get_origin(option) is Literal:
            words += [str(c) for c in get_args(option)]
        else:
            words.append(getattr(option, "__name__", str(option)))
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else "".join(words)


T = typing.TypeVar("T")


def build_config(
    cls: type[T],
    data: dict,
    lines: dict[str, int] | None = None,
    source: str = "config",
    problems: list[str] | None = None,
) -> T:
    """Build and check a config dataclass from plain data; raise ConfigError listing every problem
    (`problems`: those found before, e.g. while reading the file, come first)."""
    builder = _Builder(lines or {})
    obj = builder.build_dataclass(cls, data, "")
    builder.check(obj, "")
    found = [*(problems or []), *builder.problems]
    if found:
        raise ConfigError(found, source=source)
    return obj


def check_value(tp: Any, value: Any, path: str) -> list[tuple[str, str]]:
    """The type problems of one value against an annotation, as `check(path)` methods return them."""
    builder = _Builder({})
    builder.build(tp, value, path)
    return builder.found


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read `path`, apply overrides, and build `cls`; every problem is reported at once."""
    parsed = parse_yaml(path)
    data = parsed.data
    if not isinstance(data, dict):
        raise ConfigError(
            [f"expected a mapping of sections at the top level, got {type(data).__name__}"], str(path)
        )
    for written in getattr(cls, "WRITTEN_KEYS", ()):  # what cptkit recorded beside the config
        data.pop(written, None)
    problems = apply_overrides(data, overrides or [])
    if problems:
        raise ConfigError([*parsed.problems, *problems], source=str(path))
    return build_config(cls, data, parsed.lines, source=str(path), problems=parsed.problems)


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain YAML-ready data."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)
