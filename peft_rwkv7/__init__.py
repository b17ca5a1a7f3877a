"""rwkv-peft: parameter-efficient fine-tuning for RWKV-7 (import name peft_rwkv7).

`from peft_rwkv7 import load_model, save_model, RWKV7`. The names are resolved on first use so
that the CLI (`rwkv-peft --help`) starts without importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_LAZY = {"RWKV7": "model", "RWKV7Config": "model", "LayerState": "model", "load_model": "model", "save_model": "model"}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
