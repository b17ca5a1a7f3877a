"""Shared fixtures for the data tests: the `rwkv` package's pure-Python trie (the World oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Text that stresses a byte-level greedy tokenizer: CJK, emoji (ZWJ sequences, skin tones, flags),
# combining marks, other scripts, code with tabs, CRLF, control characters, runs of spaces.
CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "中文分词测试：今天天气很好，我们去公园散步吧。日本語のテキストも、カタカナとひらがな。한국어 문장입니다.",
    "emoji 😀😂🥲 👍🏽 👩‍💻 ❤️‍🔥 🇯🇵🇫🇷 🏳️‍🌈 family 👨‍👩‍👧‍👦",
    "combining: e\u0301 a\u0308 n\u0303 \u1e9b\u0323 "
    "Z\u0351\u0358\u035c\u0361a\u0352l\u034fg\u0360o \u0915\u094d\u0937",
    "Arabic مرحبا بالعالم, Hebrew שלום, Thai สวัสดีครับ, Hindi नमस्ते दुनिया, Greek Καλημέρα",
    "def f(x):\n\tif x > 0:\n\t\treturn {'a': [1, 2, 3]}\n\treturn None\t# tab\tseparated\n",
    "windows\r\nline\r\nendings\r\n\r\nand a blank line\r\n",
    "control \x00\x01\x1b[31mred\x1b[0m \x7f and spaces     many      spaces\u00a0nbsp\u3000ideographic",
    "",
    " ",
    "\n\n\n",
    ("very long line " * 5000) + "🙂" * 300 + "末尾" * 2000,
    "x" * 100_000,
    "http://example.com/path?q=1&r=2#frag <html><body class=\"x\">&amp;</body></html>",
    "数学 ∀x∈ℝ: x² ≥ 0 ∑∫∂ √2 ≈ 1.414 — “quotes” ‘single’ … ½ ¾ ℃",
]


@pytest.fixture(scope="session")
def trie():
    """rwkv.rwkv_tokenizer.TRIE_TOKENIZER on the vocab file shipped inside the `rwkv` package."""
    rwkv = pytest.importorskip("rwkv")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))


def write_jsonl(path: Path, records: list) -> Path:
    """One JSON value per line (records may be dicts or raw strings, written as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path
