"""The preference data kind: rendering and loss masks per side (ids from the `rwkv` package's trie), pair
batches, the sampling order, and one-line errors naming file and line."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7.data import DataConfig, make_dataset
from peft_rwkv7.data.dataset import resolve_format
from peft_rwkv7.data.preference import PreferenceData
from peft_rwkv7.errors import UserError
from tests.data.conftest import write_jsonl

L = 64


def pieces_to_xy(trie, pieces):
    """[0] + pieces as one sequence: (inputs, labels) unpadded, labels -100 where no loss."""
    seq, loss = [0], [False]
    for text, carries in pieces:
        ids = [text] if isinstance(text, int) else trie.encode(text)
        seq += ids
        loss += [carries] * len(ids)
    return seq[:-1], [t if c else -100 for t, c in zip(seq[1:], loss[1:], strict=True)]


def load(tmp_path, records, world, **cfg) -> PreferenceData:
    src = write_jsonl(tmp_path / "p.jsonl", records)
    cfg.setdefault("ctx_len", L)
    return make_dataset(DataConfig(path=str(src), **cfg), world, seed=0, cache_dir=tmp_path / "cache", workers=1,
                        progress=False)


def rows(idx, labels, row):
    n = int((labels[row] != -100).nonzero().max()) + 1  # the last target of a side carries loss (end-of-text)
    return idx[row, :n].tolist(), labels[row, :n].tolist()


def test_string_pairs_render_like_sft_with_loss_on_each_response(tmp_path, world, trie):
    rec = {"prompt": " Log day 3. ", "chosen": "Ship's log, day 3.", "rejected": "It was a nice day. "}
    ds = load(tmp_path, [rec], world)  # kind auto finds the pair fields
    assert ds.kind == "preference" and ds.num_samples == 1
    idx, labels = ds.batch(0, 0, 1, 1)
    assert idx.shape == labels.shape and idx.shape[0] == 2
    prompt = ("User: Log day 3.\n\nAssistant:", False)
    assert rows(idx, labels, 0) == pieces_to_xy(trie, [prompt, (" Ship's log, day 3.\n\n", True), (0, True)])
    assert rows(idx, labels, 1) == pieces_to_xy(trie, [prompt, (" It was a nice day.\n\n", True), (0, True)])
    assert resolve_format(DataConfig(path=str(tmp_path / "p.jsonl")))[0] == "preference"


def test_chat_prompt_and_message_responses(tmp_path, world, trie):
    rec = {"question": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                        {"role": "user", "content": "Log it."}],
           "good": [{"role": "assistant", "content": "Ship's log."}], "bad": "No."}
    ds = load(tmp_path, [rec], world, kind="preference", prompt_fields=["question"], chosen_field="good",
              rejected_field="bad", system="You keep the log.")
    idx, labels = ds.batch(0, 0, 1, 1)
    # the prompt's own assistant turn carries no loss: only the response is scored
    prompt = [("System: You keep the log.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Log it.\n\nAssistant:", False)]
    assert rows(idx, labels, 0) == pieces_to_xy(trie, prompt + [(" Ship's log.\n\n", True), (0, True)])
    assert rows(idx, labels, 1) == pieces_to_xy(trie, prompt + [(" No.\n\n", True), (0, True)])


def test_batches_pair_chosen_and_rejected_rows_and_cover_every_record(tmp_path, world):
    recs = [{"prompt": f"Log day {i}.", "chosen": f"Ship's log, day {i}." + " Calm." * i, "rejected": f"day {i}"}
            for i in range(6)]
    ds = load(tmp_path, recs, world)
    idx, labels = ds.batch(0, 0, 3, 1)
    assert idx.shape[0] == 6 and idx.shape[1] <= L
    order = [ds.pair_index(j) for j in range(6)]
    assert sorted(order) == list(range(6))  # an epoch is a permutation of the records
    assert sorted(ds.pair_index(j) for j in range(6, 12)) == list(range(6))  # and so is the next one
    assert order == [ds.pair_index(j) for j in range(6)]  # a pure function of (seed, sample index)
    for j in range(3):
        k = order[j]
        x_c, _ = ds.sequence(k, 0)
        x_r, _ = ds.sequence(k, 1)
        assert idx[j, : len(x_c)].tolist() == x_c.tolist() and idx[3 + j, : len(x_r)].tolist() == x_r.tolist()
    # micro-batches and ranks read the global samples of TrainData.batch
    a = torch.cat([ds.batch(0, m, 1, 3)[0][:1, :5] for m in range(3)])
    assert torch.equal(a, ds.batch(0, 0, 3, 1)[0][:3, :5])


def test_long_responses_are_cut_at_ctx_len(tmp_path, world):
    rec = {"prompt": "Log.", "chosen": "wind " * 100, "rejected": "No."}
    ds = load(tmp_path, [rec], world, ctx_len=16)
    idx, labels = ds.batch(0, 0, 1, 1)
    assert idx.shape == (2, 16) and ds.truncated == 1
    assert (labels[0] != -100).sum() > 0


@pytest.mark.parametrize("rec, message", [
    ({"chosen": "a", "rejected": "b"}, "missing prompt field 'prompt'"),
    ({"prompt": "p", "rejected": "b"}, "missing field 'chosen'"),
    ({"prompt": "p", "chosen": "a", "rejected": "  "}, "field 'rejected' is empty"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string or an array of chat messages"),
    ({"prompt": "p", "chosen": [], "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
     "field 'chosen' has no assistant reply"),
])
def test_bad_records_are_one_line_errors_naming_file_and_line(tmp_path, world, rec, message):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(UserError) as e:
        load(tmp_path, [good, rec], world, kind="preference")
    text = str(e.value)
    assert "\n" not in text and message in text and "p.jsonl:2" in text, text


def test_a_prompt_that_fills_ctx_len_is_an_error_naming_its_line(tmp_path, world):
    recs = [{"prompt": "short", "chosen": "a", "rejected": "b"},
            {"prompt": "word " * 40, "chosen": "a", "rejected": "b"}]
    with pytest.raises(UserError) as e:
        load(tmp_path, recs, world, ctx_len=24)
    text = str(e.value)
    assert "p.jsonl:2" in text and "the prompt alone is" in text and "data.ctx_len is 24" in text, text


def test_preference_kind_refuses_get_sampling(tmp_path, world):
    # (data.eval_split holds out pairs: tests/train/test_eval_split.py)
    rec = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(UserError, match="data.sampling"):
        load(tmp_path, [rec], world, sampling="get")
