"""Reading user data files (data/records.py), pinned down where mutation testing found the tests silent.

Every expectation is written out by hand: the records of a file we wrote, JSON's own type names, the line a
user reads. Each refusal is checked as the exact line, since that line is the whole of what a user sees.
"""

from __future__ import annotations

import json

import pytest

from peft_rwkv7.data import records as R
from peft_rwkv7.errors import UserError
from tests.data.conftest import write_jsonl

BOM = b"\xef\xbb\xbf"


def _refusal(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        out = fn(*args)
        if hasattr(out, "__next__"):  # a generator fails when it is read
            list(out)
    return str(e.value)


@pytest.mark.parametrize("value, name", [
    (None, "null"), (True, "boolean"), (False, "boolean"), (0, "number"), (2.5, "number"), ("", "string"),
    ([], "array"), ({}, "object"), ((1,), "tuple"),
])
def test_json_names_each_type_as_json_does(value, name):
    assert R.json_type(value) == name


def test_a_missing_file_and_a_folder_are_refused_by_name(tmp_path):
    assert _refusal(R.check_file, tmp_path / "gone.jsonl") == f"{tmp_path / 'gone.jsonl'}: no such file"
    assert _refusal(R.check_file, tmp_path) == f"{tmp_path}: is a directory, expected a .jsonl, .json or .parquet file"
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    assert R.check_file(str(f)) == f


@pytest.mark.parametrize("raw, line", [
    (b'{"a": }', "f:3: invalid JSON (Expecting value at column 7)"),
    (b'{"a": 1', "f:3: invalid JSON (Expecting ',' delimiter at column 8)"),
    (b'{"a": 1\r\n', "f:3: invalid JSON (Expecting ',' delimiter at the end of the line)"),  # said "column 1"
    (b'{"a": "x\n', "f:3: invalid JSON (Invalid control character at column 9)"),
    (b'{"a": "\xff"}', "f:3: not valid UTF-8"),
    (b"[1, 2]", "f:3: expected a JSON object, got array"),
    (b'"text"', "f:3: expected a JSON object, got string"),
    (b"null", "f:3: expected a JSON object, got null"),
])
def test_each_bad_line_is_one_exact_line(raw, line):
    assert _refusal(R.parse_line, raw, "f:3") == line


def test_a_field_must_be_there_and_be_a_string():
    rec = {f"k{i}": i for i in range(10)}
    assert _refusal(R.get_str, rec, "text", "f:2") == (
        "f:2: missing field 'text' (keys: 'k0', 'k1', 'k2', 'k3', 'k4', 'k5', 'k6', 'k7')")
    assert _refusal(R.get_str, {}, "text", "f:2") == "f:2: missing field 'text' (keys: none)"
    assert _refusal(R.get_str, {"text": 3}, "text", "f:2") == "f:2: field 'text' must be a string, got number"
    assert _refusal(R.get_str, {"text": None}, "text", "f:2") == "f:2: field 'text' must be a string, got null"
    assert R.get_str({"text": "", "x": 1}, "text", "f:2") == ""


def _lines_file(tmp_path, n: int = 50):
    recs = [{"text": f"record {i} " + "y" * (i % 7)} for i in range(n)]
    lines = [json.dumps(r).encode() + b"\n" for r in recs]
    lines[10] = b"\n"  # a blank line and one of spaces: skipped, counted
    lines[11] = b"  \t \r\n"
    p = tmp_path / "d.jsonl"
    p.write_bytes(BOM + b"".join(lines))
    want = [(f"{p}:{i + 1}", r) for i, r in enumerate(recs) if i not in (10, 11)]
    return p, lines, want


@pytest.mark.parametrize("chunk", [1, 40, 333, 1 << 22])
def test_chunks_keep_every_line_its_number_and_bytes(tmp_path, chunk):
    p, lines, want = _lines_file(tmp_path)
    chunks = list(R.jsonl_chunks(p, chunk))
    got = [rec for c, first, _ in chunks for rec in R.parse_lines(c, first, str(p))]
    assert got == want
    assert b"".join(b for c, _, _ in chunks for b in c) == b"".join(lines)  # the BOM gone, nothing else
    assert [n for _, _, n in chunks] == [sum(map(len, c)) for c, _, _ in chunks]
    assert sum(n for _, _, n in chunks) == p.stat().st_size - len(BOM)
    firsts = [first for _, first, _ in chunks]
    assert firsts[0] == 1 and firsts == [1 + sum(len(c) for c, _, _ in chunks[:i]) for i in range(len(chunks))]
    if chunk <= 40:
        assert len(chunks) >= len(lines) // 3  # lines of 1-30 bytes: a few a chunk
    if chunk == 1 << 22:
        assert len(chunks) == 1


def test_only_the_files_own_bom_is_taken_off(tmp_path):
    # the same bytes at a later chunk's start are the line's own (json reads them as a BOM too)
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "a"}\n' + BOM + b'{"text": "b"}\n')
    assert list(R.iter_records(p)) == [(f"{p}:1", {"text": "a"}), (f"{p}:2", {"text": "b"})]
    chunks = list(R.jsonl_chunks(p, 1))
    assert chunks[0] == ([b'{"text": "a"}\n'], 1, 14)
    assert chunks[1][0] == [BOM + b'{"text": "b"}\n'] and chunks[1][1] == 2


def test_a_json_file_is_an_array_only_where_it_starts_with_one(tmp_path):
    cases = {b"[]": True, BOM + b" \n\t[{}]": True, b'{"a": 1}\n': False, b"": False, b"\n" * 4000 + b"[": True,
             b" " * 4096 + b"[": False}
    for i, (raw, want) in enumerate(cases.items()):
        p = tmp_path / f"{i}.json"
        p.write_bytes(raw)
        assert R.is_json_array(p) is want, raw[:20]


def test_a_json_array_gives_its_items_by_number(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes(BOM + json.dumps([{"text": "a"}, {"text": "b", "n": 2}], indent=1).encode())
    assert list(R.iter_records(p)) == [(f"{p}: item 0", {"text": "a"}), (f"{p}: item 1", {"text": "b", "n": 2})]
    assert R.first_record(p) == (f"{p}: item 0", {"text": "a"})
    assert R.read_jsonl_texts(p) == ["a", "b"]


@pytest.mark.parametrize("raw, line", [
    (b'[{"a": 1},\n {"a": }]', "{p}:2: invalid JSON (Expecting value at column 8)"),
    (b'[{"a": "\xff"}]', "{p}: not valid UTF-8"),
    (b'[{"a": 1},\n {"a": "x\ty"}]', "{p}:2: invalid JSON (Invalid control character at column 10)"),
    (b'[{"a": 1}, 3]', "{p}: item 1: expected a JSON object, got number"),
    (b'[{"a": 1}, [2]]', "{p}: item 1: expected a JSON object, got array"),
])
def test_a_bad_json_array_is_one_exact_line(tmp_path, raw, line):
    p = tmp_path / "a.json"
    p.write_bytes(raw)
    assert _refusal(R.iter_records, p) == line.format(p=p)


def test_a_json_object_file_is_json_lines(tmp_path):
    # a .json that does not start with `[` is read as JSON Lines, each line by number
    p = tmp_path / "a.json"
    p.write_bytes(b'{"text": "a"}\n\n{"text": "b"}\n')
    assert list(R.iter_records(p)) == [(f"{p}:1", {"text": "a"}), (f"{p}:3", {"text": "b"})]
    p.write_bytes(b'{"text": "a",\n "more": 1}\n')  # a record over two lines: the first ends too soon
    assert _refusal(R.iter_records, p) == f"{p}:1: invalid JSON (Expecting property name enclosed in double quotes " \
                                         f"at the end of the line)"


@pytest.mark.parametrize("suffix", [".JSONL", ".Json", ".txt", ""])
def test_suffixes_are_read_whatever_their_case(tmp_path, suffix):
    p = tmp_path / f"d{suffix}"
    if suffix.lower() == ".json":
        p.write_text(json.dumps([{"text": "a"}]))
        assert list(R.iter_records(p)) == [(f"{p}: item 0", {"text": "a"})]
    else:
        p.write_text('{"text": "a"}\n')
        assert list(R.iter_records(p)) == [(f"{p}:1", {"text": "a"})]


def test_parquet_rows_by_number_and_a_damaged_file_in_one_line(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    p = tmp_path / "d.PARQUET"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "n": [1, 2, 3]}), p)
    assert list(R.iter_records(p)) == [(f"{p}: row {i}", {"text": t, "n": i + 1}) for i, t in enumerate("abc")]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    line = _refusal(R.iter_records, bad)
    assert line.startswith(f"{bad}: cannot read as parquet (") and line.endswith(")") and "\n" not in line


def test_a_parquet_reader_failing_without_a_message_is_named_by_its_type(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def fail(*a, **k):
        raise ValueError("  \n")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    assert _refusal(R.iter_records, tmp_path / "x.parquet") == f"{tmp_path / 'x.parquet'}: no such file"
    (tmp_path / "x.parquet").write_bytes(b"")
    assert _refusal(R.iter_records, tmp_path / "x.parquet") == (
        f"{tmp_path / 'x.parquet'}: cannot read as parquet (ValueError)")

    def refuse(*a, **k):
        raise UserError("a row's own line")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    assert _refusal(R.iter_records, tmp_path / "x.parquet") == "a row's own line"  # passed on as it is


@pytest.mark.parametrize("fn", [R.first_record, R.read_jsonl_texts])
def test_a_file_without_records_says_so(tmp_path, fn):
    p = tmp_path / "e.jsonl"
    p.write_bytes(BOM + b"\n  \n")
    assert _refusal(fn, p) == f"{p}: no records (empty dataset)"
    q = tmp_path / "e.json"
    q.write_text("[]")
    assert _refusal(fn, q) == f"{q}: no records (empty dataset)"


def test_texts_come_from_the_field_asked_for(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "no", "body": "one"}, {"body": "two"}])
    assert R.read_jsonl_texts(p, "body") == ["one", "two"]
    assert _refusal(R.read_jsonl_texts, p) == f"{p}:2: missing field 'text' (keys: 'body')"


def test_first_record_is_the_first(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"n": 1}, {"n": 2}])
    assert R.first_record(p) == (f"{p}:1", {"n": 1})


def test_evaluation_documents_are_each_records_tokens(tmp_path, world, trie):
    p = write_jsonl(tmp_path / "e.jsonl", [{"text": "Hello world", "q": "x"}, {"text": "中文", "q": "Good day"}])
    assert R.load_eval_docs(p, world) == [trie.encode("Hello world"), trie.encode("中文")]
    assert R.load_eval_docs(p, world, "q") == [trie.encode("x"), trie.encode("Good day")]
    empty = tmp_path / "none.jsonl"
    empty.write_text("\n")
    assert _refusal(R.load_eval_docs, empty, world) == f"{empty}: no records (empty dataset)"
    bad = write_jsonl(tmp_path / "s.jsonl", [{"text": "ok"}, '{"text": "a\\ud800b"}'])
    assert _refusal(R.load_eval_docs, bad, world) == (
        f"{bad}:2: text contains an unpaired surrogate (not valid Unicode)")
    assert R.encode_checked(world, "Hello", "w") == trie.encode("Hello")


def test_a_json_file_that_is_not_an_array_read_as_one_is_refused(tmp_path):
    # iter_records only hands arrays to iter_json_array; `data build`'s jobs call it the same way
    p = tmp_path / "o.json"
    p.write_text('{"text": "a"}')
    assert _refusal(R.iter_json_array, p) == f"{p}: expected an array of objects or JSON Lines, got a JSON object"


def test_parquet_is_streamed_not_copied_into_the_hf_cache(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), p)
    real, made = datasets.load_dataset, []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    assert [rec for _, rec in R.iter_records(p)] == [{"text": "a"}, {"text": "b"}]
    assert len(made) == 1 and isinstance(made[0], datasets.IterableDataset)


def test_an_evaluation_document_without_its_field_is_named_by_line(tmp_path, world):
    p = write_jsonl(tmp_path / "e.jsonl", [{"text": "a"}, {"body": "b"}])
    assert _refusal(R.load_eval_docs, p, world) == f"{p}:2: missing field 'text' (keys: 'body')"


def test_a_binidx_prefix_given_as_a_records_file_says_so(tmp_path):
    from peft_rwkv7.data.records import check_file

    (tmp_path / "c.bin").write_bytes(b"")
    (tmp_path / "c.idx").write_bytes(b"")
    with pytest.raises(UserError) as e:
        check_file(tmp_path / "c")
    assert str(e.value) == (f"{tmp_path / 'c'}: a binidx dataset (PREFIX.bin and PREFIX.idx), not a .jsonl, .json or "
                            ".parquet file; set data.kind: binidx (or auto)")
    (tmp_path / "c.idx").unlink()
    with pytest.raises(UserError, match=r": no such file$"):
        check_file(tmp_path / "c")
