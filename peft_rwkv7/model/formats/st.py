"""web-rwkv / Ai00 safetensors (`.st`): models, state files and LoRA files for web-rwkv's run-time blend.

The layout is what their converter (`assets/scripts/convert_safetensors.py` of web-rwkv and Ai00)
writes from an official `.pth`:

- key names: the official ones, lower-cased (RWKV-7 keys already are); adapter files rename
  `lora_A` -> `lora.0` and `lora_B` -> `lora.1`;
- dtype: every tensor fp16;
- transposed (the last two dimensions swapped): the time-mix low-rank matrices `w1 w2 a1 a2 g1 g2
  v1 v2` ([C, D] -> [D, C] and [D, C] -> [C, D]), `time_state` ([H, N, N], value-major in the
  `.pth` -> key-major here) and `lora.0` (LoRA A [r, in] -> [in, r]); nothing else (the
  projections stay [out, in], the [1, 1, C] vectors and `r_k` [H, N] keep their shapes);
- metadata: `{"format": "pt"}`.

Reading reverses exactly that, so `.pth -> .st -> .pth` gives the fp16-rounded tensors bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import safetensors.torch
import torch

from ..config import CheckpointError
from ..io import atomic_write

ST_METADATA = {"format": "pt"}
# Leaf names whose tensor the converter stores transposed (it matches these as substrings of the key).
TRANSPOSED_LEAVES = ("w1", "w2", "a1", "a2", "g1", "g2", "v1", "v2", "time_state", "lora.0")
_HEADER_LIMIT = 100_000_000  # safetensors' own cap on the JSON header
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
FP16_MAX = 65504.0


def is_transposed(key: str) -> bool:
    """Whether the converter stores `key` (official or `.lora.0` name) with its last two dims swapped."""
    return key.rsplit(".", 1)[-1] in TRANSPOSED_LEAVES or key.endswith(".lora.0")


def _older_st_generation(keys: list[str]) -> str | None:
    """RWKV-4/5/6 as the converter renames them (time_maa -> time_mix, time_faaaa -> time_first)."""
    leaves = {k.split(".", 2)[-1] for k in keys if k.startswith("blocks.0.")}
    if {"att.time_mix_w1", "att.time_mix_x", "att.time_maa_w1", "att.time_maa_x"} & leaves:
        return "RWKV-6"
    if "att.ln_x.weight" in leaves and ({"att.time_first", "att.time_faaaa", "att.time_decay"} & leaves):
        return "RWKV-5"
    if {"att.time_first", "att.time_decay", "att.time_mix_k"} & leaves:
        return "RWKV-4"
    return None


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """({key: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors file, checked against the
    file's size so a truncated file is named with the first tensor it cuts. CheckpointError (one line)."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{p}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > _HEADER_LIMIT:
            raise CheckpointError(f"{p}: not a safetensors file (header length {n})")
        raw = f.read(n)
    if len(raw) < n:
        raise CheckpointError(f"{p}: truncated safetensors file: the header needs {n} bytes, the file has {size - 8}")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{p}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    have = size - 8 - n
    ordered = sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0, 0])[1])
    for key, info in ordered:
        end = info.get("data_offsets", [0, 0])[1]
        if end > have:
            raise CheckpointError(
                f"{p}: truncated: tensor {key} ends at data byte {end}, the file holds {have} bytes of data"
            )
    return header, meta


def read_st(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A web-rwkv/Ai00 `.st` model (or state file) as an official state dict (fp16 tensors, `.pth` shapes).

    CheckpointError naming the file and key: truncated files, other RWKV generations, dtypes or keys
    that are not the converter's.
    """
    p = Path(path)
    header, _ = read_header(p)
    older = _older_st_generation(list(header))
    if older:
        key = next(k for k in header if k.startswith("blocks.0.att.time_"))
        raise CheckpointError(f"{p}: this is an {older} model ({key}); rwkv-peft works with RWKV-7 (x070) only")
    fla = next((k for k in header if k.startswith("model.layers.")), None)
    if fla:
        raise CheckpointError(f"{p}: {fla}: this is the weights file of a Hugging Face directory; pass the directory")
    for key, info in header.items():
        if info.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{p}: {key} has dtype {info.get('dtype')}, expected F16 (or BF16/F32)")
        if key.endswith((".lora.0", ".lora.1")):
            raise CheckpointError(f"{p}: {key}: this is a LoRA file for web-rwkv's blend, not a model")
    try:
        tensors = safetensors.torch.load_file(str(p))
    except Exception as e:  # safetensors raises its own error types on damaged files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{p}: cannot read as safetensors ({first})") from e
    return {k: t.transpose(-2, -1).contiguous() if is_transposed(k) else t for k, t in tensors.items()}


def to_st(sd: dict[str, torch.Tensor], source: str = "model") -> dict[str, torch.Tensor]:
    """Official tensors -> the converter's: fp16, lower-case names, the TRANSPOSED_LEAVES swapped.

    Canonical LoRA names (`.lora_A`, `.lora_B`) become `.lora.0` ([in, r]) and `.lora.1` ([out, r]).
    CheckpointError when a value does not fit in fp16 (|x| > 65504).
    """
    out = {}
    for key, t in sd.items():
        name = key.replace("lora_A", "lora.0").replace("lora_B", "lora.1").lower()
        t = t.detach().to("cpu")
        big = t.float().abs().max().item() if t.numel() else 0.0
        if math.isnan(big) or math.isinf(big):
            raise CheckpointError(f"{source}: {key} has non-finite values (NaN or inf); the model is damaged")
        if not big <= FP16_MAX:
            raise CheckpointError(f"{source}: {key} has values beyond the fp16 range (max |x| = {big:g}); "
                                  f"the .st format stores fp16")
        h = t.to(torch.float16)
        out[name] = (h.transpose(-2, -1) if is_transposed(name) else h).contiguous()
    return out


def write_st(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write already converted (`to_st`) tensors with the converter's metadata, atomically."""
    blob = safetensors.torch.save(tensors, metadata=dict(ST_METADATA))
    atomic_write(path, lambda f: f.write(blob))
