"""RWKV World tokenizer for Hugging Face `transformers` (AutoTokenizer with trust_remote_code=True).

rwkv-peft copies this file next to `rwkv_vocab_v20230424.txt` when it exports a World model in the
HF (fla-hub) layout; `tokenizer_config.json` names it (`hf_rwkv_tokenizer.RwkvTokenizer`, the class
name fla-hub uses). It imports only the standard library and transformers, never rwkv-peft.

Encoding is the World vocabulary's rule: greedy longest match over the UTF-8 bytes of the text
(ids 1..65529); id 0 is `<|rwkv_tokenizer_end_of_text|>`. Tokens are byte strings; inside
transformers each is carried as the latin-1 string of its bytes (a one-to-one mapping).
"""

from __future__ import annotations

import ast
import os

from transformers import PreTrainedTokenizer

VOCAB_FILE = "rwkv_vocab_v20230424.txt"
END_OF_TEXT = "<|rwkv_tokenizer_end_of_text|>"


def _read_vocab(path: str) -> dict[bytes, int]:
    """{token bytes: id} from lines `<id> <Python str or bytes literal> <byte length>`."""
    table: dict[bytes, int] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            idx, rest = line.rstrip("\n").split(" ", 1)
            literal = ast.literal_eval(rest[: rest.rindex(" ")])
            token = literal.encode("utf-8") if isinstance(literal, str) else literal
            if len(token) != int(rest[rest.rindex(" ") + 1:]):
                raise ValueError(f"{path}: token {idx} has {len(token)} bytes, the line says {rest.rsplit(' ', 1)[1]}")
            table[token] = int(idx)
    return table


class RwkvTokenizer(PreTrainedTokenizer):
    """The RWKV World vocabulary (`rwkv_vocab_v20230424`) as a transformers slow tokenizer."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs) -> None:
        self.vocab_file = vocab_file
        self._bytes_to_id = _read_vocab(vocab_file)
        self._id_to_bytes = {i: b for b, i in self._bytes_to_id.items()}
        self._longest = max(len(b) for b in self._bytes_to_id)
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            kwargs.setdefault(name, END_OF_TEXT)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return max(self._id_to_bytes) + 1  # ids 0..65529, 0 being end-of-text

    def get_vocab(self) -> dict[str, int]:
        vocab = {b.decode("latin-1"): i for b, i in self._bytes_to_id.items()}
        vocab[END_OF_TEXT] = 0
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        data = text.encode("utf-8")
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                if data[i: i + n] in self._bytes_to_id:
                    out.append(data[i: i + n].decode("latin-1"))
                    i += n
                    break
            else:  # every single byte is in the World vocabulary, so this cannot happen with it
                raise ValueError(f"byte {data[i]:#x} is not in {self.vocab_file}")
        return out

    def _convert_token_to_id(self, token: str) -> int:
        if token == END_OF_TEXT:
            return 0
        try:
            return self._bytes_to_id.get(token.encode("latin-1"), 0)
        except UnicodeEncodeError:  # not one of ours (an added token is looked up before this)
            return 0

    def _convert_id_to_token(self, index: int) -> str:
        if index == 0:
            return END_OF_TEXT
        return self._id_to_bytes[index].decode("latin-1")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        raw = b"".join(b"" if t == END_OF_TEXT else t.encode("latin-1") for t in tokens)
        return raw.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE
        path = os.path.join(save_directory, name)
        if os.path.abspath(path) != os.path.abspath(self.vocab_file):
            with open(self.vocab_file, "rb") as src, open(path, "wb") as dst:
                dst.write(src.read())
        return (path,)
