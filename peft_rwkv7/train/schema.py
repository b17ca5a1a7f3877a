"""Dataclasses from plain dicts, strictly: unknown keys, missing keys and wrong types are one-line
UserErrors naming the dotted key and what is allowed. Used for recipes (YAML + key=value overrides)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from ..errors import UserError

T = typing.TypeVar("T")
_MISSING = dataclasses.MISSING


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if origin is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, source)
            except UserError as e:
                errors.append(e)
        raise UserError(f"{source}: {key} must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, source, prefix=key + ".")
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise UserError(f"{source}: {key} must be one of {_type_name(tp)}, got {value!r}")
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is Any:
        return value
    raise UserError(f"{source}: {key} must be {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict, source: str = "recipe", prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; nested dataclasses recurse. Calls `validate()` where defined."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise UserError(
            f"{source}: unknown key {prefix}{unknown[0]} (allowed under {prefix.rstrip('.') or 'the top level'}: "
            f"{', '.join(fields)})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name, source)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise UserError(f"{source}: missing key {prefix}{name} ({_type_name(hints[name])})")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for writing the resolved recipe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str], source: str = "command line") -> dict:
    """Apply `dotted.key=value` strings to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"{source}: override {item!r} must look like dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"{source}: cannot set {key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_yaml(path: str) -> dict:
    """Read a YAML mapping with one-line errors for a missing file or broken YAML."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a recipe .yaml file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise UserError(f"{path}: broken YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: a recipe must be a YAML mapping (model:, method:, data:, train:), got {type(data).__name__}"
        )
    return data
