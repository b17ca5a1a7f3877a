"""Golden sft / chat cases: the rendered text, and which tokens carry loss, written out by hand.

The token ids of each hand-written piece come from the `rwkv` package's trie (the oracle); the
pieces, their order and their loss flags are the expectations."""

from __future__ import annotations

import torch

from peft_rwkv7.data import DataConfig, make_dataset
from tests.data.conftest import write_jsonl

L = 64


def expected(trie, pieces: list[tuple[str | int, bool]], ctx_len: int = L):
    """[0] + pieces as one document; (input_ids, labels) with labels -100 where no loss, padded."""
    seq, loss = [0], [False]
    for text, carries in pieces:
        ids = [text] if isinstance(text, int) else trie.encode(text)
        seq += ids
        loss += [carries] * len(ids)
    x = seq[:-1] + [0] * (ctx_len - len(seq) + 1)
    y = [t if c else -100 for t, c in zip(seq[1:], loss[1:], strict=True)] + [-100] * (ctx_len - len(seq) + 1)
    return torch.tensor(x), torch.tensor(y)


def one_sample(tmp_path, records, world, **cfg):
    src = write_jsonl(tmp_path / "d.jsonl", records)
    ds = make_dataset(DataConfig(path=str(src), ctx_len=cfg.pop("ctx_len", L), **cfg), world, seed=0,
                      cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert ds.num_samples == 1
    return ds.sample(0)


def assert_sample(got, want):
    assert torch.equal(got[0], want[0]), (got[0].tolist(), want[0].tolist())
    assert torch.equal(got[1], want[1]), (got[1].tolist(), want[1].tolist())


def test_sft_alpaca_default_template(tmp_path, world, trie):
    rec = {"instruction": "  Translate to French.", "input": "Good morning", "output": "Bonjour \n"}
    got = one_sample(tmp_path, [rec], world)
    assert_sample(got, expected(trie, [
        ("User: Translate to French.\nGood morning\n\nAssistant:", False),
        (" Bonjour\n\n", True),
        (0, True),  # end-of-text after the response is trained
    ]))
    loss_ids = [t for t in got[1].tolist() if t != -100]
    assert world.decode(loss_ids) == " Bonjour\n\n" and loss_ids[-1] == 0


def test_sft_empty_input_custom_fields_template_and_system(tmp_path, world, trie):
    rec = {"q": "2+2?", "ctx": "", "a": "4"}
    got = one_sample(tmp_path, [rec], world, kind="sft", prompt_fields=["q", "ctx"], response_field="a",
                     prompt_template="### Question\n{prompt}\n### Answer\n", response_template="{response}",
                     system="Be terse.")
    assert_sample(got, expected(trie, [
        ("System: Be terse.\n\n### Question\n2+2?\n### Answer\n", False),
        ("4", True),
        (0, True),
    ]))


def test_sft_query_response_guessed(tmp_path, world, trie):
    got = one_sample(tmp_path, [{"query": "hi", "response": "hello"}], world)
    assert_sample(got, expected(trie, [("User: hi\n\nAssistant:", False), (" hello\n\n", True), (0, True)]))


# The multi-turn conversation below (and its ShareGPT form in test_sharegpt.py) as training renders
# it: (text or token id, carries loss).
MULTI_TURN_RENDERED = [
    ("System: You are helpful.\n\nUser: Hi\nthere\n\nAssistant:", False),
    (" Hello! 你好\n\n", True),
    ("User: 2+2?\n\nAssistant:", False),
    (" 4\n\n", True),
    (0, True),
]


def test_chat_multi_turn_with_system(tmp_path, world, trie):
    msgs = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi\r\n\r\n\nthere"},  # blank lines collapse: "\n\n" ends a turn
        {"role": "assistant", "content": "Hello! 你好"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": " 4 "},
    ]
    got = one_sample(tmp_path, [{"messages": msgs}], world)
    assert_sample(got, expected(trie, MULTI_TURN_RENDERED))
    loss_text = world.decode([t for t in got[1].tolist() if t != -100])
    assert loss_text == " Hello! 你好\n\n 4\n\n"


def test_chat_ending_with_user_trains_no_end_token(tmp_path, world, trie):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
    got = one_sample(tmp_path, [{"messages": msgs}], world, system="Sys")
    assert_sample(got, expected(trie, [
        ("System: Sys\n\nUser: a\n\nAssistant:", False),
        (" b\n\n", True),
        ("User: c\n\n", False),
        (0, False),
    ]))


def test_sft_pair_trains_like_one_turn_chat(tmp_path, world):
    a = one_sample(tmp_path / "a", [{"prompt": "Why?", "completion": "Because."}], world)
    b = one_sample(tmp_path / "b", [{"messages": [{"role": "user", "content": "Why?"},
                                                  {"role": "assistant", "content": "Because."}]}], world)
    assert_sample(a, b)


def test_text_pad_trains_every_token_and_end(tmp_path, world, trie):
    got = one_sample(tmp_path, [{"text": "plain text"}], world, sampling="pad")
    assert_sample(got, expected(trie, [("plain text", True), (0, True)]))


def test_long_sft_split_and_truncate(tmp_path, world, trie):
    rec = {"instruction": "word " * 30, "output": "answer " * 30}
    prompt = trie.encode("User: " + ("word " * 30).strip() + "\n\nAssistant:")
    resp = trie.encode(" " + ("answer " * 30).strip() + "\n\n") + [0]
    seq = [0] + prompt + resp
    loss = [False] * (1 + len(prompt)) + [True] * len(resp)
    ctx = 16
    src = write_jsonl(tmp_path / "d.jsonl", [rec])
    split = make_dataset(DataConfig(path=str(src), ctx_len=ctx), world, seed=0, cache_dir=tmp_path / "c",
                         workers=1, progress=False)
    # pieces k cover targets seq[1 + k*ctx : 1 + (k+1)*ctx]; those with no loss target are dropped
    want = []
    for k in range(-(-(len(seq) - 1) // ctx)):
        tgt = range(1 + k * ctx, min(1 + (k + 1) * ctx, len(seq)))
        if any(loss[t] for t in tgt):
            x = [seq[t - 1] for t in tgt] + [0] * (ctx - len(tgt))
            y = [seq[t] if loss[t] else -100 for t in tgt] + [-100] * (ctx - len(tgt))
            want.append((x, y))
    got = sorted((split.sample(i)[0].tolist(), split.sample(i)[1].tolist()) for i in range(split.num_samples))
    assert got == sorted(want) and len(want) >= 2
    # truncate keeps the first ctx_len targets of the document: the prompt and 4 response tokens
    trunc_cfg = DataConfig(path=str(src), ctx_len=len(prompt) + 4, overflow="truncate")
    trunc = make_dataset(trunc_cfg, world, seed=0, cache_dir=tmp_path / "c", workers=1, progress=False)
    x, y = trunc.sample(0)
    assert trunc.num_samples == 1
    assert x.tolist() == seq[: len(prompt) + 4]
    assert y.tolist() == [-100] * len(prompt) + resp[:4]
