"""Typed, validated configs: YAML files and `key=value` overrides checked against dataclasses.

A config is a plain dataclass whose fields carry type hints (and, through `param`, ranges).
`load_config(Cls, "file.yaml", ["a.b=3"])` returns an instance or raises `ConfigError`, a
one-line message that names the file (or the command line) and the dotted key:

    configs/toy/samplers2d.yaml: sampling.stpes: unknown key (did you mean 'steps'?)
    command line: sampling.steps: expected an int >= 1, got 0

Supported field types: bool, int, float, str, Literal[...], X | None, list[X], tuple[X, ...],
fixed tuples, dict[str, X] and nested config dataclasses. A dataclass's `__post_init__` may
raise ValueError for checks across fields; the message is reported against its section.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .files import write_text_atomic

T = TypeVar("T")

__all__ = ["ConfigError", "param", "from_dict", "to_dict", "load_config", "save_config", "parse_overrides",
           "read_yaml"]


class ConfigError(ValueError):
    """A bad config: one line that names the source (file or command line) and the key."""


def param(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
          ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with an allowed numeric range (checked on load)."""
    bounds = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"bounds": bounds})


# ---------------------------------------------------------------------------------------------
# Validation


class _Invalid(Exception):
    """Raised inside conversion with the key path and the reason; turned into ConfigError."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key, self.reason = key, reason


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b,
             "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} items"
        return f"a list ({_describe(args[0])} each)" if args else "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an int", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Invalid(key, f"expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:  # an optional section: its own errors, not "expected .."
            return _convert(value, sections[0], key)
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except _Invalid:
                pass
        raise _Invalid(key, f"expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Invalid(key, f"expected {_describe(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Invalid(key, f"expected {_describe(tp)}, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Invalid(key, f"expected {_describe(tp)}, got {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        items = [_convert(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _Invalid(key, f"expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): (v if vt is Any else _convert(v, vt, f"{key}.{k}")) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and not math.isnan(number):  # NaN passes every range check: no setting means it
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {key}: unsupported type {tp!r}")
    raise _Invalid(key, f"expected {_describe(tp)}, got {value!r}")


def _check_bounds(value: Any, bounds: dict, key: str) -> None:
    """Range check of a number, or of each number in a list (reported by its index)."""
    if value is None or not bounds:
        return
    items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
    for i, v in items:
        for name, bound in bounds.items():
            if not _BOUND_OK[name](v, bound):
                limits = " and ".join(f"{_BOUND_TEXT[n]} {b}" for n, b in bounds.items())
                what = "an int" if isinstance(v, int) else "a number"
                raise _Invalid(key if i is None else f"{key}[{i}]", f"expected {what} {limits}, got {v!r}")


def _build(cls: type[T], data: dict, prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise _Invalid(key, "unknown key" + hint)
        f = fields[name]
        converted = _convert(value, hints[name], key)
        _check_bounds(converted, f.metadata.get("bounds", {}), key)
        kwargs[name] = converted
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Invalid(f"{prefix}.{name}" if prefix else name, "missing required key")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise _Invalid(prefix, str(e)) from None


def from_dict(cls: type[T], data: dict | None, source: str = "config",
              sources: dict[str, str] | None = None) -> T:
    """Build and validate `cls` from a mapping; errors name `source` (or, per dotted key, `sources`)."""
    try:
        return _build(cls, data or {}, "")
    except _Invalid as e:
        origin = source
        for key, where in (sources or {}).items():
            if e.key == key or e.key.startswith((key + ".", key + "[")):
                origin = where
        where = f"{origin}: {e.key}" if e.key else origin
        raise ConfigError(f"{where}: {e.reason}") from None


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-ready data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


# ---------------------------------------------------------------------------------------------
# Files and overrides


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["a.b=3", "c=[1, 2]"]` -> `{"a.b": 3, "c": [1, 2]}`; values are parsed as YAML."""
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"command line: {item!r}: expected key=value, e.g. sampling.steps=50")
        try:
            parsed[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            parsed[key] = raw
    return parsed


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"command line: {'.'.join(parts[:i + 1])}: is a value, not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping from a file, with one-line errors for a missing, unreadable or bad file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: {problem}{where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read `path` (optional: defaults only), apply dotted `key=value` overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    parsed = parse_overrides(overrides)
    for key, value in parsed.items():
        _set_dotted(data, key, value)
    return from_dict(cls, data, source=str(path) if path is not None else "defaults",
                     sources={key: "command line" for key in parsed})


def config_differences(before: Any, now: Any) -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ between two configs (dataclasses or their dicts),
    sorted: key -> (before, now); a key present in one only has None on the other side."""
    flat_before, flat_now = (_flat(c if isinstance(c, dict) else to_dict(c)) for c in (before, now))
    return {key: (flat_before.get(key), flat_now.get(key)) for key in sorted(flat_before.keys() | flat_now.keys())
            if flat_before.get(key) != flat_now.get(key)}


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the effective config as YAML, atomically (a reader never sees half a file)."""
    return write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None))
