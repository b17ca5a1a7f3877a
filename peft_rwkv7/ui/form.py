"""The Train tab's form, generated from the recipe schema: one field per recipe key, so a new key shows up
without UI code. A form is a recipe file plus `key=value` overrides: the values that differ from the file's
become the overrides, checked by the CLI's own `load_recipe` and shown as the exact `rwkv-peft train` command.

Pure Python (no gradio): field specs, values <-> overrides, error -> field.
"""

from __future__ import annotations

import json
import math
import shlex
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from ..config_base import _model_in, _strip, allowed
from ..errors import UserError
from ..train.recipe import Recipe, dump_recipe, load_recipe, recipe_data

# text keys that the recipe takes empty but no run can use: out_dir "" trains into the working directory
REQUIRED_TEXT = {"out_dir": "the run directory, e.g. runs/my_run"}


@dataclass(frozen=True)
class FieldSpec:
    key: str  # dotted recipe key
    widget: str  # choice | bool | int | float | str (text as typed) | text (a YAML value typed as text)
    help: str
    allowed: str  # "a positive integer", "one of a, b", ...
    choices: tuple[str, ...] = ()
    nullable: bool = False

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0] if "." in self.key else "run"


def _widget(tp: Any) -> tuple[str, tuple[str, ...], bool]:
    inner, nullable = _strip(tp)
    if typing.get_origin(inner) is Literal:
        return "choice", tuple(str(a) for a in typing.get_args(inner)), nullable
    if inner is bool and not nullable:
        return "bool", (), False
    if inner is int and not nullable:
        return "int", (), False
    if inner is float and not nullable:
        return "float", (), False
    if inner is str:
        return "str", (), nullable
    return "text", (), nullable


def fields(model: type[BaseModel] = Recipe, prefix: str = "") -> list[FieldSpec]:
    """Every leaf key of the recipe schema in declaration order. A section that may be null (model.new) is one
    text field holding its YAML mapping; other sections are expanded into their keys."""
    out = []
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        sub = _model_in(info.annotation)
        if sub is not None and not _strip(info.annotation)[1]:
            out += fields(sub, key)
            continue
        widget, choices, nullable = _widget(info.annotation) if sub is None else ("text", (), True)
        out.append(FieldSpec(key, widget, info.description or "", allowed(info), choices, nullable))
    return out


def flatten(data: dict, prefix: str = "", keys: set[str] | None = None) -> dict[str, Any]:
    """{dotted key: value} of a nested recipe dict, stopping at the form's keys (a null-able section stays whole)."""
    keys = keys if keys is not None else {f.key for f in fields()}
    out = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and key not in keys:
            out.update(flatten(v, key, keys))
        else:
            out[key] = v
    return out


def recipe_values(path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The effective value of every form key for `path` with `overrides` (defaults filled in), as the run
    would see them; a bad recipe is the CLI's one-line UserError."""
    recipe = load_recipe(path, overrides or [])  # a file that is not UTF-8: one line (train/schema.load_yaml)
    return flatten(yaml.safe_load(dump_recipe(recipe)))


def shown(spec: FieldSpec, value: Any) -> Any:
    """A recipe value as its widget shows it."""
    if spec.widget == "str":
        return "" if value is None else str(value)
    return to_text(value) if spec.widget == "text" else value


def to_text(value: Any) -> str:
    """A value as typed into a text field, and as the right side of key=value: YAML that reads back as it."""
    if value is None:
        return "null"
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same and value.strip() == value and value != "" else json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False)


def parse(spec: FieldSpec, raw: Any) -> Any:
    """A widget's value as the recipe value it means; UserError naming the key where text is not YAML."""
    if spec.widget in ("bool", "int", "float"):
        if raw is None:
            raise UserError(f"{spec.key}: expected {spec.allowed}, got nothing")
        if spec.widget == "bool":
            return raw
        try:
            number = float(raw)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):  # NaN, inf, text: no number a recipe takes
            raise UserError(f"{spec.key}: expected {spec.allowed}, got {raw}")
        if spec.widget == "int" and number == int(number):
            return int(number)
        return raw
    if spec.widget == "choice":
        if raw is None:
            return None
        try:
            value = yaml.safe_load(str(raw))
        except yaml.YAMLError:
            return raw
        return raw if isinstance(value, bool) else value  # "off" stays the word; "0" becomes 0
    text = "" if raw is None else str(raw)
    if text.strip() == "" and spec.nullable:
        return None
    if spec.widget == "str":
        if spec.key in REQUIRED_TEXT and not text.strip():
            raise UserError(f"{spec.key}: expected {REQUIRED_TEXT[spec.key]}, got nothing")
        return text
    try:
        return yaml.safe_load(text) if text.strip() != "" else ""
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at column {mark.column + 1}" if mark else ""
        raise UserError(f"{spec.key}: not a YAML value{where}: {text!r}") from None


def overrides(specs: list[FieldSpec], raw: list[Any], base: dict[str, Any]) -> list[str]:
    """`key=value` for every field whose value differs from the recipe file's (`base`, from recipe_values)."""
    out = []
    for spec, r in zip(specs, raw, strict=True):
        value = parse(spec, r)
        if value != base.get(spec.key):
            out.append(f"{spec.key}={to_text(value)}")
    return out


def command(recipe: str, extra: list[str], resume: bool = False) -> str:
    return shlex.join(["rwkv-peft", "train", recipe, *extra, *(["--resume"] if resume else [])])


def field_of(message: str, specs: list[FieldSpec]) -> str | None:
    """The form key a one-line recipe error names (the longest key in it), or None."""
    named = [s.key for s in specs if s.key in message]
    return max(named, key=len) if named else None


def check(recipe: str, specs: list[FieldSpec], raw: list[Any]) -> tuple[list[str], str | None, str | None]:
    """(overrides, error line or None, the key it names or None) for the form's values."""
    try:
        base = recipe_values(recipe)
        extra = overrides(specs, raw, base)
        load_recipe(recipe, extra)
    except UserError as e:
        return [], str(e), field_of(str(e), specs)
    return extra, None, None


def to_yaml(recipe: str, extra: list[str]) -> str:
    """The recipe file with the overrides applied, as YAML (the same keys the file has, plus the changed ones)."""
    load_recipe(recipe, extra)  # refuse to save what would not train
    data = recipe_data(recipe, list(extra))
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
