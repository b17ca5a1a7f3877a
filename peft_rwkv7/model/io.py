"""Official RWKV-7 `.pth` checkpoints in and out."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import UserError
from .config import CheckpointError, RWKV7Config, infer_config
from .rwkv7 import RWKV7

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A model's tensors under official names: a `.pth` (torch.load, weights_only), or a web-rwkv `.st`
    file or HF (fla-hub) directory converted on read (`model.formats`); CheckpointError with one line on failure."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    from .formats import read_other  # formats imports this module

    other = read_other(p)
    if other is not None:
        return other
    try:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(p, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # torch.load raises many types on damaged files (KeyError, EOFError, ...)
        # torch's messages run to several sentences; the first says what failed.
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        if not isinstance(e, RuntimeError) or not reason:
            reason = type(e).__name__
        raise CheckpointError(f"{p}: cannot read as a PyTorch checkpoint (truncated or corrupt?): {reason}") from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{p}: expected a dict of tensors under string names (an RWKV .pth state dict)")
    return sd


def model_from_state_dict(
    sd: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    source: str = "checkpoint",
    **model_kwargs,
) -> RWKV7:
    """Build an RWKV7 whose config is inferred from `sd` and load the weights into it."""
    cfg = infer_config(sd, source)  # shapes and dtypes
    with torch.device("meta"):
        model = RWKV7(cfg, **model_kwargs)
    # cast on the meta device, then allocate: the weights are made in `dtype` at once (a bf16 load never holds an
    # fp32 copy of the model, twice its size). torch.empty, not to_empty: its empty_like of a meta tensor goes
    # through torch's reference ops, which import sympy (~0.35 s of every model load)
    model = model.to(dtype)._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    for i, blk in enumerate(model.blocks):
        ts = sd.get(f"blocks.{i}.att.time_state")
        if ts is not None:  # its shape checked by infer_config
            blk.att.register_buffer("time_state", torch.empty(ts.shape, device=device, dtype=torch.float32))
    with torch.no_grad():
        own = model.state_dict()
        for k, t in own.items():
            t.copy_(sd[k])
    return model


def pick_device(name: str, field: str) -> torch.device:
    """"auto" (cuda when available), "cpu", "cuda" or "cuda:N"; `field` names the setting in the error when the name
    is no device or CUDA is missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{field} {name}: not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{field} {name}: no CUDA device is available (use cpu or auto)")
    return device


def float_dtype(dtype: torch.dtype | str, fn: str) -> torch.dtype:
    """A model's weight dtype given as torch.bfloat16/float16/float32 or its name (bf16, fp16, fp32); a ValueError
    naming `fn` for anything else."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"{fn}: dtype must be one of {', '.join(DTYPES)} (or torch.bfloat16, torch.float16, "
                         f"torch.float32), got {dtype!r}")
    return dtype


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **model_kwargs,
) -> RWKV7:
    """Load an RWKV-7 model: an official `.pth` (bf16/fp16/fp32), a web-rwkv/Ai00 `.st` or an HF (fla-hub)
    directory (`read_state_dict` converts the last two); the config is inferred from key shapes.

    Weights are cast to `dtype`; the WKV state is always computed in fp32.
    `model_kwargs` go to RWKV7 (wkv_backend, grad_cp). dtype: also by name (bf16, fp16, fp32); device: also "auto".
    """
    dtype = float_dtype(dtype, "load_model")
    device = pick_device(str(device), "load_model: device")
    return model_from_state_dict(read_state_dict(path), dtype, device, source=str(path), **model_kwargs)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write(file)` to a temp file in the same folder, fsync, then rename: readers
    (and a run killed mid-write) never see half a file. The result follows the umask like open()."""
    atomic_write_all([(path, write)])


def atomic_write_all(files: Sequence[tuple[str | os.PathLike, Callable[[BinaryIO], None]]]) -> None:
    """atomic_write for files that belong together (an adapter's tensors, its state and its metadata): every temp
    file is written and fsynced before the first rename, then all are renamed in order. A write that fails (an
    error, a full disk, Ctrl-C) replaces none of them, and a kill leaves all of them from one save but in the
    instant between two renames."""
    paths = [Path(p) for p, _ in files]
    temps: list[str] = []
    ctrl_c: list[int] = []
    current = paths[0]
    try:
        with _noting_ctrl_c(ctrl_c):
            for current, (_, write) in zip(paths, files, strict=True):
                current.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{current.name}.", suffix=".tmp", dir=current.parent)
                temps.append(tmp)
                os.fchmod(fd, 0o666 & ~_umask())
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
            for current, tmp in zip(paths, temps, strict=True):
                os.replace(tmp, current)
    except BaseException as e:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        if ctrl_c:  # torch.save's zip writer turns a Ctrl-C inside it into a RuntimeError: it was the Ctrl-C
            raise KeyboardInterrupt from None
        if isinstance(e, OSError):  # name the file the user asked for, not our temp file
            raise UserError(f"{current}: cannot write here ({e.strerror or e}); choose another path") from None
        raise


@contextlib.contextmanager
def _noting_ctrl_c(noted: list[int]):
    """Python's own Ctrl-C (KeyboardInterrupt at once), noting that it came (main thread, default handler only)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def interrupt(signum, frame):
        noted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def official_state_dict(model: RWKV7, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The model's weights under official key names, cast to `dtype` (time_state stays fp32)."""
    out = {}
    for k, t in model.state_dict().items():
        t = t.detach().to("cpu")
        out[k] = t.float().contiguous() if k.endswith("time_state") else t.to(dtype).contiguous()
    return out


def save_model(model: RWKV7, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write an official RWKV-7 `.pth` (bf16 by default; dtype also by name: bf16, fp16, fp32), atomically."""
    if not isinstance(model, RWKV7):
        raise TypeError(f"save_model: expected an RWKV7, got {type(model).__name__}; an adapted model is saved with "
                        "save_adapter, or merge(adapted) gives the RWKV7 to save")
    atomic_save(official_state_dict(model, float_dtype(dtype, "save_model")), path)


def new_model(cfg: RWKV7Config, seed: int = 0, **model_kwargs) -> RWKV7:
    """A freshly initialised model (RWKV-LM's initialisation), a function of `seed` alone: torch's global generator
    is left as it was (nn.Linear's own start, which init_weights writes over, would draw from it)."""
    from .init import init_weights

    with torch.random.fork_rng(devices=[]):
        model = RWKV7(cfg, **model_kwargs)
    return init_weights(model, seed=seed)
