"""`data build` output, read back by an independent MMIDIDX reader, equals encode(doc) + [0] per
document; the pair is written atomically; damaged pairs are refused with one line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from peft_rwkv7.data import MMapIndexedDataset, build_binidx
from peft_rwkv7.data.build import tokenize_file
from peft_rwkv7.data.formats import TextFormat
from peft_rwkv7.errors import UserError
from tests.conftest import shared_file
from tests.data.conftest import CORPUS, write_jsonl


def read_mmidx(prefix: Path) -> dict:
    """Megatron MMIDIDX, parsed from the spec by hand (not with the package's reader)."""
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack("<Q", raw[9:17])
    (code,) = struct.unpack("<B", raw[17:18])
    n, m = struct.unpack("<QQ", raw[18:34])
    sizes = struct.unpack(f"<{n}i", raw[34 : 34 + 4 * n])
    pointers = struct.unpack(f"<{n}q", raw[34 + 4 * n : 34 + 12 * n])
    doc_idx = struct.unpack(f"<{m}q", raw[34 + 12 * n : 34 + 12 * n + 8 * m])
    assert len(raw) == 34 + 12 * n + 8 * m
    width, fmt = {8: (2, "H"), 4: (4, "i")}[code]
    data = Path(f"{prefix}.bin").read_bytes()
    docs = [list(struct.unpack(f"<{s}{fmt}", data[p : p + width * s])) for p, s in zip(pointers, sizes, strict=True)]
    return {"version": version, "code": code, "docs": docs, "doc_idx": list(doc_idx), "bin_bytes": len(data)}


def raw_pair(prefix: Path, sizes, pointers=None, doc_idx=None, *, version=1, code=8, width=2, tokens=None,
             n=None, m=None, cut=0) -> Path:
    """An MMIDIDX pair written by hand, field by field (not with the package's writer): uint16 `tokens` (default
    0, 1, 2, ... for the sizes), any field wrong on request, the .idx cut by `cut` bytes; returns the prefix."""
    pointers = [width * sum(sizes[:i]) for i in range(len(sizes))] if pointers is None else pointers
    doc_idx = list(range(len(sizes) + 1)) if doc_idx is None else doc_idx
    n = len(sizes) if n is None else n
    m = len(doc_idx) if m is None else m
    raw = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", version, code, n, m)
    raw += struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(pointers)}q", *pointers)
    raw += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    Path(f"{prefix}.idx").write_bytes(raw[:len(raw) - cut])
    total = sum(sizes) if tokens is None else len(tokens)
    Path(f"{prefix}.bin").write_bytes(struct.pack(f"<{total}H", *(tokens or range(total))))
    return prefix


def write_mmidx(prefix: Path, docs: list[list[int]]) -> Path:
    """An MMIDIDX pair of these documents written by hand (uint16), to check the package's reader independently."""
    return raw_pair(prefix, [len(d) for d in docs], tokens=[t for d in docs for t in d])


def test_build_world_equals_trie_per_document(tmp_path, trie):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t, "id": i} for i, t in enumerate(CORPUS)])
    stats = build_binidx(src, tmp_path / "out" / "c", "world", workers=1, progress=False)
    got = read_mmidx(tmp_path / "out" / "c")
    expected = [trie.encode(t) + [0] for t in CORPUS]
    assert got["version"] == 1 and got["code"] == 8  # uint16
    assert got["docs"] == expected
    assert got["doc_idx"] == list(range(len(CORPUS) + 1))
    assert stats["docs"] == len(CORPUS) and stats["tokens"] == sum(map(len, expected))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.bin", "c.idx"]  # no temp files left


def test_parallel_build_is_byte_identical(tmp_path, world):
    texts = [CORPUS[i % len(CORPUS)][: 50 + 37 * i] + f" #{i}" for i in range(300)]
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    tokenize_file(src, tmp_path / "one", TextFormat(), world, workers=1, progress=False)
    # 2 workers, ~20 small chunks: results must come back in input order
    tokenize_file(src, tmp_path / "two", TextFormat(), world, workers=2, progress=False, chunk_bytes=2000)
    for ext in (".bin", ".idx"):
        assert Path(f"{tmp_path}/one{ext}").read_bytes() == Path(f"{tmp_path}/two{ext}").read_bytes()


def test_json_array_and_parquet_inputs(tmp_path, trie):
    texts = ["first doc", "second 文档", "third\r\nwith CRLF"]
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"content": t} for t in texts], indent=2))
    build_binidx(arr, tmp_path / "a", "world", field="content", workers=1, progress=False)
    assert read_mmidx(tmp_path / "a")["docs"] == [trie.encode(t) + [0] for t in texts]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": texts}), tmp_path / "b.parquet")
    build_binidx(tmp_path / "b.parquet", tmp_path / "b", "world", workers=1, progress=False)
    assert read_mmidx(tmp_path / "b")["docs"] == [trie.encode(t) + [0] for t in texts]


def test_build_with_20b_tokenizer(tmp_path):
    path = shared_file("20B_tokenizer.json")
    tokenizers = pytest.importorskip("tokenizers")
    oracle = tokenizers.Tokenizer.from_file(str(path))
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in CORPUS[:8]])
    build_binidx(src, tmp_path / "neox", str(path), workers=1, progress=False)
    got = read_mmidx(tmp_path / "neox")
    assert got["code"] == 8
    assert got["docs"] == [oracle.encode(t, add_special_tokens=False).ids + [0] for t in CORPUS[:8]]


def test_reader_on_hand_written_pair(tmp_path):
    docs = [[5, 6, 0], [0], [65529, 1, 2, 3, 0]]
    write_mmidx(tmp_path / "h", docs)
    ds = MMapIndexedDataset(tmp_path / "h.idx")  # PREFIX, PREFIX.bin or PREFIX.idx all work
    assert len(ds) == 3 and ds.num_tokens == 9
    assert [ds[i].tolist() for i in range(3)] == docs
    assert ds.tokens.tolist() == sum(docs, [])


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate_bin", r"h\.bin: 16 bytes but h\.idx describes 18 \(truncated or mismatched"),
        ("truncate_idx", r"h\.idx: .* bytes but its header describes .* \(truncated index\?\)"),
        ("swap_bin", r"h\.bin: 4 bytes but h\.idx describes 18 \(truncated or mismatched"),
        ("bad_magic", r"h\.idx: not a Megatron MMIDIDX index"),
        ("no_bin", r"h\.bin: no such file"),
    ],
)
def test_damaged_pairs_are_refused(tmp_path, damage, message):
    write_mmidx(tmp_path / "h", [[5, 6, 0], [0], [65529, 1, 2, 3, 0]])
    write_mmidx(tmp_path / "other", [[7, 0]])
    b, i = Path(f"{tmp_path}/h.bin"), Path(f"{tmp_path}/h.idx")
    if damage == "truncate_bin":
        b.write_bytes(b.read_bytes()[:-2])
    elif damage == "truncate_idx":
        i.write_bytes(i.read_bytes()[:-5])
    elif damage == "swap_bin":
        b.write_bytes(Path(f"{tmp_path}/other.bin").read_bytes())
    elif damage == "bad_magic":
        i.write_bytes(b"XXXXXXXXX" + i.read_bytes()[9:])
    else:
        b.unlink()
    with pytest.raises(UserError, match=message) as e:
        MMapIndexedDataset(tmp_path / "h")
    assert "\n" not in str(e.value)


def test_failed_build_leaves_old_pair_and_no_temp_files(tmp_path, trie):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "keep me"}])
    build_binidx(good, tmp_path / "out", "world", workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("out.*")}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}] * 50 + ['{"text": broken'])
    with pytest.raises(UserError, match=r"bad\.jsonl:51: invalid JSON"):
        build_binidx(bad, tmp_path / "out", "world", workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("out.*")} == before
    assert not list(tmp_path.glob(".*tmp"))
    assert read_mmidx(tmp_path / "out")["docs"] == [trie.encode("keep me") + [0]]


def test_interrupted_build_leaves_nothing(tmp_path, world, monkeypatch):
    import peft_rwkv7.data.build as build

    src = write_jsonl(tmp_path / "big.jsonl", [{"text": f"doc {i} " * 20} for i in range(400)])
    real, calls = build.encode_records, []

    def interrupt_second_chunk(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(build, "encode_records", interrupt_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        tokenize_file(src, tmp_path / "o", TextFormat(), world, workers=1, progress=False, chunk_bytes=4000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


def test_parallel_build_reports_bad_line(tmp_path, world):
    recs = [{"text": f"line {i}"} for i in range(200)]
    recs[150] = {"txt": "oops"}
    src = write_jsonl(tmp_path / "e.jsonl", recs)
    with pytest.raises(UserError, match=r"^.*e\.jsonl:151: missing field 'text' \(keys: 'txt'\)$"):
        tokenize_file(src, tmp_path / "o", TextFormat(), world, workers=2, progress=False, chunk_bytes=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl"]
