"""GRPO's rewards: the recipe's `train.grpo.rewards` list, each `{fn: NAME, weight: W, ...fn's own keys}`, and
`RewardSet`, which scores a batch of completions with all of them.

`fn` is a built-in (train/rewards_builtin.py: exact, numeric, regex, json, length, format, repetition, each
with its own keys), `module:function` (an importable module: installed or on PYTHONPATH) or `path.py:function`
(a file, relative to the recipe's directory or absolute). Every function has TRL's reward signature
`f(prompts: list[str], completions: list[str], **columns) -> list[float | None]`: `columns` are the prompts
file's other columns plus `completion_ids`, one value per completion; None means "not applicable to this row".
A user function's recipe keys are passed to it as keyword arguments and must be named parameters of it.

Combination (TRL GRPOTrainer._generate_and_score_completions: None becomes NaN in rewards_per_func, then
`(rewards_per_func * reward_weights).nansum(dim=1)`): the total of a row is the weighted sum over the rewards
that apply to it; a row no reward applies to gets 0. Per-function scores keep NaN where not applicable (for
nanmean/nanstd in the logs).

Importing this module imports neither torch nor the model: a recipe validates its rewards on its own.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from typing_extensions import Self

from ..config_base import ConfigModel, Number, Text, invalid, user_error
from ..errors import UserError
from .rewards_builtin import BUILTINS, COLUMN_WANTS, COMPLETION_IDS, column_problem

if TYPE_CHECKING:
    from torch import Tensor

USER_FORMS = "module:function or path.py:function"
SHOWN_PROMPT = 60  # characters of a prompt an error message quotes
MAX_ERROR = 300  # characters of a reward function's exception an error message quotes
MAX_LISTED = 12  # functions of a module an error message lists
# Largest reward (each function's and the weighted total) in magnitude: advantages are computed in float32, whose
# squares overflow past ~1.8e19 (a std of inf turns every advantage into 0, a reward of inf the loss into NaN).
MAX_REWARD = 1e15
RAISED = (Exception, SystemExit)  # what a user's module or function may raise that we report (not ^C)


class UserFn(NamedTuple):
    """A `fn` naming the user's own function: a file (path ends in .py) or an importable module."""

    source: str  # the file path as written, or the dotted module name
    function: str
    is_file: bool


def user_fn(spec: str) -> UserFn | None:
    """`module:function` or `path.py:function` split into its parts; None when `spec` has neither form."""
    source, sep, function = spec.rpartition(":")
    if not sep or not source or not function.isidentifier():
        return None
    if source.endswith(".py"):
        return UserFn(source, function, True)
    if all(part.isidentifier() for part in source.split(".")):
        return UserFn(source, function, False)
    return None


class RewardConfig(ConfigModel):
    """One reward of train.grpo.rewards. Keys other than fn and weight are the fn's own (a built-in's keys are
    checked here; a user function's when RewardSet loads it)."""

    model_config = ConfigDict(extra="allow", strict=True)
    section: ClassVar[str] = "reward"

    fn: Text = Field(description=(
        f"a built-in ({', '.join(BUILTINS)}; train/rewards_builtin.py says what each checks and its keys) or "
        f"your own as {USER_FORMS} (path relative to the recipe's directory) with TRL's signature "
        "f(prompts, completions, **columns) -> list[float | None]"))
    weight: Number = Field(1.0, allow_inf_nan=False, description="the reward's factor in the total")

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise invalid(f"{{key}} must be a mapping such as {{fn: numeric, weight: 1.0}}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _known_fn_and_keys(self) -> Self:
        given = self.model_extra or {}
        builtin = BUILTINS.get(self.fn)
        if builtin is None:
            if user_fn(self.fn) is None:
                close = difflib.get_close_matches(self.fn, BUILTINS, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise invalid(f"{{key}}: unknown reward {self.fn!r}; {hint}built-ins: {', '.join(BUILTINS)}; or your "
                              f"own as {USER_FORMS}", "fn")
            return self
        allowed = builtin.options.model_fields
        unknown = [k for k in given if k not in allowed]
        if unknown:
            keys = ", ".join(["fn", "weight", *allowed])
            raise invalid(f"unknown key {{key}} for fn {self.fn} (allowed: {keys})", unknown[0])
        try:
            builtin.options.model_validate(given)
        except ValidationError as e:
            # the options' own message, its keys dotted below this entry's
            raise invalid(str(user_error(e, builtin.options, "{key}"))) from None
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The keyword options the function gets: a built-in's validated keys with their defaults, or the keys a
        user function's entry gives."""
        given = dict(self.model_extra or {})
        builtin = BUILTINS.get(self.fn)
        return builtin.options.model_validate(given).model_dump() if builtin else given

    def absolute(self, base_dir: str | Path) -> RewardConfig:
        """This entry with a relative `path.py:function` made absolute against `base_dir` (the recipe's
        directory), so that a copy of the recipe elsewhere (a run's recipe.yaml) loads the same file."""
        spec = user_fn(self.fn)
        if spec is None or not spec.is_file or Path(spec.source).is_absolute():
            return self
        path = (Path(base_dir) / spec.source).resolve()
        return type(self).model_validate({**self.model_dump(), "fn": f"{path}:{spec.function}"})


def reward_configs(entries: Any, where: str = "train.grpo.rewards") -> list[RewardConfig]:
    """Validate a list of reward entries (mappings); the first bad one is a UserError naming `where[i].key`."""
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{where} must be a non-empty list of rewards such as [{{fn: numeric, weight: 1.0}}], "
                        f"got {entries!r}")
    try:
        return TypeAdapter(list[RewardConfig]).validate_python(entries)
    except ValidationError as e:
        raise user_error(e, RewardConfig, where) from None


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {_one_line(e)}"


def _load_user_fn(spec: UserFn, fn: str, where: str, base_dir: Path, modules: dict[str, Any]) -> Callable:
    """Import the module or file `spec` names (each file once per RewardSet) and take its function."""
    if spec.is_file:
        path = Path(spec.source) if Path(spec.source).is_absolute() else base_dir / spec.source
        path = path.resolve()
        if not path.is_file():
            raise UserError(f"{where}.fn: {fn!r}: no such file {path}")
        key = str(path)
        if key not in modules:
            # a name of its own per file, so two reward files called rewards.py do not replace each other
            name = f"_rwkv_peft_reward_{hashlib.sha1(key.encode()).hexdigest()[:12]}_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise UserError(f"{where}.fn: {fn!r}: cannot load {path} as a Python file")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # dataclasses and pickling look the module up by name
            try:
                module_spec.loader.exec_module(module)
            except RAISED as e:
                del sys.modules[name]
                raise UserError(f"{where}.fn: loading {path} failed: {_error(e)}") from None
            modules[key] = module
        module, source = modules[key], str(path)
    else:
        try:
            module = importlib.import_module(spec.source)
        except ModuleNotFoundError as e:
            if e.name and (spec.source == e.name or spec.source.startswith(e.name + ".")):
                raise UserError(f"{where}.fn: {fn!r}: no module named {spec.source} on the Python path; for a file "
                                f"write {spec.source.replace('.', '/')}.py:{spec.function}") from None
            raise UserError(f"{where}.fn: importing {spec.source} failed: {_error(e)}") from None
        except RAISED as e:
            raise UserError(f"{where}.fn: importing {spec.source} failed: {_error(e)}") from None
        source = spec.source
    function = getattr(module, spec.function, None)
    if not callable(function):
        defined = sorted(k for k, v in vars(module).items()
                         if inspect.isfunction(v) and v.__module__ == module.__name__ and not k.startswith("_"))
        what = "has no function" if function is None else "has a non-callable"
        listed = ", ".join(defined[:MAX_LISTED]) + (", ..." if len(defined) > MAX_LISTED else "")
        raise UserError(f"{where}.fn: {source} {what} {spec.function!r} (its functions: {listed or 'none'})")
    return function


class _Reward(NamedTuple):
    name: str  # unique among the set's rewards: fn, or fn_2, fn_3 for repeats
    fn: str  # as the recipe writes it
    where: str  # train.grpo.rewards[i]
    weight: float
    call: Callable[..., Any]
    options: dict[str, Any]
    takes: frozenset[str] | None  # the columns it accepts; None: all (it has **kwargs)


def _signature_check(call: Callable, options: dict[str, Any], fn: str, where: str) -> frozenset[str] | None:
    """A user function's recipe keys must be its named parameters, and it must take prompts and completions by
    keyword; returns the names it takes, or None when it takes any keyword (**kwargs)."""
    try:
        params = inspect.signature(call).parameters
    except (TypeError, ValueError):
        return None
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    any_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for needed in ("prompts", "completions"):
        if needed not in named and not any_kw:
            raise UserError(f"{where}.fn: {fn} must take {needed} (TRL's reward signature: "
                            "f(prompts, completions, **columns) -> list[float | None])")
    unknown = [k for k in options if k not in named - {"prompts", "completions"}]
    if unknown:
        takes = ", ".join(sorted(named - {"prompts", "completions"})) or "none"
        raise UserError(f"unknown key {where}.{unknown[0]} for fn {fn} (its keyword parameters: {takes})")
    return None if any_kw else frozenset(named)


class RewardSet:
    """All rewards of a recipe, loaded: `reward_set(prompts, completions, columns)` scores a batch.

    `names` (unique, in recipe order: fn, or fn_2, fn_3 when an fn repeats) key the per-function scores and
    the metrics; `weights` are their factors in the total."""

    def __init__(self, entries: Sequence[RewardConfig | dict], base_dir: str | Path = ".",
                 where: str = "train.grpo.rewards") -> None:
        configs = reward_configs([e.model_dump() if isinstance(e, RewardConfig) else e for e in entries], where)
        modules: dict[str, Any] = {}
        seen: dict[str, int] = {}
        self._where, self._warned = where, False
        self._rewards: list[_Reward] = []
        for i, config in enumerate(configs):
            at = f"{where}[{i}]"
            seen[config.fn] = seen.get(config.fn, 0) + 1
            name = config.fn if seen[config.fn] == 1 else f"{config.fn}_{seen[config.fn]}"
            options = config.options
            builtin = BUILTINS.get(config.fn)
            if builtin is not None:
                call, takes = builtin.fn, None
            else:
                spec = user_fn(config.fn)
                assert spec is not None  # RewardConfig checked the form
                call = _load_user_fn(spec, config.fn, at, Path(base_dir), modules)
                takes = _signature_check(call, options, config.fn, at)
            self._rewards.append(_Reward(name, config.fn, at, config.weight, call, options, takes))

    @property
    def names(self) -> list[str]:
        return [r.name for r in self._rewards]

    @property
    def weights(self) -> list[float]:
        return [r.weight for r in self._rewards]

    def check_columns(self, columns: Iterable[str], source: str | None = None) -> None:
        """Before any sampling: each built-in's `column` is among the data's `columns` (completion_ids, which
        the loop adds, counts as present), and no column has the name of a reward's option; else a UserError
        (naming the prompts file `source` where given)."""
        have = set(columns) | {COMPLETION_IDS}
        for r in self._rewards:
            column = r.options.get("column") if r.fn in BUILTINS else None
            if column is not None and column not in have:
                raise UserError(f"{r.where}.column: no column {column!r} in {source or 'the prompts data'} "
                                f"(its columns: {', '.join(sorted(set(columns))) or 'none'})")
            self._no_clash(r, have)

    def check_records(self, records: Iterable[tuple[str, dict]], source: str) -> None:
        """Before any sampling: each built-in reading a `column` finds a value it can use (exact: not null; numeric:
        a number) in at least one record of `source`, and none of the wrong type (an array or object); records are
        (where, columns) as data.prompts.PromptData.file_records gives them. Else a UserError naming the record."""
        checked = [r for r in self._rewards if r.fn in BUILTINS and "column" in r.options]
        usable = dict.fromkeys((r.where for r in checked), False)
        for where, rec in records:
            for r in checked:
                column = r.options["column"]
                problem = column_problem(r.fn, rec.get(column))
                if problem == "wrong":
                    raise UserError(f"{where}: column {column!r} holds {_shown(rec[column], 30)} ({r.where}, fn "
                                    f"{r.fn}, reads {COLUMN_WANTS[r.fn]})")
                usable[r.where] = usable[r.where] or problem is None
        for r in checked:
            if not usable[r.where]:
                raise UserError(f"{source}: no record has {COLUMN_WANTS[r.fn]} in column {r.options['column']!r}, "
                                f"so {r.where} ({r.fn}) would score nothing")

    @staticmethod
    def _no_clash(r: _Reward, columns: Iterable[str]) -> None:
        clash = sorted(set(columns) & (set(r.options) | {"prompts", "completions"}))
        if clash:
            raise UserError(f"{r.where} ({r.fn}): the prompts data's column {clash[0]!r} has the name of an argument "
                            "of the reward function; rename the column")

    def __call__(self, prompts: list[str], completions: list[str],
                 columns: dict[str, list]) -> tuple[Tensor, dict[str, Tensor]]:
        """Score n completions (prompts[i] is the prompt of completions[i]; each column holds n values).

        Returns total [n] float32 = the weighted sum over the rewards that apply to each row (TRL's nansum: 0 for
        a row none applies to), and per_fn {name: [n] float32}, NaN where that reward returned None. A function
        that raises, returns other than one number or None per completion, or NaN/inf: a UserError naming the
        entry (train.grpo.rewards[i] and its fn) and the first offending prompt (after a raise, the rows are
        scored again one at a time to find it)."""
        import torch  # here, not at the top: recipes import this module without torch

        n = len(completions)
        if len(prompts) != n or any(len(v) != n for v in columns.values()):
            sizes = {k: len(v) for k, v in columns.items()}
            raise ValueError(f"rewards need one prompt and one value per column for each of {n} completions, "
                             f"got {len(prompts)} prompts and columns {sizes}")
        total = [0.0] * n
        per_fn: dict[str, Tensor] = {}
        for r in self._rewards:
            scores = self._score(r, prompts, completions, columns)
            for i, s in enumerate(scores):
                if s is not None:
                    total[i] += r.weight * s
            per_fn[r.name] = torch.tensor([math.nan if s is None else s for s in scores], dtype=torch.float32)
        for i, t in enumerate(total):
            if not abs(t) <= MAX_REWARD:
                raise UserError(f"{self._where}: the weighted total reward is {t:.3g} for prompt {_shown(prompts[i])}; "
                                f"weights x rewards must stay within +-{MAX_REWARD:.0e} (rewards are normalised in "
                                "float32)")
        if n and not self._warned and all(all(v[i] != v[i] for v in per_fn.values()) for i in range(n)):
            self._warned = True  # once: TRL warns likewise
            print(f"warning: {self._where}: no reward applies to any of {n} completions (every function returned "
                  f"None; first prompt {_shown(prompts[0])}): they score 0 and teach nothing", file=sys.stderr)
        return torch.tensor(total, dtype=torch.float32), per_fn

    def _score(self, r: _Reward, prompts: list[str], completions: list[str],
               columns: dict[str, list]) -> list[float | None]:
        self._no_clash(r, columns)
        passed = columns if r.takes is None else {k: v for k, v in columns.items() if k in r.takes}
        head = f"{r.where} ({r.fn})"
        try:
            out = r.call(prompts=prompts, completions=completions, **r.options, **passed)
        except UserError as e:
            raise UserError(f"{head}: {_one_line(e)}") from None
        except RAISED as e:
            i = self._first_raising(r, prompts, completions, passed)
            raise UserError(f"{head} raised {_error(e)[:MAX_ERROR]} (prompt {_shown(prompts[i])})") from None
        if not isinstance(out, (list, tuple)):
            raise UserError(f"{head} returned {type(out).__name__}, expected a list of {len(completions)} numbers or "
                            f"None (prompt {_shown(prompts[0])})")
        if len(out) != len(completions):
            i = min(len(out), len(completions) - 1)
            raise UserError(f"{head} returned {len(out)} rewards for {len(completions)} completions (first prompt "
                            f"without its own: {_shown(prompts[i])})")
        scores: list[float | None] = []
        for i, s in enumerate(out):
            if s is not None and not (isinstance(s, numbers.Real) and _finite(s)):
                kind = "" if isinstance(s, numbers.Real) else f" (a {type(s).__name__})"
                raise UserError(f"{head} returned {_shown(s, 30)}{kind} for prompt {_shown(prompts[i])}; a reward "
                                "is a finite number or None")
            if s is not None and not abs(float(s)) <= MAX_REWARD:
                raise UserError(f"{head} returned {float(s):.3g} for prompt {_shown(prompts[i])}; a reward must be "
                                f"within +-{MAX_REWARD:.0e} (rewards are normalised in float32)")
            scores.append(None if s is None else float(s))
        return scores

    @staticmethod
    def _first_raising(r: _Reward, prompts: list[str], completions: list[str], passed: dict[str, list]) -> int:
        """The first row that raises on its own (0 when none does: the failure needs the whole batch)."""
        for i in range(len(completions)):
            try:
                r.call(prompts=prompts[i:i + 1], completions=completions[i:i + 1], **r.options,
                       **{k: v[i:i + 1] for k, v in passed.items()})
            except RAISED:
                return i
        return 0


def _finite(s: numbers.Real) -> bool:
    try:
        return math.isfinite(s)
    except OverflowError:  # an int too large for a float
        return False


def _shown(value: Any, limit: int = SHOWN_PROMPT) -> str:
    """A value for a one-line message: a string quoted (newlines escaped), cut to `limit` characters + "..."."""
    text = value if isinstance(value, str) else repr(value)
    cut = text[:limit] + "..." if len(text) > limit else text
    return repr(cut) if isinstance(value, str) else cut
