"""The tokenized-data cache: `build=False` only opens it (several processes: one builds, the others open),
and a build that stops half-way leaves nothing a reader could take for a cache."""

from __future__ import annotations

import numpy as np
import pytest

import peft_rwkv7.data.build as build_mod
import peft_rwkv7.data.dataset as dataset_mod
from peft_rwkv7.data import DataConfig, make_dataset
from tests.data.conftest import write_jsonl

RECORDS = [{"question": f"q {i}", "answer": "a " * (i + 1)} for i in range(12)]


def make(tmp_path, world, path, **kw):
    cfg = DataConfig(path=str(path), ctx_len=16)
    return make_dataset(cfg, world, seed=0, cache_dir=tmp_path / "cache", workers=1, progress=False, **kw)


def test_open_only_never_tokenizes(tmp_path, world, monkeypatch):
    src = write_jsonl(tmp_path / "s.jsonl", RECORDS)
    calls = []
    real = dataset_mod.tokenize_file
    monkeypatch.setattr(dataset_mod, "tokenize_file", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert make(tmp_path, world, src, build=False) is None  # cold cache: nothing opened, nothing written
    assert calls == [] and not any((tmp_path / "cache").glob("*"))
    built = make(tmp_path, world, src)
    opened = make(tmp_path, world, src, build=False)
    assert calls == [1]
    assert np.array_equal(built.tokens, opened.tokens) and np.array_equal(built.loss_mask, opened.loss_mask)
    for p in (tmp_path / "cache").glob("*.idx"):  # a damaged entry is not opened either
        p.write_bytes(p.read_bytes()[:10])
    assert make(tmp_path, world, src, build=False) is None and calls == [1]


def test_interrupted_build_leaves_no_cache(tmp_path, world, monkeypatch):
    src = write_jsonl(tmp_path / "s.jsonl", RECORDS)

    def interrupted(self, tokens, sizes):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(build_mod.BinIdxWriter, "add", interrupted)
        with pytest.raises(KeyboardInterrupt):
            make(tmp_path, world, src)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []  # no pair, no mask, no temp file
    assert make(tmp_path, world, src, build=False) is None
    assert make(tmp_path, world, src).num_docs == len(RECORDS)  # the next run builds it whole
