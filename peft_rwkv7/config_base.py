"""The base of every config model (recipe sections, `MethodConfig`, `DataConfig`): a strict pydantic
model whose validation errors become one-line UserErrors naming the dotted key and what it allows.

Strict: an integer is not a string, `"yes"` is not a boolean, a number is finite (`.inf` and `.nan` are
refused; `NumberOrInf` where infinity means "no limit"). Two YAML habits are kept: a number field takes a
numeric string (YAML 1.1 reads `1e-4`, without a dot, as a string), and a `Text` field (a label such as
`log.project: 7`) takes a number as its text. Other string fields (`str`: paths, templates) refuse a number
with a hint to quote it: YAML reads `0755` as 493 and `1.50` as 1.5, not as what was written. On the
command line a string key takes the text as typed (train/recipe.py `recipe_data`).
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

import annotated_types as at
from pydantic import AllowInfNan, BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError
from typing_extensions import Self

from .errors import UserError


def _yaml_float(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


def _number_as_str(v: Any) -> Any:
    return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


Number = Annotated[float, AllowInfNan(False), BeforeValidator(_yaml_float)]  # finite
NumberOrInf = Annotated[float, BeforeValidator(_yaml_float)]  # .inf allowed (bounds still refuse .nan)
Text = Annotated[str, BeforeValidator(_number_as_str)]  # a label: a YAML number is taken as its text


def invalid(text: str, field: str | None = None) -> PydanticCustomError:
    """The error a validator raises. `text` is the whole message, `{key}` standing for the dotted key
    of the value checked (of `field`, dotted, below it when a model validator names one)."""
    return PydanticCustomError("config", "{text}", {"text": text, "field": field})


class Wording(NamedTuple):
    """How a section words type, bound and choice errors: {key}, {value} (repr), {type} (the type alone),
    {allowed} (type and bounds: "a positive integer"), {choices} ("a, b, c")."""

    type: str
    bounds: str
    choice: str


RECIPE_WORDING = Wording(
    "{key} must be {type}, got {value}", "{key} must be {allowed}, got {value}",
    "{key} must be one of {choices}, got {value}",
)
_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}
# after a string field's type error for a number (YAML's reading of a bare 5, 1.50 or 0755)
QUOTE_HINT = " (YAML read a number there: quote it if it is meant as text)"


class ConfigModel(BaseModel):
    """Strict, no unknown keys. Assignments are not checked (a config may be filled in field by field);
    `validate()` checks the whole model again."""

    model_config = ConfigDict(extra="forbid", strict=True)
    section: ClassVar[str] = ""  # the dotted key errors name when the model is built on its own
    wording: ClassVar[Wording] = RECIPE_WORDING

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise user_error(e, type(self), self.section) from None

    @field_validator("*", mode="after")
    @classmethod
    def _int64(cls, v: Any) -> Any:
        """Every integer field fits torch's int64: 2**70 is refused here, not as an overflow deep in a run."""
        if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
            raise invalid(f"{{key}} is {v}, beyond the 64-bit integers (at most 2**63-1)")
        return v

    # Validation of nested models and model_validate() bypass this __init__ (as they do BaseModel's),
    # so an error inside a recipe keeps its full dotted key and file name.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def validate(self, where: str | None = None) -> Self:  # type: ignore[override]
        """Check every field again (after assignments); UserError on the first bad one. Returns self."""
        try:
            checked = type(self).model_validate(dict(self))
        except ValidationError as e:
            raise user_error(e, type(self), self.section if where is None else where) from None
        self.__dict__.update(checked.__dict__)
        return self


def user_error(exc: ValidationError, model: type[BaseModel], prefix: str = "", source: str | None = None) -> UserError:
    """The first error of `exc` (an unknown key first) as a one-line UserError "{source}: {key} ...",
    keys dotted below `prefix`."""
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    message = _message(err, model, prefix)
    return UserError(f"{source}: {message}" if source else message)


def _message(err: ErrorDetails, model: type[BaseModel], prefix: str) -> str:
    loc, kind, value = list(err["loc"]), err["type"], err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "config":
        loc += ctx["field"].split(".") if ctx.get("field") else []
        return ctx["text"].replace("{key}", _dotted(prefix, loc))
    key = _dotted(prefix, loc)
    owner, info = _locate(model, loc)
    if kind == "extra_forbidden":
        parent = _dotted(prefix, loc[:-1]) or "the top level"
        return f"unknown key {key} (allowed under {parent}: {', '.join(owner.model_fields)})"
    if info is None:
        return f"{key}: {err['msg']}"
    if kind == "missing":
        return f"missing key {key} ({type_name(info.annotation)})"
    wording: Wording = getattr(owner, "wording", RECIPE_WORDING)
    tp = _strip(info.annotation)[0]
    if loc and isinstance(loc[-1], int) and typing.get_origin(tp) is list:
        # an item of a list: its own type ("train.grpo.stop[0] must be a string")
        return wording.type.format(key=key, value=repr(value), type=type_name(typing.get_args(tp)[0]),
                                   allowed="") + _hint(kind, value)
    if kind == "literal_error":
        choices = ", ".join(map(str, typing.get_args(tp)))
        return wording.choice.format(key=key, value=repr(value), choices=choices)
    form = wording.bounds if kind in _BOUNDS else wording.type
    bounds = allowed(info, finite=kind == "finite_number")
    return form.format(key=key, value=repr(value), type=type_name(info.annotation), allowed=bounds) + _hint(kind, value)


def _hint(kind: str, value: Any) -> str:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return QUOTE_HINT if kind == "string_type" and number else ""


def _dotted(prefix: str, loc: list[int | str]) -> str:
    key = prefix
    for part in loc:
        key = f"{key}[{part}]" if isinstance(part, int) else f"{key}.{part}" if key else str(part)
    return key


def _locate(model: type[BaseModel], loc: list[int | str]) -> tuple[type[BaseModel], FieldInfo | None]:
    """The model that holds the field `loc` ends at, and the field (None: no such field)."""
    owner, info = model, None
    for part in loc:
        if isinstance(part, int):
            continue
        if info is not None:
            sub = _model_in(info.annotation, items=True)
            if sub is None:
                break
            owner = sub
        info = owner.model_fields.get(part)
        if info is None:
            break
    return owner, info


def _strip(tp: Any) -> tuple[Any, bool]:
    """(the type without Annotated and None, whether None is allowed)."""
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _strip(args[0])[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _model_in(tp: Any, items: bool = False) -> type[BaseModel] | None:
    """The model a field holds (items: or a list of; None: none)."""
    tp = _strip(tp)[0]
    if items and typing.get_origin(tp) is list:
        tp = _strip(typing.get_args(tp)[0])[0]
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def field_at(model: type[BaseModel], key: str) -> FieldInfo | None:
    """The field a dotted key (`train.grpo.top_p`) names in `model` and its sections (None: no such field)."""
    info = None
    for part in key.split("."):
        if info is not None:
            sub = _model_in(info.annotation)
            if sub is None:
                return None
            model = sub
        info = model.model_fields.get(part)
        if info is None:
            return None
    return info


def is_text(info: FieldInfo) -> bool:
    """Whether the field holds a string (or null)."""
    return _strip(info.annotation)[0] is str


def type_name(tp: Any) -> str:
    """The type in words: "an integer", "a list of strings or null", "one of a, b"."""
    tp, nullable = _strip(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        name = "one of " + ", ".join(map(str, typing.get_args(tp)))
    elif origin is list:
        name = "a list of " + {str: "strings"}.get(_strip(typing.get_args(tp)[0])[0], "values")
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        name = "a mapping"
    else:
        name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))
    return name + (" or null" if nullable else "")


def allowed(info: FieldInfo, finite: bool = False) -> str:
    """The field's type with its bounds: "a positive integer", "a number in [0, 1)", "an integer >= 0";
    finite: "a finite number" where no upper bound says so."""
    tp, nullable = _strip(info.annotation)
    name, null = type_name(tp), " or null" if nullable else ""
    if finite:
        name = name.replace("a number", "a finite number")
    lo = hi = None
    for m in info.metadata:
        if isinstance(m, (at.Gt, at.Ge)):
            lo = ("(", m.gt) if isinstance(m, at.Gt) else ("[", m.ge)
        elif isinstance(m, (at.Lt, at.Le)):
            hi = (m.lt, ")") if isinstance(m, at.Lt) else (m.le, "]")
    if lo and hi:
        name = f"{type_name(tp)} in {lo[0]}{lo[1]}, {hi[0]}{hi[1]}"
    elif lo == ("(", 0):
        name = name.replace("an integer", "a positive integer").replace("number", "positive number")
    elif lo:
        name = f"{name} {'>' if lo[0] == '(' else '>='} {lo[1]}"
    return name + null


class SchemaRow(NamedTuple):
    key: str
    type: str
    default: str  # JSON (valid YAML), or "required"
    help: str


def schema_rows(model: type[BaseModel], prefix: str = "") -> Iterator[SchemaRow]:
    """Every key of `model`, nested sections included, in declaration order."""
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        sub = _model_in(info.annotation)
        if info.is_required():
            default = "required"
        elif sub is not None and info.default is None:
            default = "null"
        elif sub is not None:
            default = "{}"  # the defaults below
        else:
            value = info.default_factory() if info.default_factory else info.default  # type: ignore[call-arg]
            default = json.dumps(value, ensure_ascii=False)
        yield SchemaRow(key, allowed(info), default, info.description or "")
        if sub is not None:
            yield from schema_rows(sub, key)
