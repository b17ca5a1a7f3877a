"""What mutation testing of data/dataset.py found untested (scripts/mutation.sh dataset; docs/mutation.md): get
sampling under a loss mask, sample dtypes, a fresh TrainData's settings and lines, held-out documents and what is
left of the stream, the vocabulary scan's edges, the cached mask, the eval notes.

The token stream is np.arange(N) where it can be, so every token names its own position."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from peft_rwkv7.data import DataConfig, TrainData, make_dataset
from peft_rwkv7.data.dataset import _without, eval_count
from peft_rwkv7.errors import UserError
from tests.data.conftest import write_jsonl
from tests.data.test_binidx import write_mmidx
from tests.data.test_sampling import stream_data


def test_get_sampling_masks_each_label_by_its_own_position():
    n, ctx = 4000, 16
    mask = (np.arange(n) % 3 != 0).astype(np.uint8)  # tokens at multiples of 3 carry no loss
    ds = stream_data(n, ctx, seed=2, mask=mask)
    for i in range(40):
        x, y = ds.sample(i)
        targets = x + 1  # the stream names positions: x[t] + 1 is the position of label t
        want = torch.where(targets % 3 == 0, torch.full_like(targets, -100), targets)
        assert torch.equal(y, want), i


def test_samples_are_int64_on_both_paths_and_both_kinds_of_piece():
    tokens = np.arange(40, dtype=np.uint16)  # a binidx stream's dtype
    sizes = np.array([3, 25, 12], np.int32)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for sampling in ("get", "pad"):
        ds = TrainData(tokens, None, starts, sizes, 8, sampling, True, seed=1)
        for i in range(ds.num_samples):  # pad: first pieces and later ones
            x, y = ds.sample(i)
            assert x.dtype == y.dtype == torch.int64, (sampling, i)


def test_a_fresh_train_data_is_ungrouped_and_holds_nothing_out():
    ds = stream_data(1000, 8, sampling="pad", sizes=[1, 0, 2, 5, 992])
    assert ds.group_by_length is False and ds.held_out == [] and ds.held_out_masks is None and ds.eval_note == ""
    assert ds.empty_docs == 2  # documents of one token (the end of text) or none
    assert ds.describe() == "data: 5 docs, 1000 tokens, pad sampling, 127 samples/epoch of ctx_len 8"
    ds.group_by_length = True
    assert ds.describe() == "data: 5 docs, 1000 tokens, pad sampling, grouped by length, 127 samples/epoch of ctx_len 8"
    # sample(i) is the ungrouped order's sample i, grouped or not
    assert all(torch.equal(ds.sample(i)[1], ds.sample(i, 1)[1]) for i in range(0, 127, 5))


def test_a_batch_is_rank_zero_of_one_process_by_default():
    ds = stream_data(5000, 8, seed=3)
    x, y = ds.batch(4, 1, 3, 2)
    want = ds.batch(4, 1, 3, 2, 0, 1)
    assert torch.equal(x, want[0]) and torch.equal(y, want[1])


def test_the_refusals_name_data_by_default_and_say_what_to_do():
    with pytest.raises(UserError) as e:
        stream_data(10, 16)
    assert str(e.value) == ("data: 10 tokens cannot fill one sample of ctx_len+1 = 17; lower data.ctx_len or use "
                            "data.sampling: pad")
    mask = np.zeros(20, np.uint8)
    with pytest.raises(UserError) as e:
        stream_data(20, 4, sampling="pad", sizes=[20], mask=mask)
    assert str(e.value) == ("data: no sample has a token that carries loss (every response cut off? raise "
                            "data.ctx_len or use data.overflow: split)")


def test_what_is_left_of_the_stream_after_holding_documents_out():
    tokens = np.arange(12)
    mask = (np.arange(12) % 2).astype(np.uint8)
    sizes = np.array([3, 2, 4, 3], np.int32)
    starts = np.array([0, 3, 5, 9])
    t, m, s, z = _without(tokens, mask, starts, sizes, np.array([1, 3]))
    assert t.tolist() == [0, 1, 2, 5, 6, 7, 8] and m.tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert s.tolist() == [0, 3] and z.tolist() == [3, 4]


def test_held_out_text_documents_lose_their_end_of_text_only(tmp_path):
    docs = [[5, 6, 7, 0], [8, 9, 10], [11, 0], [12, 13, 14, 15]] * 5  # some without a final 0 (another tool's)
    cfg = DataConfig(path=str(write_mmidx(tmp_path / "b", docs)), ctx_len=4, eval_split=0.4)
    ds = make_dataset(cfg, None, seed=0, progress=False)
    assert len(ds.held_out) == 8
    for d in ds.held_out:
        original = next(o for o in docs if o[:len(d)] == d)
        assert d == (original[:-1] if original[-1] == 0 else original)


@pytest.mark.parametrize("at", [0, 7], ids=["first token", "later"])
@pytest.mark.parametrize("bad", [0, 1], ids=["id == vocab", "id > vocab"])
def test_the_vocabulary_scan_finds_an_id_at_the_edge_anywhere(tmp_path, at, bad):
    docs = [[1, 2, 3, 0], [4, 5, 6, 7, 0]]
    pos = [(0, 0), (1, 3)][at == 7]
    docs[pos[0]][pos[1]] = 100 + bad
    cfg = DataConfig(path=str(write_mmidx(tmp_path / "b", docs)), ctx_len=4)
    with pytest.raises(UserError) as e:
        make_dataset(cfg, None, seed=0, vocab_size=100, progress=False)
    assert str(e.value) == (f"{tmp_path}/b.bin: document {pos[0]}: token id {100 + bad} is beyond the model's "
                            "vocabulary (100 ids; wrong data.tokenizer?)")


def test_the_cached_loss_mask_is_read_only(tmp_path, world):
    recs = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(6)]
    src = write_jsonl(tmp_path / "s.jsonl", recs)
    cfg = DataConfig(path=str(src), ctx_len=16, eval_path=str(src))  # nothing held out: the cache's own mask
    for _ in range(2):  # built, then opened from the cache
        ds = make_dataset(cfg, world, seed=0, cache_dir=tmp_path / "cache", workers=1, progress=False)
        assert isinstance(ds.loss_mask, np.memmap)
        with pytest.raises(ValueError, match="read-only"):
            ds.loss_mask[0] = 1


def test_held_out_pairs_are_named_after_their_file(tmp_path, world):
    recs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
    src = write_jsonl(tmp_path / "p.jsonl", recs)
    cfg = DataConfig(path=str(src), ctx_len=32, eval_split=0.25)
    data = make_dataset(cfg, world, seed=0, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert data.source == str(src) and data.held_out_pairs.source == f"{src} (held out)"


def test_the_eval_notes(tmp_path):
    path = str(tmp_path / "x.jsonl")
    assert eval_count(DataConfig(path=path, eval_path=path), 100, "documents") == (0, "")
    assert eval_count(DataConfig(path=path, eval_split=0.1), 100, "documents") == (10, "")
    assert eval_count(DataConfig(path=path, eval_split=0.0), 100, "documents") == (
        0, "no eval: data.eval_split is 0 and no data.eval_path")
    assert json.dumps(eval_count(DataConfig(path=path, eval_split=0.1), 5, "pairs")) == json.dumps(
        [0, "no eval: 10% of 5 pairs is less than one (set data.eval_split, or a held-out file as data.eval_path)"])
