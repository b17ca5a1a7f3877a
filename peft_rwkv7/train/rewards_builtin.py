"""The built-in GRPO rewards, named in a recipe by `fn` (train.grpo.rewards; train/rewards.py combines them).

Each has TRL's reward signature `f(prompts, completions, **columns) -> list[float | None]` plus its own keyword
options, which a recipe gives beside `fn` and which `OPTIONS[name]` validates. `columns` are the prompts file's
other columns, one value per completion, and `completion_ids` (the sampled token ids) from the GRPO loop.
Plain Python, no torch: the recipe validates the options without loading a model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, Literal, NamedTuple

from pydantic import Field, field_validator, model_validator
from typing_extensions import Self

from ..config_base import ConfigModel, Number, Text, invalid
from ..errors import UserError

COMPLETION_IDS = "completion_ids"  # the column of sampled token ids the GRPO loop hands to every reward
# Trailing punctuation `exact` ignores ("42." == "42"); ASCII and CJK full-width sentence marks.
TRAILING_PUNCTUATION = ".,;:!?\u3002\uff0c\uff1b\uff1a\uff01\uff1f"
# A number in text: optional sign (ASCII or U+2212 minus), digits with optional comma thousands groups
# ("1,234,567"; "1,2,3" is three numbers), optional decimals and exponent, optional "/denominator".
# It may not continue a word, a number or a decimal point ("x2", "v1.5" hold none), and needs a leading
# digit (".5" is not read).
NUMBER = re.compile(
    r"(?<![A-Za-z0-9_.])(?P<sign>[-+\u2212]?)(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?"
    r"(?P<exp>[eE][-+]?\d+)?(?:/(?P<den>\d+)(?![\d.]))?"
)


def _rows(columns: dict[str, Any], column: str) -> list:
    if column not in columns:
        have = ", ".join(sorted(columns)) or "none"
        raise UserError(f"no column {column!r} in the prompts data (its columns: {have})")
    return columns[column]


def _completion_ids(columns: dict[str, Any], what: str) -> list:
    if COMPLETION_IDS not in columns:
        raise UserError(f"{what} counts tokens and needs the {COMPLETION_IDS} column (the GRPO loop passes it); "
                        "use unit: chars to count characters")
    return [ids.tolist() if hasattr(ids, "tolist") else list(ids) for ids in columns[COMPLETION_IDS]]


def normalize_answer(text: str) -> str:
    """`exact`'s normal form: whitespace runs collapsed to one space and stripped, casefolded, trailing
    sentence punctuation (TRAILING_PUNCTUATION) removed."""
    return " ".join(text.split()).casefold().rstrip(TRAILING_PUNCTUATION + " ")


def last_number(text: str) -> Fraction | None:
    """The last number NUMBER finds in `text`, exactly (3.50 == 7/2, 1,000 == 1000, -3/4 == -0.75); None when
    there is none or it is a fraction over 0."""
    matches = list(NUMBER.finditer(text))
    if not matches:
        return None
    found = matches[-1]
    sign = "-" if found["sign"] in ("-", "\u2212") else ""
    value = Fraction(sign + found["int"].replace(",", "") + (found["frac"] or "") + (found["exp"] or ""))
    den = int(found["den"]) if found["den"] else 1
    return value / den if den else None


def _as_number(value: Any) -> Fraction | None:
    """A column value as an exact number: int, finite float (as written: 0.1 is 1/10), or the last number in a
    string ("#### 1,234" gives 1234, as GSM8K answers end); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(repr(value)) if value == value and abs(value) != float("inf") else None
    return last_number(value) if isinstance(value, str) else None


# What the built-ins that read a column want there (RewardSet.check_records).
COLUMN_WANTS = {"exact": "an answer (a string or a number)", "numeric": "a number (or a string holding one)"}


def column_problem(fn: str, value: Any) -> str | None:
    """Whether built-in `fn` can use a record's column `value`: None (it can), "none" (not applicable to the
    record: the reward gives None) or "wrong" (an array or object, which it cannot read)."""
    if isinstance(value, (list, dict)):
        return "wrong"
    usable = value is not None if fn == "exact" else _as_number(value) is not None
    return None if usable else "none"


def exact_match(prompts: list[str], completions: list[str], *, column: str = "answer", pattern: str | None = None,
                **columns: Any) -> list[float | None]:
    """1.0 when the answer, normalised (normalize_answer), equals the normalised value of column `column`, else 0.0.

    The answer is the whole completion, or with `pattern` the last match of that regex in it (its group 1 when
    it has groups; no match gives 0.0). A row whose column value is None gets None (not applicable). Range {0, 1}.
    """
    rows = _rows(columns, column)
    out: list[float | None] = []
    for completion, want in zip(completions, rows):
        if want is None:
            out.append(None)
            continue
        answer: str | None = completion
        if pattern is not None:
            found = list(re.finditer(pattern, completion))
            answer = (found[-1].group(1) if found[-1].re.groups else found[-1].group(0)) if found else None
        out.append(float(answer is not None and normalize_answer(answer) == normalize_answer(str(want))))
    return out


def numeric_match(prompts: list[str], completions: list[str], *, column: str = "answer", tol: float = 0.0,
                  **columns: Any) -> list[float | None]:
    """1.0 when the last number in the completion (last_number: integers, decimals, signs, comma thousands,
    exponents, a/b fractions; units and % around it ignored) is within `tol` (absolute, inclusive) of column
    `column`, else 0.0 (also when the completion holds no number).

    The column may hold an int, a float or a string whose last number is taken; a row where it holds no number
    (None, "", "n/a") gets None. Numbers compare exactly (as fractions), so "3.50" equals 3.5. Range {0, 1}.
    """
    rows = _rows(columns, column)
    limit = Fraction(repr(float(tol)))
    out: list[float | None] = []
    for completion, want in zip(completions, rows):
        target = _as_number(want)
        if target is None:
            out.append(None)
            continue
        got = last_number(completion)
        out.append(float(got is not None and abs(got - target) <= limit))
    return out


def regex_match(prompts: list[str], completions: list[str], *, pattern: str, mode: str = "search",
                **columns: Any) -> list[float]:
    """1.0 when `pattern` (Python re; inline flags such as (?s) or (?i) allowed) matches the completion with
    its surrounding whitespace stripped, else 0.0; mode `search`: anywhere in it, `fullmatch`: all of it.
    Range {0, 1}."""
    regex = re.compile(pattern)
    match = regex.fullmatch if mode == "fullmatch" else regex.search
    return [float(match(c.strip()) is not None) for c in completions]


def _first_object(text: str) -> Any:
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            return decoder.raw_decode(text, start)[0]
        except ValueError:
            continue
    return None


def json_match(prompts: list[str], completions: list[str], *, required: Sequence[str] = (), whole: bool = False,
               **columns: Any) -> list[float]:
    """1.0 when the completion holds a JSON object with every key of `required` at its top level, else 0.0.

    whole false: the object is the first '{' of the completion from which a JSON object parses (text before
    and after it is ignored); whole true: the completion, stripped of surrounding whitespace, must be one JSON
    object and nothing else. Arrays and scalars are not objects. Range {0, 1}."""
    out = []
    for completion in completions:
        if whole:
            try:
                found = json.loads(completion.strip())
            except ValueError:
                found = None
        else:
            found = _first_object(completion)
        out.append(float(isinstance(found, dict) and all(k in found for k in required)))
    return out


def length_penalty(prompts: list[str], completions: list[str], *, max_tokens: int, buffer: int | None = None,
                   unit: str = "tokens", **columns: Any) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13) of a completion of length L:
    0 for L <= max_tokens - buffer, (max_tokens - buffer - L) / buffer up to L = max_tokens (a linear ramp from
    0 to -1), -1 beyond. buffer null: max_tokens // 4; buffer 0: a step from 0 to -1 past max_tokens.
    L counts tokens (unit tokens: the completion_ids column) or characters (unit chars). Range [-1, 0]."""
    cache = max_tokens // 4 if buffer is None else buffer
    lengths = ([len(ids) for ids in _completion_ids(columns, "length")] if unit == "tokens"
               else [len(c) for c in completions])
    free = max_tokens - cache
    return [0.0 if n <= free else -1.0 if n > max_tokens else (free - n) / cache for n in lengths]


def template_regex(template: str) -> re.Pattern[str]:
    """`format`'s template as a regex: each `...` matches any text (newlines included, possibly empty); each
    whitespace run in the template, and the point between two adjacent tags (`><`), matches any whitespace
    (possibly none); the rest is literal."""
    pieces = [piece.replace("><", "> <") for piece in template.split("...")]
    literal = [r"\s*".join(re.escape(word) for word in re.split(r"\s+", piece)) for piece in pieces]
    return re.compile("(.*?)".join(literal), re.DOTALL)


def format_match(prompts: list[str], completions: list[str], *, template: str, **columns: Any) -> list[float]:
    """1.0 when the whole completion, stripped of surrounding whitespace, matches `template` (template_regex:
    `<think>...</think><answer>...</answer>` wants exactly those tags in that order, any text inside, any
    whitespace between), else 0.0. Range {0, 1}."""
    regex = template_regex(template.strip())
    return [float(regex.fullmatch(c.strip()) is not None) for c in completions]


def repetition_penalty(prompts: list[str], completions: list[str], *, n: int = 3, unit: str = "words",
                       **columns: Any) -> list[float]:
    """-(1 - distinct n-grams / all n-grams) of each completion (the repeated share of its n-grams; Yeo et al.
    2025, arXiv:2502.03373, C.2): 0.0 with no n-gram repeated, towards -1 as one n-gram fills it; 0.0 when it
    has fewer than n units. Units: words (split on whitespace), chars, or tokens (completion_ids). Range [-1, 0]."""
    units: list[Sequence[Any]]
    if unit == "tokens":
        units = _completion_ids(columns, "repetition")
    else:
        units = [c.split() if unit == "words" else c for c in completions]
    out = []
    for seq in units:
        grams = list(zip(*(seq[i:] for i in range(n))))
        out.append(-(1.0 - len(set(grams)) / len(grams)) if grams else 0.0)
    return out


# ---- The recipe keys of each built-in (besides fn and weight); defaults equal the functions' defaults (tested).


class ExactOptions(ConfigModel):
    column: Text = Field("answer", description="the prompts file's column holding the expected answer")
    pattern: str | None = Field(None, description="regex picking the answer from the completion (last match, "
                                "group 1 if any); null: the whole completion")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        return _compiled(v)


class NumericOptions(ConfigModel):
    column: Text = Field("answer", description="the prompts file's column holding the expected number")
    tol: Number = Field(0.0, ge=0, allow_inf_nan=False, description="absolute tolerance, inclusive")


class RegexOptions(ConfigModel):
    pattern: str = Field(description="Python regex")
    mode: Literal["search", "fullmatch"] = Field("search", description="search: anywhere; fullmatch: the whole")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        return _compiled(v)


class JsonOptions(ConfigModel):
    required: list[str] = Field(default_factory=list, description="top-level keys the object must have")
    whole: bool = Field(False, description="the whole completion must be the JSON object")


class LengthOptions(ConfigModel):
    max_tokens: int = Field(gt=0, description="length at which the penalty reaches -1 (in unit)")
    buffer: int | None = Field(None, ge=0, description="length of the ramp below max_tokens; null: max_tokens // 4")
    unit: Literal["tokens", "chars"] = Field("tokens", description="what the length counts")

    @model_validator(mode="after")
    def _ramp_fits(self) -> Self:
        if self.buffer is not None and self.buffer > self.max_tokens:
            raise invalid(f"{{key}} ({self.buffer}) must be at most max_tokens ({self.max_tokens})", "buffer")
        return self


class FormatOptions(ConfigModel):
    template: str = Field(description="e.g. <think>...</think><answer>...</answer>; ... is any text")

    @field_validator("template")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise invalid("{key} must be a non-empty template such as <think>...</think><answer>...</answer>")
        return v


class RepetitionOptions(ConfigModel):
    n: int = Field(3, gt=0, description="n-gram size")
    unit: Literal["words", "chars", "tokens"] = Field("words", description="what an n-gram is made of")


def _compiled(pattern: str | None) -> str | None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise invalid(f"{{key}}: {pattern!r} is not a valid regex ({e})") from None
    return pattern


class Builtin(NamedTuple):
    """A built-in reward: its function and the model of its recipe keys."""

    fn: Callable[..., list]
    options: type[ConfigModel]


BUILTINS: dict[str, Builtin] = {
    "exact": Builtin(fn=exact_match, options=ExactOptions),
    "numeric": Builtin(fn=numeric_match, options=NumericOptions),
    "regex": Builtin(fn=regex_match, options=RegexOptions),
    "json": Builtin(fn=json_match, options=JsonOptions),
    "length": Builtin(fn=length_penalty, options=LengthOptions),
    "format": Builtin(fn=format_match, options=FormatOptions),
    "repetition": Builtin(fn=repetition_penalty, options=RepetitionOptions),
}
