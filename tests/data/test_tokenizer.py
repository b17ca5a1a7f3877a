"""Tokenizers are token-exact against their oracles: the `rwkv` package's trie (World) and HF
`tokenizers` loading the same tokenizer.json (GPT-NeoX 20B)."""

from __future__ import annotations

import random

import pytest

from peft_rwkv7.data import load_tokenizer
from peft_rwkv7.errors import UserError
from tests.conftest import shared_file
from tests.data.conftest import CORPUS

# Code point ranges for fuzzing: ASCII, Latin-1, Cyrillic, combining marks, CJK, Hangul,
# emoji, private use, supplementary planes (no surrogates: they cannot be UTF-8 encoded).
RANGES = [(0x00, 0x7F), (0x80, 0x24F), (0x400, 0x4FF), (0x300, 0x36F), (0x4E00, 0x9FFF),
          (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0xE000, 0xE0FF), (0x20000, 0x2A6DF), (0xFE00, 0xFE0F)]


def fuzz_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 200)):
            lo, hi = rng.choice(RANGES)
            chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


def test_world_matches_trie_on_corpus(world, trie):
    for text in CORPUS:
        assert world.encode(text) == trie.encode(text), repr(text[:60])


def test_world_matches_trie_on_fuzz_and_batch(world, trie):
    texts = fuzz_strings(300) + CORPUS
    expected = [trie.encode(t) for t in texts]
    assert [world.encode(t) for t in texts] == expected
    assert world.encode_batch(texts) == expected


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_world_decode_matches_trie_bytes(world, trie):
    for text in CORPUS + fuzz_strings(50, seed=1):
        ids = trie.encode(text)
        assert world.decode(ids) == text
        assert world.decode_bytes(ids) == trie.decodeBytes(ids)
    # tokens that hold part of a UTF-8 character: bytes exact, text gets U+FFFD instead of a crash
    partial = [i for i, b in trie.idx2token.items() if not _is_utf8(b)][:50]
    assert len(partial) == 50
    assert world.decode_bytes(partial) == trie.decodeBytes(partial)
    assert "\ufffd" in world.decode(partial)
    assert world.decode(trie.encode("a") + partial[:1]) == "a\ufffd"
    assert world.decode([0] + trie.encode("ab") + [0]) == "ab"  # end-of-text has no text


def test_world_vocabulary_is_the_tries(world, trie):
    assert world.vocab_size == 65530 and world.eot_id == 0
    assert max(trie.idx2token) == world.vocab_size - 1
    table = world.id_to_bytes
    assert table[0] == b""
    assert all(table[i] == b for i, b in trie.idx2token.items())


def test_json_tokenizer_matches_tokenizers_library():
    path = shared_file("20B_tokenizer.json")
    tokenizers = pytest.importorskip("tokenizers")
    oracle = tokenizers.Tokenizer.from_file(str(path))
    tok = load_tokenizer(str(path))
    assert tok.vocab_size == 50277 and tok.eot_id == 0
    assert oracle.token_to_id("<|endoftext|>") == 0
    texts = CORPUS + fuzz_strings(100, seed=2)
    for t in texts:
        ids = tok.encode(t)
        assert ids == oracle.encode(t, add_special_tokens=False).ids
        assert 0 not in ids or "\x00" in t or "<|endoftext|>" in t
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    plain = "Hello world, 中文 and code:\n\tx = 1\r\n"
    assert tok.decode([0] + tok.encode(plain) + [0]) == plain


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match=r"^data\.tokenizer: 'wrold' is neither 'world' nor"):
        load_tokenizer("wrold")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=r"tokenizer\.json: not a valid tokenizer\.json") as e:
        load_tokenizer(bad)
    assert "\n" not in str(e.value)
    assert load_tokenizer("World").spec == "world"
