"""`data build` and the token cache's tokenizing (data/build.py), pinned down where mutation testing found the
tests silent: how many workers, which jobs they get, the order and bound of results in flight, the loss mask's
file, the progress bar, what a finished build returns.

Expectations are written out by hand (the jobs of a file we wrote, the trie's tokens) or read back with the
independent MMIDIDX reader of test_binidx."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

import peft_rwkv7.data.build as B
from peft_rwkv7.data.formats import SftFormat, TextFormat
from peft_rwkv7.errors import UserError
from tests.data.conftest import write_jsonl
from tests.data.test_binidx import read_mmidx


class Spy(B.Tokenizer):
    """The trie's tokens (World's), logging which method made them: "one" per encode, "batch" per encode_batch."""

    spec, vocab_size = "spy", 65530

    def __init__(self, trie):
        self.trie, self.calls = trie, []

    def encode(self, text):
        self.calls.append("one")
        return self.trie.encode(text)

    def encode_batch(self, texts):
        self.calls.append("batch")
        return [self.trie.encode(t) for t in texts]


def test_default_workers_are_the_cores_this_process_may_use(monkeypatch):
    if hasattr(os, "sched_getaffinity"):
        assert B.default_workers() == len(os.sched_getaffinity(0))
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert B.default_workers() == 5
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert B.default_workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)  # pinned to one of 8 cores
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert B.default_workers() == 1


def test_a_worker_gets_its_tokenizer_given_or_by_spec(world, trie, monkeypatch):
    monkeypatch.setattr(B, "_worker_tokenizers", {})
    B._init_worker(world)
    assert B._worker_tokenizers == {"world": world}
    monkeypatch.setattr(B, "_worker_tokenizers", {})
    B._init_worker("world")  # a spawned worker loads it by name
    assert isinstance(B._worker_tokenizers["world"], type(world)) and B._worker_tokenizers["world"] is not world
    # a worker's job: one text at a time (encode, never encode_batch: its thread pool deadlocks after a fork)
    spy = Spy(trie)
    B._init_worker(spy)
    tokens, mask, sizes = B._worker_job("spy", TextFormat(), np.uint16, ("lines", [b'{"text": "Hi there"}\n'], 1, "f"))
    assert spy.calls == ["one"] and mask is None and tokens.dtype == np.uint16
    assert tokens.tolist() == trie.encode("Hi there") + [0] and sizes.tolist() == [len(trie.encode("Hi there")) + 1]


def test_a_job_of_lines_or_of_records(world, trie):
    lines = [b'{"text": "a"}\n', b"\n", b'{"text": "bc"}\n']
    tokens, _, sizes = B._encode_job(world, TextFormat(), np.uint16, True, ("lines", lines, 7, "f.jsonl"))
    assert tokens.tolist() == trie.encode("a") + [0] + trie.encode("bc") + [0] and len(sizes) == 2
    with pytest.raises(UserError) as e:  # line numbers from the job's first line
        B._encode_job(world, TextFormat(), np.uint16, True, ("lines", [b"\n", b'{"x": 1}\n'], 7, "f.jsonl"))
    assert str(e.value) == "f.jsonl:8: missing field 'text' (keys: 'x')"
    tokens, _, _ = B._encode_job(world, TextFormat(), np.uint16, False, ("records", [("w", {"text": "bc"})]))
    assert tokens.tolist() == trie.encode("bc") + [0] and tokens.dtype == np.uint16  # the pair's own width
    spy = Spy(trie)
    for batched in (True, False):
        tokens, _, _ = B._encode_job(spy, TextFormat(), np.int32, batched, ("records", [("w", {"text": "bc"})]))
        assert tokens.dtype == np.int32
    assert spy.calls == ["batch", "one"]


def test_jobs_are_raw_line_chunks_of_jsonl_and_record_batches_of_arrays(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(30)])
    jobs = list(B._jobs(src, 100))
    assert all(j[0] == "lines" and j[3] == str(src) for j, _ in jobs)
    assert b"".join(b for j, _ in jobs for b in j[1]) == src.read_bytes()
    assert [u for _, u in jobs] == [sum(map(len, j[1])) for j, _ in jobs] and len(jobs) > 3
    assert [j[2] for j, _ in jobs] == list(np.cumsum([0] + [len(j[1]) for j, _ in jobs[:-1]]) + 1)
    n = B.RECORDS_PER_JOB
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps([{"text": str(i)} for i in range(2 * n + 3)]))
    jobs = list(B._jobs(arr, 100))
    assert [(j[0], len(j[1]), u) for j, u in jobs] == [("records", n, n), ("records", n, n), ("records", 3, 3)]
    assert jobs[2][0][1][-1] == (f"{arr}: item {2 * n + 2}", {"text": str(2 * n + 2)})
    lines = tmp_path / "l.json"  # JSON Lines under a .json name, and a .jsonl whose first line is an array
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [j[0] for j, _ in B._jobs(lines, 100)] == ["lines"]
    odd = tmp_path / "o.jsonl"
    odd.write_text('[{"text": "a"}]\n')
    assert [j[0] for j, _ in B._jobs(odd, 100)] == ["lines"]
    exact = tmp_path / "e.JSON"
    exact.write_text(json.dumps([{"text": str(i)} for i in range(n)]))
    assert [len(j[1]) for j, _ in B._jobs(exact, 100)] == [n]  # no empty batch after a full one
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    pq.write_table(pa.table({"text": ["x", "y"]}), tmp_path / "p.Parquet")
    jobs = list(B._jobs(tmp_path / "p.Parquet", 100))
    assert jobs == [(("records", [(f"{tmp_path / 'p.Parquet'}: row 0", {"text": "x"}),
                                  (f"{tmp_path / 'p.Parquet'}: row 1", {"text": "y"})]), 2)]


def _slow_square(job):
    time.sleep(0.02 * (job % 3))  # later jobs may finish first
    return job * job


_PREFIX: list = []


def _pid(job):
    time.sleep(0.01)
    return os.getpid()


_SET_AFTER_IMPORT = ["at import"]


def _seen_by_worker(job):
    return _SET_AFTER_IMPORT[-1]


def _init(p):
    _PREFIX.append(p)


def _with_prefix(job):
    return f"{_PREFIX[-1]}{job}"


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_ordered_map_keeps_the_order_and_two_jobs_a_worker_in_flight(workers):
    pulled = []

    def jobs():
        for k in range(12):
            pulled.append(k)
            yield k, 10 + k

    got = []
    for result, units in B.ordered_map(_slow_square, jobs(), workers):
        if not got:
            assert len(pulled) == 2 * workers  # the first result waits until 2 per worker are submitted
        got.append((result, units))
    assert got == [(k * k, 10 + k) for k in range(12)]
    out = list(B.ordered_map(_with_prefix, ((k, 1) for k in range(3)), workers, _init, ("p",)))
    assert out == [("p0", 1), ("p1", 1), ("p2", 1)]
    pids = {pid for pid, _ in B.ordered_map(_pid, ((k, 1) for k in range(4 * workers)), workers)}
    assert len(pids) <= workers and os.getpid() not in pids  # that many processes, none of them this one


def test_ordered_map_forks_where_it_can():
    # a forked worker sees what the parent set after import (a loaded tokenizer); Python 3.14 makes forkserver the
    # default start method on Linux, which would not
    if B._START_METHOD != "fork":
        pytest.skip("this platform cannot fork")
    _SET_AFTER_IMPORT.append("in the parent")
    try:
        assert [r for r, _ in B.ordered_map(_seen_by_worker, [(0, 1)], 1)] == ["in the parent"]
    finally:
        _SET_AFTER_IMPORT.pop()


def test_tokenize_file_workers_in_process_or_capped_by_the_chunks(tmp_path, world, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document number {i}"} for i in range(40)])
    size = src.stat().st_size
    asked = []
    real = B.ordered_map

    def spy(fn, jobs, workers, *a, **k):
        asked.append(workers)
        return real(fn, jobs, workers, *a, **k)

    monkeypatch.setattr(B, "ordered_map", spy)
    B.tokenize_file(src, tmp_path / "a", TextFormat(), world, workers=8, progress=False)
    assert asked == []  # one chunk: one worker, in this process
    stats = B.tokenize_file(src, tmp_path / "b", TextFormat(), world, workers=8, progress=False,
                            chunk_bytes=size // 3 + 1)
    assert asked == [3]  # ceil(size / chunk): 2 chunks and a bit
    assert stats["docs"] == 40  # summed over the chunks
    B.tokenize_file(src, tmp_path / "c", TextFormat(), world, workers=0, progress=False, chunk_bytes=100)
    B.tokenize_file(src, tmp_path / "d", TextFormat(), world, workers=-3, progress=False, chunk_bytes=100)
    assert asked == [3]  # fewer than one worker: one, in this process
    monkeypatch.setattr(B, "default_workers", lambda: 2)
    B.tokenize_file(src, tmp_path / "e", TextFormat(), world, progress=False, chunk_bytes=100)
    assert asked == [3, 2]
    docs = read_mmidx(tmp_path / "a")["docs"]
    assert all(read_mmidx(tmp_path / p)["docs"] == docs for p in "bcde")


def test_a_forked_worker_inherits_the_tokenizer_a_spawned_one_loads_it(tmp_path, world, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(40)])
    seen = []
    real = B.ordered_map

    def spy(fn, jobs, workers, initializer=None, initargs=()):
        seen.append(initargs)
        return real(fn, jobs, workers, initializer, initargs)

    monkeypatch.setattr(B, "ordered_map", spy)
    B.tokenize_file(src, tmp_path / "a", TextFormat(), world, workers=2, progress=False, chunk_bytes=100)
    monkeypatch.setattr(B, "_START_METHOD", "spawn")
    monkeypatch.setattr(B, "ordered_map", lambda fn, jobs, workers, initializer=None, initargs=(): (
        seen.append(initargs) or real(fn, jobs, workers, initializer, initargs)))
    B.tokenize_file(src, tmp_path / "b", TextFormat(), world, workers=2, progress=False, chunk_bytes=100)
    assert seen == [(world,), ("world",)]


def test_the_loss_mask_lands_beside_the_pair_and_the_summary(tmp_path, world, trie):
    recs = [{"q": "Hi", "a": "Hello"}, {"q": "Two", "a": "Three"}]
    src = write_jsonl(tmp_path / "s.jsonl", recs)
    fmt = SftFormat(("q",), "a")
    stats = B.tokenize_file(src, tmp_path / "out" / "s", fmt, world, workers=1, progress=False,
                            mask_path=tmp_path / "out" / "s.mask")
    docs = read_mmidx(tmp_path / "out" / "s")["docs"]
    mask = np.fromfile(tmp_path / "out" / "s.mask", np.uint8)
    want_docs, want_mask = [], []
    for r in recs:
        p, a = trie.encode(f"User: {r['q']}\n\nAssistant:"), trie.encode(f" {r['a']}\n\n")
        want_docs.append(p + a + [0])
        want_mask += [0] * len(p) + [1] * (len(a) + 1)
    assert docs == want_docs and mask.tolist() == want_mask
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s.bin", "s.idx", "s.mask"]
    assert stats["docs"] == 2 and stats["tokens"] == sum(map(len, want_docs))
    assert stats["bytes"] == src.stat().st_size and stats["prefix"] == str(tmp_path / "out" / "s")
    assert 0 < stats["seconds"] < 60


def test_an_empty_input_leaves_no_pair_and_no_mask(tmp_path, world):
    src = tmp_path / "e.jsonl"
    src.write_text("\n\n")
    with pytest.raises(UserError) as e:
        B.tokenize_file(src, tmp_path / "o", SftFormat(("q",), "a"), world, workers=1, progress=False,
                        mask_path=tmp_path / "o.mask")
    assert str(e.value) == f"{src}: no records (empty dataset)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl"]


@pytest.mark.parametrize("kind", ["jsonl", "json lines", "json", "parquet"])
def test_the_progress_bar_counts_bytes_or_documents(tmp_path, world, capsys, kind):
    recs = [{"text": f"doc {i}"} for i in range(5)]
    if kind == "jsonl":
        src = write_jsonl(tmp_path / "d.jsonl", recs)
    elif kind == "json lines":
        src = write_jsonl(tmp_path / "d.json", recs)
    elif kind == "json":
        src = tmp_path / "d.json"
        src.write_text(json.dumps(recs))
    else:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        pytest.importorskip("datasets")
        src = tmp_path / "d.parquet"
        pq.write_table(pa.table({"text": [r["text"] for r in recs]}), src)
    B.tokenize_file(src, tmp_path / "o", TextFormat(), world, workers=1)  # a bar by default
    err = capsys.readouterr().err
    assert f"tokenizing {src.name}" in err
    if kind in ("jsonl", "json lines"):
        assert f"{src.stat().st_size}.0/{src.stat().st_size}.0" in err and "B/s" in err  # bytes, scaled
    else:
        assert f"tokenizing {src.name}: 5 doc [" in err and " doc/s]" in err  # documents, no total
    B.tokenize_file(src, tmp_path / "q", TextFormat(), world, workers=1, progress=False)
    assert capsys.readouterr().err == ""


def test_in_this_process_a_job_is_tokenized_as_a_batch(tmp_path, trie):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    spy = Spy(trie)
    B.tokenize_file(src, tmp_path / "o", TextFormat(), spy, workers=1, progress=False)
    assert spy.calls == ["batch"]


def test_build_binidx_takes_a_tokenizer_or_its_name_and_the_field(tmp_path, world, trie, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", [{"body": "first"}, {"body": "second"}])
    B.build_binidx(src, tmp_path / "a", world, field="body", workers=1, progress=False)
    stats = B.build_binidx(src, tmp_path / "b", "world", field="body", progress=False)
    want = [trie.encode("first") + [0], trie.encode("second") + [0]]
    assert read_mmidx(tmp_path / "a")["docs"] == want == read_mmidx(tmp_path / "b")["docs"]
    assert stats["docs"] == 2
    assert capsys.readouterr().err == ""
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "third"}])
    B.build_binidx(text, tmp_path / "c")  # World, the text field and a progress bar by default
    assert read_mmidx(tmp_path / "c")["docs"] == [trie.encode("third") + [0]]
    assert "tokenizing t.jsonl" in capsys.readouterr().err
    B.build_binidx(text, tmp_path / "d", progress=True)
    assert "tokenizing t.jsonl" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(B, "tokenize_file", lambda *a: seen.append(a[4:]))
    B.build_binidx(text, tmp_path / "e", world, workers=3, progress=False)
    B.build_binidx(text, tmp_path / "e", world, workers=None, progress=True)
    assert seen == [(3, False), (None, True)]  # workers and progress handed on


def test_a_file_refused_at_its_first_records_prints_no_progress_bar(tmp_path, world, capsys):
    """Found by fuzzing `data build`: the bar was drawn (twice, when stderr is no terminal) before the one-line error;
    it starts with the first chunk tokenized, so a file refused there prints its error alone."""
    src = write_jsonl(tmp_path / "d.jsonl", [{"x": "no text field"}])
    with pytest.raises(UserError, match=r"d\.jsonl:1: missing field 'text'"):
        B.tokenize_file(src, tmp_path / "a", TextFormat(), world, workers=1, progress=True)
    assert capsys.readouterr().err == ""
    B.tokenize_file(write_jsonl(tmp_path / "e.jsonl", [{"text": "fine"}]), tmp_path / "b", TextFormat(), world,
                    workers=1, progress=True)
    assert "tokenizing e.jsonl" in capsys.readouterr().err  # a file that tokenizes still shows its bar
