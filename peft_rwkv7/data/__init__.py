"""Everything between a user's files and token batches.

```python
from peft_rwkv7.data import DataConfig, load_tokenizer, make_dataset, build_binidx
tok = load_tokenizer("world")                       # or a path to a tokenizer.json
build_binidx("corpus.jsonl", "out/corpus", "world")  # -> out/corpus.bin + .idx
ds = make_dataset(DataConfig(path="chat.jsonl", ctx_len=512), tok, seed=0, vocab_size=65536)
x, y = ds.batch(step, micro_step, micro_bsz, grad_accum, rank, world_size)  # [B, ctx_len] each
```
Names resolve on first use, so `rwkv-peft data build` does not import torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "DataConfig": "config",
    "Tokenizer": "tokenizer",
    "WorldTokenizer": "tokenizer",
    "JsonTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "MMapIndexedDataset": "binidx",
    "BinIdxWriter": "binidx",
    "build_binidx": "build",
    "read_jsonl_texts": "records",
    "iter_records": "records",
    "load_eval_docs": "records",
    "TrainData": "dataset",
    "make_dataset": "dataset",
    "IGNORE": "dataset",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
