"""What mutation testing of how a recipe's data section becomes a dataset found untested (data/dataset.py's
make_dataset, resolve_format and _sft_format; `scripts/mutation.sh dataset_make`, docs/mutation.md): sft fields
half given, the system prompt with guessed fields, the kind guessed from a path or a record, every refusal's exact
line, what preference data are handed on, and the progress bar by default."""

from __future__ import annotations

import numpy as np
import pytest

import peft_rwkv7.data.dataset as dataset_mod
from peft_rwkv7.data import DataConfig, build_binidx, make_dataset
from peft_rwkv7.data.dataset import resolve_format
from peft_rwkv7.errors import UserError
from tests.data.conftest import write_jsonl
from tests.data.test_binidx import write_mmidx
from tests.data.test_dataset import make


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """The default cache (~/.cache/rwkv-peft/data) under a temporary home: no mistake writes into the real one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


QA = [{"question": f"what is {i}?", "answer": f"it is {i}."} for i in range(6)]


@pytest.mark.parametrize("given", [{"prompt_fields": ["question"]}, {"response_field": "answer"}])
def test_sft_fields_half_given_take_the_other_from_the_known_pair_that_fits(tmp_path, world, given):
    src = write_jsonl(tmp_path / "qa.jsonl", QA)
    full = make(tmp_path, world, src, kind="sft", prompt_fields=["question"], response_field="answer")
    half = make(tmp_path, world, src, kind="sft", **given)
    assert np.array_equal(half.tokens, full.tokens) and np.array_equal(half.loss_mask, full.loss_mask)


def test_guessed_sft_fields_keep_the_system_prompt(tmp_path, world, trie):
    src = write_jsonl(tmp_path / "qa.jsonl", QA)
    ds = make(tmp_path, world, src, system="Be brief.")  # kind and fields guessed
    head = trie.encode("System: Be brief.\n\n")
    assert np.asarray(ds.tokens[:len(head)]).tolist() == head and not ds.loss_mask[:len(head)].any()
    plain = make(tmp_path, world, src)
    assert ds.num_tokens == plain.num_tokens + len(QA) * len(head)


def test_records_whose_kind_or_sft_fields_cannot_be_told_say_so_in_one_exact_line(tmp_path, world):
    src = write_jsonl(tmp_path / "d.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(UserError) as e:
        make(tmp_path, world, src, kind="sft")
    assert str(e.value) == (f"{src}:1: cannot tell the sft prompt/response fields from keys 'foo', 'bar'; "
                            "set data.prompt_fields and data.response_field")
    with pytest.raises(UserError) as e:
        make(tmp_path, world, src)
    assert str(e.value) == (f"{src}:1: cannot guess data.kind from keys 'foo', 'bar'; set data.kind to text, sft "
                            "or chat (and the field names)")
    with pytest.raises(ValueError) as e:
        make(tmp_path, None, write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}]))
    assert str(e.value) == "make_dataset needs a tokenizer for jsonl / json / parquet data"


def test_the_kind_is_guessed_from_an_idx_path_and_a_missing_file_is_named(tmp_path, world):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "some words here"}] * 8)
    build_binidx(src, tmp_path / "b" / "corpus", "world", workers=1, progress=False)
    ds = make(tmp_path, world, tmp_path / "b" / "corpus.idx", ctx_len=4)
    assert ds.num_docs == 8 and resolve_format(DataConfig(path=str(tmp_path / "b" / "corpus.idx")))[0] == "binidx"
    missing = tmp_path / "gone.jsonl"
    with pytest.raises(UserError) as e:
        make(tmp_path, world, missing)
    assert str(e.value) == f"{missing}: no such file"


def test_a_record_with_one_side_of_a_pair_is_not_preference_data(tmp_path):
    for extra in ({"chosen": "yes"}, {"rejected": "no"}):
        src = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello there", **extra}])
        assert resolve_format(DataConfig(path=str(src)))[0] == "text"
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "yes", "rejected": "no"}])
    assert resolve_format(DataConfig(path=str(src)))[0] == "preference"


def test_preference_data_resolve_to_the_chosen_side(tmp_path):
    rec = {"prompt": "pick one", "chosen": "the good answer", "rejected": "the bad answer"}
    src = write_jsonl(tmp_path / "p.jsonl", [rec])
    kind, fmt = resolve_format(DataConfig(path=str(src)))
    text = "".join(t for t, _ in fmt.segments(rec, "p.jsonl:1"))
    assert kind == "preference" and "the good answer" in text and "the bad answer" not in text


PAIRS = [{"prompt": f"question {i}", "chosen": f"good {i} 中文", "rejected": f"bad {i}"} for i in range(12)]


def test_preference_data_get_the_callers_cache_vocabulary_build_and_grouping(tmp_path, world):
    src = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    assert make(tmp_path, world, src, build=False) is None  # not cached yet: opening only builds nothing
    assert not (tmp_path / "cache").exists()
    with pytest.raises(UserError, match=r"p\.jsonl:1: token id \d+ is beyond the model's vocabulary \(1000 ids"):
        make(tmp_path, world, src, vocab_size=1000)
    pairs = make(tmp_path, world, src, group_by_length=True)
    assert pairs.group_by_length is True and len(list((tmp_path / "cache").glob("*.idx"))) == 2  # both sides
    assert make(tmp_path, world, src, build=False).num_docs == pairs.num_docs == len(PAIRS)  # now cached


@pytest.mark.parametrize("kind", ["text", "preference"])
def test_the_tokenizing_progress_bar_shows_by_default_and_not_when_asked(tmp_path, world, capsys, kind):
    records = [{"text": "a few words"}] * 20 if kind == "text" else PAIRS[:4]
    src = write_jsonl(tmp_path / f"{kind}.jsonl", records)
    cfg = DataConfig(path=str(src), ctx_len=32)
    make_dataset(cfg, world, seed=0, cache_dir=tmp_path / "quiet", workers=1, progress=False)
    assert "tokenizing" not in capsys.readouterr().err
    make_dataset(cfg, world, seed=0, cache_dir=tmp_path / "cache", workers=1)
    assert f"tokenizing {kind}.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["text", "preference"])
def test_the_default_cache_is_under_the_users_home(tmp_path, world, monkeypatch, kind):
    monkeypatch.setattr(dataset_mod, "DEFAULT_CACHE_DIR", dataset_mod.Path("~/cache-here"))
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "a few words"}] * 20 if kind == "text" else PAIRS)
    make_dataset(DataConfig(path=str(src), ctx_len=32), world, seed=0, workers=1, progress=False)
    assert len(list((tmp_path / "home" / "cache-here").glob("d-*.idx"))) == (1 if kind == "text" else 2)


def test_a_binidx_pair_without_documents_is_refused_by_name(tmp_path, world):
    write_mmidx(tmp_path / "empty", [])
    with pytest.raises(UserError) as e:
        make(tmp_path, world, tmp_path / "empty", kind="binidx")
    assert str(e.value) == f"{tmp_path / 'empty'}.bin: no documents (empty dataset)"


def _docs(tokens, mask) -> dict:
    """{a document's tokens: its loss mask}, documents ending at each end-of-text (0)."""
    out, a = {}, 0
    tokens, mask = np.asarray(tokens).tolist(), np.asarray(mask).tolist()
    for i, t in enumerate(tokens):
        if t == 0:
            out[tuple(tokens[a:i + 1])] = tuple(mask[a:i + 1])
            a = i + 1
    return out


def test_sft_documents_left_to_train_keep_their_loss_masks_after_some_are_held_out(tmp_path, world):
    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"what is {i}?", "answer": f"{i}."} for i in range(60)])
    whole = make(tmp_path, world, src, eval_split=0.0)
    data = make(tmp_path, world, src, eval_split=0.1)
    assert len(data.held_out) == 6 and data.eval_note == ""
    assert data.loss_mask is not None and len(data.loss_mask) == data.num_tokens
    kept, every = _docs(data.tokens, data.loss_mask), _docs(whole.tokens, whole.loss_mask)
    assert len(kept) == 54 and all(every[doc] == mask for doc, mask in kept.items())


def test_held_out_documents_with_nothing_to_score_leave_a_note(tmp_path, world):
    # the end-of-text alone, held out as nothing (one document with text: a file of only empty ones is refused)
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "word"}] + [{"text": ""}] * 19)
    data = make(tmp_path, world, src, ctx_len=4, eval_split=0.1)
    assert data.held_out == [] and data.num_docs == 18
    assert data.eval_note == "no eval: the held-out documents have nothing to score (set data.eval_path)"
