"""rwkv-peft: parameter-efficient fine-tuning for RWKV-7 (import name peft_rwkv7)."""

from .model import RWKV7, LayerState, RWKV7Config, load_model, save_model

__version__ = "0.1.0"
__all__ = ["RWKV7", "RWKV7Config", "LayerState", "load_model", "save_model", "__version__"]
