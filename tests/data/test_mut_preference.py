"""Preference pairs (data/preference.py), pinned down where mutation testing found the tests silent.

Sides are built by hand here (tokens, loss mask, starts, sizes written out), so each batch, sequence and count is
an expectation of its own; rendered records are compared with the segments written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peft_rwkv7.data import DataConfig
from peft_rwkv7.data.preference import IGNORE, PreferenceData, PreferenceFormat, Side, make_preference_data
from peft_rwkv7.data.preference import preference_format as pformat
from peft_rwkv7.errors import UserError
from tests.data.conftest import write_jsonl


def side(docs: list[tuple[list[int], list[int]]]) -> Side:
    """A side from (tokens, mask) per document, laid end to end."""
    sizes = np.array([len(t) for t, _ in docs], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    tokens = np.array([t for d, _ in docs for t in d], np.uint16)
    mask = np.array([m for _, d in docs for m in d], np.uint8)
    return Side(tokens, mask, starts, sizes)


# record k: prompt tokens (no loss), then the response (loss) ending in 0
CHOSEN = [([5, 6, 7, 8, 0], [0, 0, 1, 1, 1]), ([9, 10, 0], [0, 1, 1]),
          ([11, 12, 13, 14, 15, 16, 0], [0, 0, 0, 1, 1, 1, 1])]
REJECTED = [([5, 6, 20, 0], [0, 0, 1, 1]), ([9, 21, 22, 23, 0], [0, 1, 1, 1, 1]),
            ([11, 12, 13, 24, 0], [0, 0, 0, 1, 1])]


def data(ctx_len: int = 6, seed: int = 0, **kw) -> PreferenceData:
    return PreferenceData(side(CHOSEN), side(REJECTED), ctx_len, seed, **kw)


def test_counts_and_the_summary_line():
    ds = data(ctx_len=6, source="p.jsonl")
    assert ds.num_docs == ds.num_samples == 3
    assert ds.num_tokens == 15 + 14
    assert ds.truncated == 1  # record 2's chosen side, 7 tokens > 6
    assert ds.group_by_length is False and ds.kind == "preference"
    assert ds.describe() == "p.jsonl: 3 preference pairs, 29 tokens, ctx_len 6, 1 responses cut at ctx_len"
    assert data(ctx_len=4).truncated == 4  # chosen 5 and 7, rejected 5 and 5 (a size equal to ctx_len is not cut)
    assert PreferenceData.prompt_lengths(side(CHOSEN)).tolist() == [2, 1, 3]
    assert PreferenceData.prompt_lengths(side(REJECTED)).tolist() == [2, 1, 3]


def test_a_sequence_starts_at_end_of_text_and_scores_the_response_only():
    ds = data(ctx_len=6)
    x, y = ds.sequence(0, 0)
    assert x.tolist() == [0, 5, 6, 7, 8] and y.tolist() == [IGNORE, IGNORE, 7, 8, 0]
    x, y = ds.sequence(1, 1)
    assert x.tolist() == [0, 9, 21, 22, 23] and y.tolist() == [IGNORE, 21, 22, 23, 0]
    x, y = ds.sequence(2, 0)  # cut at ctx_len: its first 6 targets
    assert x.tolist() == [0, 11, 12, 13, 14, 15] and y.tolist() == [IGNORE, IGNORE, IGNORE, 14, 15, 16]
    assert x.dtype == y.dtype == np.int64


def test_a_batch_is_the_chosen_rows_then_the_rejected_ones_padded():
    ds = data(ctx_len=6)
    idx, labels = ds.pairs_batch([1, 0])
    assert idx.dtype == labels.dtype == torch.int64 and idx.shape == (4, 5)
    assert idx.tolist() == [[0, 9, 10, 0, 0], [0, 5, 6, 7, 8], [0, 9, 21, 22, 23], [0, 5, 6, 20, 0]]
    assert labels.tolist() == [[IGNORE, 10, 0, IGNORE, IGNORE], [IGNORE, IGNORE, 7, 8, 0],
                               [IGNORE, 21, 22, 23, 0], [IGNORE, IGNORE, 20, 0, IGNORE]]


def test_in_order_gives_every_pair_once_in_file_order():
    ds = data(ctx_len=6)
    got = list(ds.in_order(2))
    assert len(got) == 2 and got[0][0].shape[0] == 4 and got[1][0].shape[0] == 2
    for (idx, labels), recs in zip(got, ([0, 1], [2]), strict=True):
        want_idx, want_labels = ds.pairs_batch(recs)
        assert torch.equal(idx, want_idx) and torch.equal(labels, want_labels)


def test_a_batch_reads_the_global_samples_of_its_step_micro_step_and_rank():
    ds = data(ctx_len=6, seed=4)
    for step, micro, mb, ga, rank, ws in [(0, 0, 1, 1, 0, 1), (1, 2, 2, 3, 1, 2), (3, 1, 1, 2, 0, 3)]:
        base = ((step * ga + micro) * ws + rank) * mb
        want = ds.pairs_batch([ds.pair_index(base + j) for j in range(mb)])
        got = ds.batch(step, micro, mb, ga, rank, ws)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # defaults: rank 0 of one process
    assert torch.equal(ds.batch(2, 1, 1, 2)[0], ds.pairs_batch([ds.pair_index(5)])[0])
    asked = []  # the sample indices themselves (3 records: different samples often share a record)
    real = ds.pair_index
    ds.pair_index = lambda i, block=1: asked.append(i) or real(i, block)
    ds.batch(1, 2, 2, 3, 1, 2)
    ds.batch(2, 1, 1, 2)
    assert asked == [22, 23, 5]  # ((1 * 3 + 2) * 2 + 1) * 2 and the next; ((2 * 2 + 1) * 1 + 0) * 1


def test_group_by_length_takes_blocks_of_the_global_micro_batch(monkeypatch):
    ds = data(ctx_len=6)
    blocks = []
    monkeypatch.setattr(ds, "pair_index", lambda i, block=1: blocks.append(block) or i % 3)
    ds.batch(0, 0, 2, 1, 0, 3)
    ds.group_by_length = True
    ds.batch(0, 0, 2, 1, 0, 3)
    assert blocks == [1, 1, 6, 6]


def test_pairs_are_ordered_by_their_longer_side_cut_at_ctx_len():
    # EpochOrder gets each pair's length: the longer side's, at most ctx_len (group_by_length's key)
    ds = data(ctx_len=6)
    assert ds._order.lengths.tolist() == [5, 5, 6]


def test_sides_that_differ_or_are_empty_or_fill_ctx_len_are_refused():
    with pytest.raises(ValueError, match="^preference sides differ in their number of records$"):
        PreferenceData(side(CHOSEN), side(REJECTED[:2]), 6, 0)
    empty = Side(np.zeros(0, np.uint16), np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64))
    with pytest.raises(UserError) as e:
        PreferenceData(empty, empty, 6, 0)
    assert str(e.value) == "data: no records (empty dataset)"
    with pytest.raises(UserError) as e:
        data(ctx_len=2, source="p.jsonl")  # prompts of 2, 1 and 3 tokens: records 0 and 2
    assert str(e.value) == ("p.jsonl: record 0: the prompt alone is 2 tokens, data.ctx_len is 2: no response token "
                            "fits (2 such records); raise data.ctx_len or shorten the prompt")
    with pytest.raises(UserError) as e:
        data(ctx_len=3, locate=lambda k: f"p.jsonl:{k + 1}")
    assert str(e.value).startswith("p.jsonl:3: the prompt alone is 3 tokens, data.ctx_len is 3: no response token "
                                   "fits (1 such records)")
    assert data(ctx_len=4).num_docs == 3  # prompts of up to 3 tokens leave room at 4


REC = {"prompt": "Q", "chosen": "Yes", "rejected": "No"}


def test_prompt_fields_joined_skipped_or_given_as_messages():
    fmt = PreferenceFormat(prompt_fields=("a", "b", "c"))
    rec = {"a": " one ", "b": None, "c": "", "chosen": "x", "rejected": "y"}
    assert fmt._prompt(rec, "w") == "one"
    assert fmt._prompt({**rec, "b": "two"}, "w") == "one\ntwo"
    msgs = [{"role": "user", "content": "hi"}]
    assert PreferenceFormat(prompt_fields=("m",))._prompt({"m": msgs}, "w") is msgs
    with pytest.raises(UserError) as e:
        fmt._prompt({"chosen": "x"}, "f:2")
    assert str(e.value) == "f:2: missing prompt field 'a', 'b', 'c' (keys: 'chosen')"
    with pytest.raises(UserError) as e:
        fmt._prompt({"a": " ", "c": "", "chosen": "x"}, "f:2")
    assert str(e.value) == "f:2: field 'a' is empty"
    with pytest.raises(UserError) as e:
        PreferenceFormat(prompt_fields=("m",))._prompt({"m": []}, "f:2")
    assert str(e.value) == "f:2: field 'm' is empty"
    with pytest.raises(UserError) as e:  # messages in two prompt fields: read as text, which they are not
        PreferenceFormat(prompt_fields=("m", "n"))._prompt({"m": msgs, "n": msgs}, "f:2")
    assert str(e.value) == "f:2: field 'm' must be a string, got array"


@pytest.mark.parametrize("value, line", [
    (None, "f:2: field 'chosen' must be a string or an array of chat messages, got null"),
    (3, "f:2: field 'chosen' must be a string or an array of chat messages, got number"),
    (" \n", "f:2: field 'chosen' is empty"),
    ([], "f:2: field 'chosen' is empty"),
])
def test_each_bad_response_is_one_exact_line(value, line):
    with pytest.raises(UserError) as e:
        PreferenceFormat()._response({"chosen": value}, "chosen", "f:2")
    assert str(e.value) == line
    with pytest.raises(UserError) as e:
        PreferenceFormat()._response({"x": 1}, "chosen", "f:2")
    assert str(e.value) == "f:2: missing field 'chosen' (keys: 'x')"


@pytest.mark.parametrize("rendered", ["chosen", "rejected"])
def test_both_sides_are_checked_whichever_is_rendered(rendered):
    fmt = PreferenceFormat(side=rendered)
    with pytest.raises(UserError, match="field 'rejected' is empty"):
        fmt.segments({**REC, "rejected": ""}, "w")
    with pytest.raises(UserError, match="field 'chosen' is empty"):
        fmt.segments({**REC, "chosen": ""}, "w")
    # messages too: a bad one fails while the first cache (chosen) is built, not after it
    for bad, line in [
        ([{"content": "x"}], "w: {s}[0]: missing field 'role' (keys: 'content')"),
        ([{"role": "assistant", "content": 3}], "w: {s}[0]: field 'content' must be a string, got number"),
        ([{"role": "user", "content": "?"}], "w: field '{s}' has no assistant reply with text"),
    ]:
        for s in ("chosen", "rejected"):
            with pytest.raises(UserError) as e:
                fmt.segments({**REC, "prompt": [{"role": "user", "content": "Q"}], s: bad}, "w")
            assert str(e.value) == line.format(s=s)
            with pytest.raises(UserError) as e:  # a string prompt: the sft rendering for the other side
                fmt.segments({**REC, s: bad}, "w")
            assert str(e.value) == line.format(s=s)


def test_string_sides_render_with_the_templates_and_system():
    fmt = PreferenceFormat(side="rejected", prompt_template="Q: {prompt}\n", response_template="A: {response}\n",
                           system="Be brief.")
    assert fmt.segments(REC, "w") == [("System: Be brief.\n\n", False), ("Q: Q\n", False), ("A: No\n", True)]
    assert PreferenceFormat().segments(REC, "w") == [("User: Q\n\nAssistant:", False), (" Yes\n\n", True)]


def test_a_message_prompt_and_string_responses_render_as_chat():
    rec = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Yes", "rejected": [
        {"role": "assistant", "content": "No"}]}
    chosen = PreferenceFormat(system="S").segments(rec, "w")
    rejected = PreferenceFormat(side="rejected", system="S").segments(rec, "w")
    head = [("System: S\n\n", False), ("User: Hi\n\n", False), ("Assistant:", False)]
    assert [s for s in chosen if s[0]] == head + [(" Yes\n\n", True)]
    assert [s for s in rejected if s[0]] == head + [(" No\n\n", True)]
    # a string prompt with message responses: the prompt is one user turn, and the system prompt stays
    rec2 = {"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Yes"}], "rejected": "No"}
    assert [s for s in PreferenceFormat(system="S").segments(rec2, "w") if s[0]] == head + [(" Yes\n\n", True)]


def test_a_response_of_only_user_turns_has_nothing_to_score():
    rec = {**REC, "chosen": [{"role": "user", "content": "more?"}]}
    with pytest.raises(UserError) as e:
        PreferenceFormat().segments(rec, "f:4")
    assert str(e.value) == "f:4: field 'chosen' has no assistant reply with text"


def test_the_format_from_a_recipes_data_section():
    cfg = DataConfig(path="p.jsonl", prompt_fields=["q", "ctx"], chosen_field="good", rejected_field="bad",
                     prompt_template="P {prompt}", response_template="R {response}", system="Sys")
    assert pformat(cfg, "rejected") == PreferenceFormat("rejected", ("q", "ctx"), "good", "bad", "P {prompt}",
                                                        "R {response}", "Sys")
    assert pformat(DataConfig(path="p.jsonl")) == PreferenceFormat()


def test_make_preference_data_refusals(tmp_path, world):
    src = write_jsonl(tmp_path / "p.jsonl", [REC])
    with pytest.raises(UserError) as e:
        make_preference_data(DataConfig(path=str(src), sampling="get"), world, 0)
    assert str(e.value) == ("data.sampling: get does not apply to preference pairs (each sample is one pair); "
                            "use pad or auto")
    for name in ("d.bin", "d.idx"):
        with pytest.raises(UserError) as e:
            make_preference_data(DataConfig(path=str(tmp_path / name)), world, 0)
        assert str(e.value) == f"data.path: {tmp_path / name}: preference data are .jsonl / .json / .parquet records"
    with pytest.raises(ValueError, match="^make_preference_data needs a tokenizer$"):
        make_preference_data(DataConfig(path=str(src)), None, 0)


def test_the_sides_cache_and_its_reuse(tmp_path, world, trie):
    src = write_jsonl(tmp_path / "p.jsonl", [REC, {"prompt": "Q2", "chosen": "Y2", "rejected": "N2"}])
    cfg = DataConfig(path=str(src), ctx_len=32)
    kw = dict(cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert make_preference_data(cfg, world, 0, build=False, **kw) is None
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    ds = make_preference_data(cfg, world, 0, **kw)
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(names) == 6 and all(n.startswith("p-") for n in names)  # two sides: .bin, .idx, .mask each
    assert ds.source == str(src) and ds.num_docs == 2
    x, y = ds.sequence(1, 1)
    prompt, resp = trie.encode("User: Q2\n\nAssistant:"), trie.encode(" N2\n\n")
    assert x.tolist() == [0] + prompt + resp and y.tolist() == [IGNORE] * len(prompt) + resp + [0]
    edited = tmp_path / "edited" / "p.jsonl"  # the same name, other records: another cache, not the old one read
    write_jsonl(edited, [{"prompt": "Q2", "chosen": "Y2", "rejected": "Other"}] * 2)
    other = make_preference_data(DataConfig(path=str(edited), ctx_len=32), world, 0, **kw)
    assert other.sequence(1, 1)[0].tolist() == [0] + prompt + trie.encode(" Other\n\n")
    assert len(list((tmp_path / "cache").iterdir())) == 12
    again = make_preference_data(cfg, world, 0, build=False, **kw)
    assert again is not None and again.num_tokens == ds.num_tokens
    with pytest.raises(UserError) as e:  # the vocabulary check names the record of a too-large id
        make_preference_data(cfg, world, 0, vocab_size=5, **kw)
    assert "p.jsonl:1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError) as e:  # and a prompt that fills ctx_len is named by its line
        make_preference_data(DataConfig(path=str(src), ctx_len=len(prompt) - 1), world, 0, **kw)
    assert str(e.value).startswith(f"{src}:1: the prompt alone is")


def test_the_progress_bar_shows_by_default(tmp_path, world, capsys):
    src = write_jsonl(tmp_path / "p.jsonl", [REC])
    make_preference_data(DataConfig(path=str(src)), world, 0, cache_dir=tmp_path / "c", workers=1)
    assert "tokenizing p.jsonl" in capsys.readouterr().err


def test_message_errors_name_the_record_and_the_field_of_each_side():
    bad_prompt = {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}
    with pytest.raises(UserError) as e:
        PreferenceFormat().segments(bad_prompt, "f:2")
    assert str(e.value) == "f:2: prompt[0]: role 'robot' is not one of user, assistant, system"
    bad_chosen = {"prompt": "p", "chosen": [{"role": "assistant", "content": 3}], "rejected": "b"}
    with pytest.raises(UserError) as e:
        PreferenceFormat().segments(bad_chosen, "f:3")
    assert str(e.value) == "f:3: chosen[0]: field 'content' must be a string, got number"
    bad_rejected = {"prompt": "p", "chosen": "a", "rejected": [{"content": "x"}]}
    with pytest.raises(UserError) as e:
        PreferenceFormat(side="rejected", rejected_field="worse").segments(
            {"prompt": "p", "chosen": "a", "worse": bad_rejected["rejected"]}, "f:4")
    assert str(e.value) == "f:4: worse[0]: missing field 'role' (keys: 'content')"
    only_user = {"prompt": "p", "chosen": "a", "rejected": [{"role": "user", "content": "?"}]}
    with pytest.raises(UserError) as e:
        PreferenceFormat(side="rejected").segments(only_user, "f:5")
    assert str(e.value) == "f:5: field 'rejected' has no assistant reply with text"


def test_missing_fields_list_every_key():
    with pytest.raises(UserError) as e:
        PreferenceFormat()._prompt({"x": 1, "y": 2}, "f:2")
    assert str(e.value) == "f:2: missing prompt field 'prompt' (keys: 'x', 'y')"
    with pytest.raises(UserError) as e:
        PreferenceFormat()._response({"x": 1, "y": 2}, "chosen", "f:2")
    assert str(e.value) == "f:2: missing field 'chosen' (keys: 'x', 'y')"


def test_a_message_prompt_in_a_later_prompt_field_keeps_its_own_assistant_turns_unscored():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Log it."}]
    fmt = PreferenceFormat(prompt_fields=("first", "convo"))
    segs = [s for s in fmt.segments({"convo": msgs, "chosen": "Done.", "rejected": "No."}, "w") if s[0]]
    assert segs == [("User: Hi\n\n", False), ("Assistant:", False), (" Hello.\n\n", False),
                    ("User: Log it.\n\n", False), ("Assistant:", False), (" Done.\n\n", True)]
