"""What mutation testing of data/binidx.py found untested (scripts/mutation.sh binidx; docs/mutation.md): the
index's refusals, each as its exact line; an empty pair; entries of size 0; the writer's dtype, counts, folders and
its order of renames; which paths count as a binidx dataset.

Pairs are written by hand from the MMIDIDX layout (struct, not the package's writer), and read back by hand."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from peft_rwkv7.data import binidx
from peft_rwkv7.data.binidx import BinIdxWriter, MMapIndexedDataset, is_binidx, split_prefix, token_dtype
from peft_rwkv7.errors import UserError
from tests.data.test_binidx import raw_pair, read_mmidx


@pytest.mark.parametrize("fields, line", [
    (dict(cut=1, sizes=[], doc_idx=[]), "h.idx: truncated index (33 bytes, header alone is 34)"),
    (dict(version=2, sizes=[2]), "h.idx: index version 2, only version 1 is supported"),
    (dict(code=6, sizes=[2]), "h.idx: token dtype code 6 is not an integer type"),
    (dict(sizes=[2, -1, 3], pointers=[0, 4, 2], tokens=[1] * 4), "h.idx: negative entry size (corrupt index)"),
    (dict(sizes=[2, 1, 3], pointers=[0, 4, 8]), "h.idx: entry 2 does not start where entry 1 ends (corrupt index)"),
    (dict(sizes=[2, 1, 3], pointers=[2, 4, 6]), "h.idx: entry 0 does not start where entry -1 ends (corrupt index)"),
    (dict(sizes=[2, 1, 3], doc_idx=[1, 2, 3]), "h.idx: doc_idx does not cover entries 0..3 (corrupt index)"),
    (dict(sizes=[2, 1, 3], doc_idx=[0, 1, 2]), "h.idx: doc_idx does not cover entries 0..3 (corrupt index)"),
    (dict(sizes=[2, 1, 3], doc_idx=[0, 2, 1, 3]), "h.idx: doc_idx does not cover entries 0..3 (corrupt index)"),
])
def test_each_damaged_index_is_refused_in_its_own_line(tmp_path, fields, line):
    raw_pair(tmp_path / "h", **fields)
    with pytest.raises(UserError) as e:
        MMapIndexedDataset(tmp_path / "h")
    assert str(e.value) == f"{tmp_path}/{line}"


def test_an_empty_pair_and_entries_of_size_zero_are_read(tmp_path):
    for doc_idx in ([0], []):  # no entry; with doc_idx [0] as our writer makes it, or none: the header alone
        empty = MMapIndexedDataset(raw_pair(tmp_path / "e", [], doc_idx=doc_idx))
        assert (len(empty), empty.num_tokens, empty.tokens.dtype) == (0, 0, np.dtype("<u2"))
    ds = MMapIndexedDataset(raw_pair(tmp_path / "z", [2, 0, 3], doc_idx=[0, 1, 1, 3]))  # an empty entry, doc_idx flat
    assert [ds[i].tolist() for i in range(3)] == [[0, 1], [], [2, 3, 4]]


def test_the_token_map_is_read_only(tmp_path):
    ds = MMapIndexedDataset(raw_pair(tmp_path / "h", [3]))
    with pytest.raises(ValueError, match="read-only"):
        ds.tokens[0] = 7
    assert Path(f"{tmp_path}/h.bin").read_bytes() == struct.pack("<3H", 0, 1, 2)


def test_the_writer_stores_its_dtype_counts_every_batch_and_makes_folders(tmp_path):
    prefix = tmp_path / "a" / "b" / "out"  # folders that do not exist yet
    with BinIdxWriter(prefix, np.uint16) as w:
        w.add(np.array([5, 6, 0], np.int64), np.array([3]))  # int64 ids: stored as the pair's uint16
        w.add(np.array([65535, 0, 9, 0], np.int64), [2, 2])
        assert w.num_tokens == 7
    got = read_mmidx(prefix)
    assert got["code"] == 8 and got["bin_bytes"] == 14
    assert got["docs"] == [[5, 6, 0], [65535, 0], [9, 0]] and got["doc_idx"] == [0, 1, 2, 3]


def test_a_writer_with_no_entries_leaves_an_empty_pair(tmp_path):
    # it wrote one pointer for no entry: an index 8 bytes longer than its header said, which its own reader refused
    with BinIdxWriter(tmp_path / "none", np.uint16):
        pass
    got = read_mmidx(tmp_path / "none")
    assert got["docs"] == [] and got["doc_idx"] == [0] and got["bin_bytes"] == 0
    assert len(MMapIndexedDataset(tmp_path / "none")) == 0


def test_the_old_index_is_gone_before_the_new_bin_lands_and_a_late_failure_keeps_its_error(tmp_path, monkeypatch):
    raw_pair(tmp_path / "p", [2])  # an old pair
    seen, real = [], os.replace

    def spy(src, dst):
        seen.append((Path(dst).name, Path(f"{tmp_path}/p.idx").exists()))
        real(src, dst)

    monkeypatch.setattr(binidx.os, "replace", spy)
    with BinIdxWriter(tmp_path / "p", np.uint16) as w:
        w.add(np.array([1, 0]), [2])
    # a reader never pairs the new .bin with the old .idx: that is deleted first, the new one lands last
    assert seen == [("p.bin", False), ("p.idx", False)]

    def fail_on_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(binidx.os, "replace", fail_on_idx)
    with pytest.raises(OSError, match="disk full"):  # not a FileNotFoundError from the clean-up
        with BinIdxWriter(tmp_path / "q", np.uint16) as w:
            w.add(np.array([1, 0]), [2])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_which_paths_name_a_binidx_dataset(tmp_path):
    assert split_prefix("x/data.bin") == split_prefix("x/data.idx") == split_prefix("x/data") == "x/data"
    assert split_prefix("x/data.json") == "x/data.json"
    both, idx_only, bin_only = tmp_path / "both", tmp_path / "i", tmp_path / "b"
    raw_pair(both, [1])
    Path(f"{idx_only}.idx").write_bytes(b"")
    Path(f"{bin_only}.bin").write_bytes(b"")
    for p in (both, idx_only, bin_only):  # half a pair counts too: opening it then names the missing file
        assert is_binidx(p) and is_binidx(f"{p}.bin") and is_binidx(f"{p}.idx")
    assert not is_binidx(tmp_path / "nothing") and not is_binidx(tmp_path / "nothing.bin")
    with pytest.raises(UserError, match=r"i\.bin: no such file"):
        MMapIndexedDataset(idx_only)


def test_token_ids_take_uint16_up_to_65536_words_and_int32_beyond():
    assert token_dtype(50277) is np.uint16 and token_dtype(65536) is np.uint16  # ids 0..65535
    assert token_dtype(65537) is np.int32 and token_dtype(70000) is np.int32 and token_dtype(200_000) is np.int32
