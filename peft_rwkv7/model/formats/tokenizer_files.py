"""Tokenizer files for an exported HF directory of a World-vocabulary model (V = 65536).

What fla-hub's World models carry, written from what this machine has:
- `rwkv_vocab_v20230424.txt`: the World vocabulary, copied from the `pyrwkv-tokenizer` package;
- `hf_rwkv_tokenizer.py`: rwkv-peft's own `RwkvTokenizer` (a transformers slow tokenizer, greedy
  longest match over UTF-8 bytes), loaded by `AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`;
- `tokenizer_config.json`: `tokenizer_class: RwkvTokenizer` and `auto_map` to that file, end-of-text
  `<|rwkv_tokenizer_end_of_text|>` (id 0) as bos/eos/unk/pad;
- `special_tokens_map.json`, `added_tokens.json` (`{"<|rwkv_tokenizer_end_of_text|>": 0}`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..io import atomic_write

TOKENIZER_MODULE = "hf_rwkv_tokenizer.py"  # imported where its names are used: it imports transformers (~1 s)
WORLD_VOCAB_SIZE = 65536  # World models pad the 65530 ids to 65536 rows


def world_vocab_path() -> Path | None:
    """The World vocabulary shipped in pyrwkv-tokenizer (None when that package is missing)."""
    from .hf_rwkv_tokenizer import VOCAB_FILE

    try:
        import pyrwkv_tokenizer
    except ImportError:
        return None
    p = Path(pyrwkv_tokenizer.__file__).parent / VOCAB_FILE
    return p if p.is_file() else None


def tokenizer_config() -> dict:
    """tokenizer_config.json naming RwkvTokenizer (fla-hub's class name) through auto_map."""
    from .hf_rwkv_tokenizer import END_OF_TEXT

    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT, "pad_token": END_OF_TEXT}
    return {
        "tokenizer_class": "RwkvTokenizer",
        "auto_map": {"AutoTokenizer": ["hf_rwkv_tokenizer.RwkvTokenizer", None]},
        "use_fast": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000,
        "added_tokens_decoder": {"0": {"content": END_OF_TEXT, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True}},
        **special,
    }


def write_world_tokenizer(out_dir: str | os.PathLike) -> list[str]:
    """Write the World tokenizer files into `out_dir`; returns their names ([] when the vocabulary is missing)."""
    from .hf_rwkv_tokenizer import END_OF_TEXT, VOCAB_FILE

    vocab = world_vocab_path()
    if vocab is None:
        return []
    d = Path(out_dir)
    module = (Path(__file__).parent / TOKENIZER_MODULE).read_bytes()
    special = {k: v for k, v in tokenizer_config().items() if k.endswith("_token")}
    files = {
        VOCAB_FILE: vocab.read_bytes(),
        TOKENIZER_MODULE: module,
        "tokenizer_config.json": (json.dumps(tokenizer_config(), indent=2) + "\n").encode(),
        "special_tokens_map.json": (json.dumps(special, indent=2) + "\n").encode(),
        "added_tokens.json": (json.dumps({END_OF_TEXT: 0}) + "\n").encode(),
    }
    for name, data in files.items():
        atomic_write(d / name, lambda f, data=data: f.write(data))
    return list(files)
