"""Tokenizers: the RWKV World vocabulary (through `pyrwkv-tokenizer`) and any HF `tokenizer.json`.

Both share one small interface (`Tokenizer`): `encode(text) -> ids`, `encode_batch`, `decode`,
`vocab_size` (largest id + 1) and `eot_id` (0: end-of-text, the RWKV convention for every
vocabulary, World and GPT-NeoX 20B alike). `spec` is the string `load_tokenizer` accepts, so worker
processes can rebuild the same tokenizer; `fingerprint` names the vocabulary for cache keys.
"""

from __future__ import annotations

import ast
import hashlib
import os
from functools import cached_property
from pathlib import Path

from ..errors import UserError

WORLD = "world"
WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
EOT_ID = 0


class Tokenizer:
    """Common interface; see `WorldTokenizer` and `JsonTokenizer`."""

    spec: str
    fingerprint: str
    vocab_size: int
    eot_id: int = EOT_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no end-of-text added). UnicodeEncodeError on unpaired surrogates."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; end-of-text (0) contributes nothing."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, vocab_size={self.vocab_size})"


class WorldTokenizer(Tokenizer):
    """RWKV World `rwkv_vocab_v20230424`: greedy longest match over UTF-8 bytes, ids 1..65529.

    Encoding goes through the Rust `pyrwkv_tokenizer` (token-exact with the `rwkv` package's
    trie, ~8x faster per core). Decoding is done here from the same vocabulary file because the
    Rust decoder panics on token sequences that split a UTF-8 character; ours replaces such
    bytes with U+FFFD, as the `rwkv` package does.
    """

    spec = WORLD
    fingerprint = "world:rwkv_vocab_v20230424"
    vocab_size = 65530  # ids 0..65529; RWKV World models pad the embedding to 65536

    def __init__(self) -> None:
        import pyrwkv_tokenizer

        self.vocab_path = Path(pyrwkv_tokenizer.__file__).parent / WORLD_VOCAB_FILE
        if not self.vocab_path.is_file():
            raise UserError(f"{self.vocab_path}: World vocabulary missing from the pyrwkv-tokenizer install")
        self._rust = pyrwkv_tokenizer.WorldTokenizer(str(self.vocab_path))

    def encode(self, text: str) -> list[int]:
        return self._rust.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._rust.encode_batch(texts)

    @cached_property
    def id_to_bytes(self) -> list[bytes]:
        """`id_to_bytes[i]` = the UTF-8 bytes of token i (b"" for end-of-text)."""
        table = [b""] * self.vocab_size
        with open(self.vocab_path, encoding="utf-8") as f:
            for line in f:
                # "<id> <python str or bytes literal> <byte length>"
                idx, rest = line.rstrip("\n").split(" ", 1)
                literal = ast.literal_eval(rest[: rest.rindex(" ")])
                table[int(idx)] = literal.encode("utf-8") if isinstance(literal, str) else literal
        return table

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Raw bytes of `ids` (for incremental decoding, where a character may span tokens)."""
        _check_ids(ids, self.vocab_size, "the World vocabulary")  # a negative id would index from the end
        table = self.id_to_bytes
        return b"".join(table[i] for i in ids)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class JsonTokenizer(Tokenizer):
    """Any HF `tokenizer.json` (e.g. GPT-NeoX 20B for the RWKV Pile models) through `tokenizers`.

    Encodes without special tokens (RWKV data has none besides end-of-text, which callers add).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import tokenizers

        p = Path(path).resolve()
        self.spec = str(p)
        try:
            raw = p.read_bytes()
            self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except OSError as e:
            raise UserError(f"{p}: cannot read tokenizer file ({e.strerror})") from e
        except Exception as e:  # tokenizers raises plain Exception on malformed JSON
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{p}: not a valid tokenizer.json ({first})") from e
        self.fingerprint = "json:" + hashlib.sha256(raw).hexdigest()[:20]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        _check_ids(ids, self.vocab_size, "the tokenizer's vocabulary")  # `tokenizers` gives "" past it
        return self._tok.decode([i for i in ids if i != EOT_ID], skip_special_tokens=False)


def _check_ids(ids, vocab_size: int, what: str) -> None:
    """ValueError naming the first id outside 0..vocab_size-1."""
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} outside {what} (0..{vocab_size - 1})")


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """`"world"` -> WorldTokenizer; a path to a tokenizer.json -> JsonTokenizer.

    UserError (naming `data.tokenizer`) when `spec` is neither.
    """
    s = str(spec)
    if s.strip().lower() == WORLD:
        return WorldTokenizer()
    p = Path(s).expanduser()
    if p.is_dir() and (p / "tokenizer.json").is_file():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"data.tokenizer: {s!r} is neither 'world' nor an existing tokenizer.json file")
    return JsonTokenizer(p)
