"""RWKV-7 modules and official checkpoint I/O."""

from .config import CheckpointError, RWKV7Config, expected_shapes, infer_config
from .init import init_weights
from .io import (
    DTYPES,
    atomic_save,
    atomic_write,
    atomic_write_all,
    load_model,
    model_from_state_dict,
    new_model,
    pick_device,
    read_state_dict,
    save_model,
)
from .rwkv7 import RWKV7, Block, ChannelMix, LayerState, TimeMix

__all__ = [
    "RWKV7", "RWKV7Config", "Block", "TimeMix", "ChannelMix", "LayerState", "CheckpointError",
    "load_model", "save_model", "new_model", "init_weights", "infer_config", "expected_shapes",
    "read_state_dict", "model_from_state_dict", "atomic_save", "atomic_write", "atomic_write_all", "DTYPES",
    "pick_device",
]  # fmt: skip
