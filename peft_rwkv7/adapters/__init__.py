"""PEFT methods for RWKV-7: LoRA, PiSSA, DiSHA (Bone/Bat), state tuning, train_parts, full
fine-tuning, on float or bitsandbytes-quantized bases; adapter files, merge into official .pth,
RWKV-PEFT interop. A training loop needs only `attach`, `trainable_parameters` and `save_adapter`.
"""

from .attach import AdaptedRWKV7, attach, base_fingerprint, count_trainable, trainable_parameters
from .config import KINDS, PART_PATTERNS, PROJECTIONS, QUANTS, MethodConfig
from .files import AdapterFile, load_adapter, read_adapter, save_adapter
from .merge import export_rwkv_peft, merge_into_pth

__all__ = [
    "MethodConfig", "AdaptedRWKV7", "AdapterFile", "attach", "trainable_parameters", "count_trainable",
    "save_adapter", "load_adapter", "read_adapter", "merge_into_pth", "export_rwkv_peft",
    "base_fingerprint", "KINDS", "QUANTS", "PROJECTIONS", "PART_PATTERNS",
]  # fmt: skip
