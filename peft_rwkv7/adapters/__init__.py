"""PEFT methods for RWKV-7: LoRA, PiSSA, DiSHA (Bone/Bat), state tuning, train_parts, full
fine-tuning, on float or bitsandbytes-quantized bases; adapter files, merge into official .pth,
RWKV-PEFT interop. A training loop needs only `attach`, `trainable_parameters` and `save_adapter`.

Names resolve on first use, so reading a recipe (MethodConfig) does not import peft/bitsandbytes.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "AdaptedRWKV7": "methods", "attach": "methods", "base_fingerprint": "methods", "count_trainable": "methods",
    "trainable_parameters": "methods",
    "KINDS": "config", "PART_PATTERNS": "config", "PROJECTIONS": "config", "QUANTS": "config", "MethodConfig": "config",
    "AdapterFile": "files", "load_adapter": "files", "read_adapter": "files", "save_adapter": "files",
    "export_rwkv_peft": "pth_merge", "merge_into_pth": "pth_merge",
    "detach": "lifecycle", "disable_adapter": "lifecycle", "merge": "lifecycle",
}  # fmt: skip
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
