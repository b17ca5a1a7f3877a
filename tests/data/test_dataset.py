"""make_dataset end to end: token stream equals the trie's, kinds guessed, cache reused, and every
kind of bad input stopped with one line that names the file and line (or the config field)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import peft_rwkv7.data.dataset as dataset_mod
from peft_rwkv7.data import DataConfig, build_binidx, load_eval_docs, make_dataset, read_jsonl_texts
from peft_rwkv7.errors import UserError
from tests.conftest import shared_file
from tests.data.conftest import CORPUS, write_jsonl


def make(tmp_path, world, path, **kw):
    """make_dataset on `path` with data settings `kw` (ctx_len 32 unless given; vocab_size and build are
    make_dataset's own), caching under tmp_path, one worker, no progress bar."""
    vocab, build = kw.pop("vocab_size", None), kw.pop("build", True)
    cfg = DataConfig(path=str(path), **{"ctx_len": 32, **kw})
    return make_dataset(cfg, world, seed=0, vocab_size=vocab, cache_dir=tmp_path / "cache", workers=1, progress=False,
                        build=build)


def test_text_stream_equals_trie_and_kind_is_guessed(tmp_path, world, trie):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in CORPUS])
    ds = make(tmp_path, world, src, vocab_size=65536)
    want = [tok for t in CORPUS for tok in trie.encode(t) + [0]]
    assert ds.sampling == "get" and ds.loss_mask is None
    assert np.asarray(ds.tokens).tolist() == want
    x, y = ds.sample(5)
    assert x.shape == y.shape == (32,) and x.dtype == y.dtype == __import__("torch").int64


def test_binidx_kind_reads_built_pair(tmp_path, world, trie):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in CORPUS[:5]])
    build_binidx(src, tmp_path / "b" / "corpus", "world", workers=1, progress=False)
    for path in (tmp_path / "b" / "corpus", tmp_path / "b" / "corpus.bin"):
        ds = make(tmp_path, world, path, ctx_len=8, vocab_size=65536)
        assert np.asarray(ds.tokens).tolist() == [t for d in CORPUS[:5] for t in trie.encode(d) + [0]]
        assert ds.num_docs == 5


def test_kinds_guessed_from_first_record(tmp_path, world):
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                             {"role": "assistant", "content": "b"}]}])
    sft = write_jsonl(tmp_path / "s.jsonl", [{"question": "a", "answer": "b"}])
    for path in (chat, sft):
        ds = make(tmp_path, world, path)
        assert ds.sampling == "pad" and ds.loss_mask is not None


def test_second_run_uses_cache_and_content_change_rebuilds(tmp_path, world, monkeypatch):
    src = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a b c", "output": "d e f"}] * 20)
    first = make(tmp_path, world, src)
    calls = []
    real = dataset_mod.tokenize_file
    monkeypatch.setattr(dataset_mod, "tokenize_file", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = make(tmp_path, world, src)
    assert calls == [] and np.array_equal(first.tokens, again.tokens)
    assert np.array_equal(first.loss_mask, again.loss_mask)
    make(tmp_path, world, src, prompt_template="Q: {prompt}\nA:")  # rendering option -> new entry
    assert calls == [1]
    write_jsonl(src, [{"instruction": "x", "output": "y"}])  # same name, new content
    changed = make(tmp_path, world, src)
    assert calls == [1, 1] and changed.num_tokens < first.num_tokens
    # a damaged cache entry is rebuilt, not trusted
    for p in (tmp_path / "cache").glob("*.mask"):
        p.write_bytes(p.read_bytes()[:-1])
    make(tmp_path, world, src)
    assert len(calls) == 3


def test_read_jsonl_texts_and_eval_docs(tmp_path, world, trie):
    src = write_jsonl(tmp_path / "e.jsonl", [{"text": t} for t in CORPUS[:6]] + [""])
    assert read_jsonl_texts(src) == CORPUS[:6]
    assert load_eval_docs(src, world) == [trie.encode(t) for t in CORPUS[:6]]


def test_lambada_eval_docs_match_trie(world, trie):
    path = shared_file("lambada_test.jsonl")
    docs = load_eval_docs(path, world)
    assert len(docs) == 5153
    texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    assert all(docs[i] == trie.encode(texts[i]) for i in range(0, 5153, 25))


BAD_LINES = [
    (['{"text": "ok"}', '{"text": "fine"}', '{"text": oops}'], r"d\.jsonl:3: invalid JSON \(Expecting value"),
    (['{"text": "ok"}', '{"body": "x"}'], r"d\.jsonl:2: missing field 'text' \(keys: 'body'\)"),
    (['{"text": 12}'], r"d\.jsonl:1: field 'text' must be a string, got number"),
    (['["text"]'], r"d\.jsonl:1: expected a JSON object, got array"),
    (['{"text": "a\\ud800b"}'], r"d\.jsonl:1: text contains an unpaired surrogate"),
    ([], r"d\.jsonl: no records \(empty dataset\)"),
    (["", "   "], r"d\.jsonl: no records \(empty dataset\)"),
    (['{"messages": "hi"}'], r"d\.jsonl:1: field 'messages' must be an array, got string"),
    (['{"messages": []}'], r"d\.jsonl:1: field 'messages' is empty"),
    (['{"messages": [{"role": "bot", "content": "x"}]}'],
     r"d\.jsonl:1: messages\[0\]: role 'bot' is not one of user, assistant, system"),
    (['{"messages": [{"role": "user"}]}'], r"d\.jsonl:1: messages\[0\]: missing field 'content'"),
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'], r"d\.jsonl:2: missing field 'output'"),
    (['{"instruction": "a", "output": "b"}', '{"output": "b"}'],
     r"d\.jsonl:2: missing prompt field 'instruction', 'input'"),
    (['{"foo": 1, "bar": 2}'], r"d\.jsonl:1: cannot guess data\.kind from keys 'foo', 'bar'"),
]


@pytest.mark.parametrize("lines, message", BAD_LINES)
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, world, lines, message):
    src = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(UserError, match=message) as e:
        make(tmp_path, world, src)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache").glob("*.bin"))  # nothing half-built left behind


def test_token_ids_beyond_model_vocabulary(tmp_path, world):
    src = write_jsonl(tmp_path / "v.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "中文"}, {"text": "c"}])
    with pytest.raises(UserError, match=r"v\.jsonl:3: token id \d+ is beyond the model's vocabulary \(1000 ids"):
        make(tmp_path, world, src, ctx_len=2, vocab_size=1000)
    build_binidx(src, tmp_path / "v", "world", workers=1, progress=False)
    with pytest.raises(UserError, match=r"v\.bin: document 2: token id \d+ is beyond the model's vocabulary"):
        make(tmp_path, world, tmp_path / "v", ctx_len=2, vocab_size=1000)


def test_binidx_pair_errors_through_make_dataset(tmp_path, world):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "some text here"}] * 10)
    build_binidx(src, tmp_path / "p", "world", workers=1, progress=False)
    b = tmp_path / "p.bin"
    b.write_bytes(b.read_bytes()[:-4])
    with pytest.raises(UserError, match=r"p\.bin: \d+ bytes but p\.idx describes \d+ \(truncated or mismatched"):
        make(tmp_path, world, tmp_path / "p", kind="binidx")
    with pytest.raises(UserError, match=r"nope\.idx: no such file"):
        make(tmp_path, world, tmp_path / "nope", kind="binidx")


def test_no_trainable_sample_and_too_short_stream(tmp_path, world):
    src = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "long prompt " * 40, "output": "x"}])
    with pytest.raises(UserError, match=r"s\.jsonl: no sample has a token that carries loss"):
        make(tmp_path, world, src, ctx_len=8, overflow="truncate")
    short = write_jsonl(tmp_path / "t.jsonl", [{"text": "tiny"}])
    with pytest.raises(UserError, match=r"t\.jsonl: \d tokens cannot fill one sample .* data\.sampling: pad"):
        make(tmp_path, world, short, ctx_len=32)


@pytest.mark.parametrize("field, value, message", [
    ("kind", "csv", r"^data\.kind: 'csv' is not one of auto, text, sft, chat, binidx, preference, prompts$"),
    ("sampling", "random", r"^data\.sampling: 'random' is not one of auto, get, pad$"),
    ("overflow", "drop", r"^data\.overflow: 'drop' is not one of split, truncate$"),
    ("ctx_len", 0, r"^data\.ctx_len: must be a positive integer, got 0$"),
    ("ctx_len", "512", r"^data\.ctx_len: must be a positive integer, got '512'$"),
    ("path", "", r"^data\.path: must be a non-empty string"),
    ("prompt_template", "User: {input}", r"^data\.prompt_template: must be a string containing \{prompt\}"),
    ("response_template", "{response}{response}", r"^data\.response_template: must be a string containing"),
    ("prompt_fields", [], r"^data\.prompt_fields: must be a non-empty list"),
])
def test_config_validation_names_the_field(field, value, message):
    cfg = DataConfig(path="x.jsonl")
    setattr(cfg, field, value)
    with pytest.raises(UserError, match=message):
        cfg.validate()
