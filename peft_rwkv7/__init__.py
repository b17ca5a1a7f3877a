"""rwkv-peft: parameter-efficient fine-tuning for RWKV-7 (import name peft_rwkv7).

The public Python API; the CLI is a thin layer over it. Names resolve on first use, so the CLI
(`rwkv-peft --help`) starts without importing torch.

    from peft_rwkv7 import load_model, MethodConfig, attach, sequence_loss, param_groups
    model = attach(load_model("base.pth"), MethodConfig(kind="state"))
    loss = sequence_loss(model, idx, labels)          # mean token loss over labels != -100

Models: `load_model`, `save_model`, `RWKV7`, `RWKV7Config`, `LayerState`.
Methods: `MethodConfig`, `attach`, `detach`, `disable_adapter` (context manager), `merge` (in memory,
-> plain RWKV7), `trainable_parameters`, `param_groups`, `load_adapter`, `save_adapter`,
`merge_into_pth` (file to file).
Training pieces: `sequence_loss`, `sequence_loss_sum`. Inference: `generate` (a streaming iterator of
text pieces), `evaluate` (loss / perplexity / accuracy of tokenized documents), `load_tokenizer`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_LAZY = {
    "RWKV7": "model", "RWKV7Config": "model", "LayerState": "model", "load_model": "model", "save_model": "model",
    "MethodConfig": "adapters", "attach": "adapters", "detach": "adapters", "disable_adapter": "adapters",
    "merge": "adapters", "trainable_parameters": "adapters", "load_adapter": "adapters", "save_adapter": "adapters",
    "merge_into_pth": "adapters",
    "sequence_loss": "train.losses", "sequence_loss_sum": "train.losses", "param_groups": "train.losses",
    "generate": "infer.generate", "evaluate": "infer.evaluate", "load_tokenizer": "data",
}  # fmt: skip
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
