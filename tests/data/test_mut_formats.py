"""data/formats.py directly (found by `scripts/mutation.sh formats`): the loss flag of each piece, the tokens and
masks encode_records makes, encode_segments (what `rwkv-peft chat` feeds the model), and every one-line error.

Expectations are written out by hand; token ids of a hand-written text come from the `rwkv` package's trie."""

from __future__ import annotations

import numpy as np
import pytest

from peft_rwkv7.data.formats import (
    ChatFormat,
    SftFormat,
    TextFormat,
    clean_turn,
    encode_records,
    encode_segments,
    merge,
)
from peft_rwkv7.errors import UserError


def test_text_trains_every_token():
    assert TextFormat().segments({"text": "a b"}, "f:1") == [("a b", True)]
    assert TextFormat("body").segments({"body": "x"}, "f:1") == [("x", True)]
    with pytest.raises(UserError, match=r"^f:1: missing field 'text' \(keys: 'body'\)$"):
        TextFormat().segments({"body": "x"}, "f:1")


def test_merge_joins_equal_flags_only():
    assert merge([("a", False), ("b", False), ("c", True), ("d", True), ("e", False)]) == \
        [("ab", False), ("cd", True), ("e", False)]
    assert merge([]) == []


def test_encode_segments_tokenizes_each_run_on_its_own(world, trie):
    segs = [("User: hi", False), ("\n\nAssistant:", False), (" Hello there.\n\n", True), ("User: bye\n\n", False)]
    runs = ["User: hi\n\nAssistant:", " Hello there.\n\n", "User: bye\n\n"]
    pieces = [trie.encode(t) for t in runs]
    ids, flags = encode_segments(world, segs)
    assert ids == pieces[0] + pieces[1] + pieces[2]
    assert flags == [False] * len(pieces[0]) + [True] * len(pieces[1]) + [False] * len(pieces[2])


@pytest.mark.parametrize("batched", [True, False])
def test_encode_records_tokens_mask_and_sizes(world, trie, batched):
    """Two chat documents: one ending with a reply (its end-of-text trains), one ending with a user turn (not)."""
    fmt = ChatFormat()
    recs = [("f:1", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}),
            ("f:2", {"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "B"}]})]
    tokens, mask, sizes = encode_records(fmt, world, recs, np.int32, batched=batched)
    d1 = [(trie.encode("User: Hi\n\nAssistant:"), False), (trie.encode(" Yo\n\n"), True), ([0], True)]
    d2 = [(trie.encode("Assistant:"), False), (trie.encode(" A\n\n"), True), (trie.encode("User: B\n\n"), False),
          ([0], False)]
    want_tokens = [t for ids, _ in d1 + d2 for t in ids]
    want_mask = [f for ids, f in d1 + d2 for _ in ids]
    assert tokens.dtype == np.int32 and tokens.tolist() == want_tokens
    assert mask.dtype == bool and mask.tolist() == want_mask
    assert sizes.dtype == np.int32 and sizes.tolist() == [sum(len(i) for i, _ in d1), sum(len(i) for i, _ in d2)]


class Spy:
    """A tokenizer that records which of its methods encode_records calls."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def encode(self, text):
        self.calls.append("encode")
        return self.tok.encode(text)

    def encode_batch(self, texts):
        self.calls.append("encode_batch")
        return self.tok.encode_batch(texts)


def test_batched_picks_encode_batch_and_unbatched_never_does(world):
    """batched=False is for forked workers, where the multi-threaded encode_batch must not run."""
    recs = [("f:1", {"text": "a"}), ("f:2", {"text": "b"})]
    for kwargs, want in (({}, ["encode_batch"]), ({"batched": True}, ["encode_batch"]),
                         ({"batched": False}, ["encode", "encode"])):
        spy = Spy(world)
        encode_records(TextFormat(), spy, recs, np.int32, **kwargs)
        assert spy.calls == want, kwargs


def test_a_document_without_segments_is_one_end_of_text_without_loss(world):
    class Empty:
        has_mask = True

        def segments(self, rec, where):
            return []

    tokens, mask, sizes = encode_records(Empty(), world, [("f:1", {})], np.int32)
    assert tokens.tolist() == [0] and mask.tolist() == [False] and sizes.tolist() == [1]


def test_encode_records_text_has_no_mask_and_ends_each_document(world, trie):
    tokens, mask, sizes = encode_records(TextFormat(), world, [("f:1", {"text": "ab"}), ("f:2", {"text": "c d"})],
                                         np.uint16, batched=False)
    assert mask is None and tokens.dtype == np.uint16
    assert tokens.tolist() == trie.encode("ab") + [0] + trie.encode("c d") + [0]
    assert sizes.tolist() == [len(trie.encode("ab")) + 1, len(trie.encode("c d")) + 1]


def test_encode_records_names_the_record_with_an_unpaired_surrogate(world):
    recs = [("f:1", {"text": "fine"}), ("f:2", {"text": "bad \ud800 text"})]
    for batched in (True, False):
        with pytest.raises(UserError, match=r"^f:2: text contains an unpaired surrogate \(not valid Unicode\)$"):
            encode_records(TextFormat(), world, recs, np.int32, batched=batched)


def test_clean_turn():
    assert clean_turn("  a\r\n\r\n\r\nb \n \t\n c\n\n") == "a\nb \n c"


def test_sft_prompt_fields_system_and_templates():
    fmt = SftFormat(("instruction", "input"), "output", system="Be\n\nbrief")
    segs = fmt.segments({"instruction": " Do it ", "input": None, "output": " done "}, "f:1")
    assert segs == [("System: Be\nbrief\n\n", False), ("User: Do it\n\nAssistant:", False), (" done\n\n", True)]
    segs = SftFormat(("q", "ctx"), "a").segments({"q": "Q", "ctx": "  ", "a": "A"}, "f:1")  # empty parts skipped
    assert segs == [("User: Q\n\nAssistant:", False), (" A\n\n", True)]
    segs = SftFormat(("q",), "a", "<{prompt}>", "[{response}]").segments({"q": "Q", "a": "A"}, "f:1")
    assert segs == [("<Q>", False), ("[A]", True)]
    with pytest.raises(UserError, match=r"^f:3: missing prompt field 'q', 'ctx' \(keys: 'a', 'x'\)$"):
        SftFormat(("q", "ctx"), "a").segments({"a": "A", "x": 1}, "f:3")
    with pytest.raises(UserError, match=r"^f:4: field 'a' must be a string, got number$"):
        SftFormat(("q",), "a").segments({"q": "Q", "a": 3}, "f:4")
    with pytest.raises(UserError, match=r"^f:5: field 'q' must be a string, got array$"):
        SftFormat(("q",), "a").segments({"q": [], "a": "A"}, "f:5")


def test_chat_roles_system_and_sharegpt():
    fmt = ChatFormat(system="Sys")
    msgs = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": " A1 "}]
    assert fmt.segments({"messages": msgs}, "f:1") == [
        ("System: Sys\n\n", False), ("User: U1\n\n", False), ("Assistant:", False), (" A1\n\n", True)]
    own = [{"role": "system", "content": "Mine"}] + msgs  # a conversation's own system message wins
    assert fmt.segments({"messages": own}, "f:1")[0] == ("System: Mine\n\n", False)
    assert ChatFormat().segments({"messages": msgs}, "f:1")[0] == ("User: U1\n\n", False)
    share = [{"from": "human", "value": "U1"}, {"from": "gpt", "value": "A1"}]
    assert ChatFormat().segments({"conversations": share}, "f:1") == ChatFormat().segments({"messages": msgs}, "f:1")
    # a message with both spellings is read as {"role", "content"}
    both = [{"role": "user", "content": "U1", "from": "gpt", "value": "other"}]
    assert ChatFormat().segments({"messages": both}, "f:1") == [("User: U1\n\n", False)]


@pytest.mark.parametrize("rec,message", [
    ({"other": 1, "x": 2}, r"^f:1: missing field 'messages' \(keys: 'other', 'x'\)$"),
    ({"messages": "hi"}, r"^f:1: field 'messages' must be an array, got string$"),
    ({"messages": []}, r"^f:1: field 'messages' is empty$"),
    ({"messages": [3]}, r"^f:1: messages\[0\] must be an object with 'role' and 'content' \(or ShareGPT 'from' and "
                        r"'value'\), got number$"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     r"^f:1: messages\[1\]: role 'bot' is not one of user, assistant, system$"),
    ({"messages": [{"role": "user"}]}, r"^f:1: messages\[0\]: missing field 'content' \(keys: 'role'\)$"),
    ({"messages": [{"content": "a"}]}, r"^f:1: messages\[0\]: missing field 'role' \(keys: 'content'\)$"),
    ({"messages": [{"role": 1, "content": "a"}]}, r"^f:1: messages\[0\]: field 'role' must be a string, got number$"),
    ({"conversations": [{"from": "bot", "value": "a"}]},
     r"^f:1: conversations\[0\]: from 'bot' is not one of human, gpt, system, user, assistant$"),
    ({"conversations": [{"from": "gpt"}]}, r"^f:1: conversations\[0\]: missing field 'value' \(keys: 'from'\)$"),
    ({"conversations": [{"from": 2, "value": "a"}]},
     r"^f:1: conversations\[0\]: field 'from' must be a string, got number$"),
])
def test_chat_errors_name_the_record_and_the_message(rec, message):
    with pytest.raises(UserError, match=message):
        ChatFormat().segments(rec, "f:1")
