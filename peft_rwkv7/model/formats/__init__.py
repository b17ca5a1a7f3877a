"""Model file formats: the official `.pth`, web-rwkv/Ai00 `.st` and Hugging Face (fla-hub) directories.

`detect_format` says which one a path holds; `read_other` reads a `.st` or HF model as an official
state dict (what `model.io.read_state_dict`, and so `load_model`, dispatches to); `write_model`
writes an official state dict in any of them; `convert` goes from one file to another.
All three hold the same network: official key names and shapes in memory, converted at the edge.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch

from ..config import CheckpointError, infer_config
from ..io import atomic_save
from .hf import is_hf_dir, read_hf, write_hf
from .st import read_st, to_st, write_st
from .tokenizer_files import TOKENIZER_MODULE, WORLD_VOCAB_SIZE, write_world_tokenizer

FORMATS = ("pth", "st", "hf")
FORMAT_NAMES = {
    "pth": "official RWKV .pth",
    "st": "web-rwkv/Ai00 safetensors .st",
    "hf": "Hugging Face directory (fla-hub layout)",
}
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

__all__ = ["FORMATS", "FORMAT_NAMES", "detect_format", "read_other", "read_model", "write_model", "convert",
           "format_for_output", "is_hf_dir", "read_st", "read_hf", "to_st", "write_st", "write_hf"]  # fmt: skip


def detect_format(path: str | os.PathLike) -> str:
    """"hf" for a directory, "st" for a `.st`/`.safetensors` file or one that starts like safetensors
    (an 8-byte header length, then `{`), "pth" otherwise (zip or pickle: torch.save)."""
    p = Path(path)
    if p.is_dir():
        return "hf"
    if p.suffix.lower() in (".st", ".safetensors"):
        return "st"
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError:
        return "pth"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "st"
    return "pth"


def read_other(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The official state dict of a `.st` file or HF directory; None for a `.pth` (read by torch.load)."""
    fmt = detect_format(path)
    if fmt == "st":
        return read_st(path)
    if fmt == "hf":
        return read_hf(path)
    return None


def read_model(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(official state dict, format) of a model in any format."""
    from ..io import read_state_dict

    return read_state_dict(path), detect_format(path)


def format_for_output(out: str | os.PathLike, fmt: str | None = None) -> str:
    """`fmt` if given, else from OUT's suffix: `.pth` -> pth, `.st` -> st, anything else -> hf (a directory)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise CheckpointError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(out).suffix.lower()
    return {".pth": "pth", ".st": "st"}.get(suffix, "hf")


def write_model(
    sd: dict[str, torch.Tensor], out: str | os.PathLike, fmt: str, dtype: torch.dtype | None = None,
    source: str = "model",
) -> str:
    """Write an official state dict as `fmt`; returns what was written (for a summary line).

    dtype: pth and hf default to the source's (`emb.weight`'s) dtype; st is always fp16.
    time_state stays fp32 in pth (and hf's state.pth); st stores it fp16 like every tensor.
    """
    infer_config(sd, source)  # a complete RWKV-7 before anything is written
    if fmt == "st":
        if dtype not in (None, torch.float16):
            raise CheckpointError(f"{out}: the .st format is fp16 only (got --dtype {_DTYPE_NAMES[dtype]})")
        write_st(to_st(sd, source), out)
        return f"{out} (web-rwkv/Ai00 .st, fp16, {len(sd)} tensors)"
    dtype = dtype or sd["emb.weight"].dtype
    if fmt == "pth":
        atomic_save({k: t.detach().to("cpu", torch.float32 if k.endswith("time_state") else dtype).contiguous()
                     for k, t in sd.items()}, out)  # fmt: skip
        return f"{out} (official .pth, {_DTYPE_NAMES[dtype]}, {len(sd)} tensors)"
    if fmt != "hf":
        raise CheckpointError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    world = sd["emb.weight"].shape[0] == WORLD_VOCAB_SIZE
    files = write_hf(sd, out, dtype, more_files=write_world_tokenizer if world else None)
    note = ""
    if world:
        note = "" if TOKENIZER_MODULE in files else "; no tokenizer files (pyrwkv-tokenizer's World vocabulary is " \
            "missing)"
    else:
        note = f"; no tokenizer files (vocabulary of {sd['emb.weight'].shape[0]} is not RWKV World)"
    N = sd["blocks.0.att.r_k"].shape[1]
    if N != 64:  # fla's GroupNorm eps is head_dim * norm_eps; RWKV-7's is 64e-5 at every head size
        note += f"; head size {N}: fla's GroupNorm eps is {N}e-5, RWKV-7's 64e-5, so fla's logits differ slightly"
    if "state.pth" in files:
        note += "; the tuned state is in state.pth (fla ignores it; rwkv-peft and RWKV-Runner read it)"
    return f"{out}/ (HF fla-hub layout, {_DTYPE_NAMES[dtype]}: {', '.join(files)}){note}"


def convert(
    src: str | os.PathLike, out: str | os.PathLike, fmt: str | None = None, dtype: torch.dtype | None = None
) -> str:
    """`rwkv-peft convert`: read a model in any format, write it as `fmt` (default: from OUT's suffix)."""
    fmt = format_for_output(out, fmt)
    if Path(src).resolve() == Path(out).resolve():
        raise CheckpointError(f"{out}: is the input; write the converted model elsewhere")
    sd, src_fmt = read_model(src)
    return f"converted {src} ({FORMAT_NAMES[src_fmt]}) to " + write_model(sd, out, fmt, dtype, source=str(src))
