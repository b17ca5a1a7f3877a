"""Reading user data files record by record, with one-line errors that name the file and line.

Formats: `.jsonl` (one JSON object per line; blank lines skipped), `.json` (a top-level array of
objects, or JSON Lines under a .json name) and `.parquet` (streamed through HF `datasets`).
Every record comes with `where`, the location used in error messages (`file:LINE`,
`file: item N`, `file: row N`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError

_BOM = b"\xef\xbb\xbf"
CHUNK_BYTES = 1 << 22  # raw jsonl bytes per work unit: big enough to amortise IPC, small enough to stream


def json_type(v: object) -> str:
    """JSON's name for the type of a decoded value (for error messages)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _json_msg(e: json.JSONDecodeError) -> str:
    """json's message without its own trailing "at" ("Invalid control character at"): we add where."""
    return e.msg.removesuffix(" at")


def check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        if Path(f"{p}.bin").is_file() and Path(f"{p}.idx").is_file():
            raise UserError(f"{p}: a binidx dataset (PREFIX.bin and PREFIX.idx), not a .jsonl, .json or .parquet file; "
                            "set data.kind: binidx (or auto)")
        raise UserError(f"{p}: no such file")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected a .jsonl, .json or .parquet file")
    return p


def parse_line(raw: bytes, where: str) -> dict:
    """One jsonl line -> its object; UserError naming `where` when it is not a JSON object."""
    try:
        rec = json.loads(raw)
    except UnicodeDecodeError:
        raise UserError(f"{where}: not valid UTF-8") from None
    except json.JSONDecodeError as e:  # a line's only newline is its last character: line 2 is its end
        at = f"column {e.colno}" if e.lineno == 1 else "the end of the line"
        raise UserError(f"{where}: invalid JSON ({_json_msg(e)} at {at})") from None
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {json_type(rec)}")
    return rec


def get_str(rec: dict, field: str, where: str) -> str:
    """`rec[field]`, which must exist and be a string."""
    if field not in rec:
        keys = ", ".join(map(repr, list(rec)[:8])) or "none"
        raise UserError(f"{where}: missing field {field!r} (keys: {keys})")
    v = rec[field]
    if not isinstance(v, str):
        raise UserError(f"{where}: field {field!r} must be a string, got {json_type(v)}")
    return v


def jsonl_chunks(path: str | os.PathLike, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[list[bytes], int, int]]:
    """Stream a jsonl file as (raw lines, number of the first line, bytes), ~chunk_bytes each."""
    p = check_file(path)
    line_no = 1
    with open(p, "rb") as f:
        while lines := f.readlines(chunk_bytes):
            if line_no == 1 and lines[0].startswith(_BOM):
                lines[0] = lines[0][len(_BOM):]
            yield lines, line_no, sum(map(len, lines))
            line_no += len(lines)


def parse_lines(lines: list[bytes], first_line: int, path: str) -> Iterator[tuple[str, dict]]:
    for k, raw in enumerate(lines):
        if raw.strip():
            where = f"{path}:{first_line + k}"
            yield where, parse_line(raw, where)


def is_json_array(path: Path) -> bool:
    """A .json file whose first non-space character is `[` (else it is read as JSON Lines)."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(_BOM).lstrip()
    return head.startswith(b"[")


def iter_json_array(path: Path) -> Iterator[tuple[str, dict]]:
    """A top-level JSON array of objects (read whole: JSON arrays cannot be streamed)."""
    try:
        data = json.loads(path.read_bytes().removeprefix(_BOM))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({_json_msg(e)} at column {e.colno})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected an array of objects or JSON Lines, got a JSON {json_type(data)}")
    for i, rec in enumerate(data):
        where = f"{path}: item {i}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object, got {json_type(rec)}")
        yield where, rec


def iter_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        rows = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        for i, rec in enumerate(rows):
            yield f"{path}: row {i}", rec
    except UserError:
        raise
    except Exception as e:  # pyarrow raises several types on damaged files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: cannot read as parquet ({first})") from e


def iter_records(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Every record of a .jsonl / .json / .parquet file as (where, object), streamed."""
    p = check_file(path)
    if p.suffix.lower() == ".parquet":
        yield from iter_parquet(p)
    elif p.suffix.lower() == ".json" and is_json_array(p):
        yield from iter_json_array(p)
    else:
        for lines, first, _ in jsonl_chunks(p):
            yield from parse_lines(lines, first, str(p))


def first_record(path: str | os.PathLike) -> tuple[str, dict]:
    """The first record (UserError when the file has none)."""
    for where, rec in iter_records(path):
        return where, rec
    raise UserError(f"{path}: no records (empty dataset)")


def read_jsonl_texts(path: str | os.PathLike, field: str = "text") -> list[str]:
    """`rec[field]` of every record (each must be a string); UserError on bad or empty input."""
    texts = [get_str(rec, field, where) for where, rec in iter_records(path)]
    if not texts:
        raise UserError(f"{path}: no records (empty dataset)")
    return texts


def encode_checked(tokenizer, text: str, where: str) -> list[int]:
    """tokenizer.encode with a one-line UserError for text that is not valid Unicode."""
    try:
        return tokenizer.encode(text)
    except UnicodeEncodeError:
        raise UserError(f"{where}: text contains an unpaired surrogate (not valid Unicode)") from None


def load_eval_docs(path: str | os.PathLike, tokenizer, field: str = "text") -> list[list[int]]:
    """Evaluation documents: `encode(rec[field])` per record (the evaluator prepends token 0)."""
    docs = [encode_checked(tokenizer, get_str(rec, field, where), where) for where, rec in iter_records(path)]
    if not docs:
        raise UserError(f"{path}: no records (empty dataset)")
    return docs
