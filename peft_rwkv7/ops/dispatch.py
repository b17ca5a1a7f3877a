"""Backend selection for wkv7.

Each fused backend lives in its own module exposing `is_available(device) -> bool` and a
function with wkv7's signature: `cpu.wkv7_cpu`, `cuda.wkv7_cuda`, `triton_wkv.wkv7_triton`; a
module that compiles only some head sizes lists them in `HEAD_SIZES`.
"auto" picks CUDA then Triton on GPU tensors, the CPU kernel on CPU tensors, and the reference
where none of them is available. It never hands out a kernel it has not checked: the first time a
backend would serve a (head size, dtype, device type) in this process, `verify.check` compares it
with the reference on a small problem (forward and every gradient). A mismatch or a crash warns
once, naming the backend, head size, dtype and error, and auto moves on to the next backend; head
sizes a kernel does not compile are skipped without a warning. The verdicts are cached per process.
An explicit backend ("cpu", "cuda", "triton") is used as asked, unchecked, and raises if it cannot run.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType

import torch

from . import verify
from .reference import wkv7_reference

WkvFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
_MODULES = {"cpu": ("cpu", "wkv7_cpu"), "cuda": ("cuda", "wkv7_cuda"), "triton": ("triton_wkv", "wkv7_triton")}
FUSED = tuple(_MODULES)
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
# Where the caller does not say (older call sites): the head size and dtype of the 0.1B-3B models.
_DEFAULT_HEAD_SIZE, _DEFAULT_DTYPE = 64, torch.float32
# (backend, head size, dtype, device type) -> verdict; filled on first use, lives as long as the process.
_VERDICTS: dict[tuple[str, int, torch.dtype, str], verify.Verdict] = {}


def load(name: str) -> tuple[ModuleType | None, WkvFn | None]:
    """(module, function) of a fused backend by name; (None, None) where its module does not import."""
    modname, fn = _MODULES[name]
    try:
        mod = importlib.import_module(f".{modname}", __package__)
    except ImportError:
        return None, None
    return mod, getattr(mod, fn)


def _usable(name: str, device: torch.device) -> bool:
    mod, _ = load(name)
    return mod is not None and mod.is_available(device)


def supports(name: str, head_size: int) -> bool:
    """False where the backend's module compiles a fixed list of head sizes without this one."""
    mod, _ = load(name) if name in _MODULES else (None, None)
    sizes = getattr(mod, "HEAD_SIZES", None)
    return sizes is None or head_size in sizes


def available(device: torch.device) -> list[str]:
    return ["reference"] + [n for n in _MODULES if _usable(n, device)]


def verdict(name: str, fn: WkvFn, head_size: int, dtype: torch.dtype, device: torch.device) -> verify.Verdict:
    """The cached check of backend `name` (implemented by `fn`); runs it on first use, warning once on failure."""
    key = (name, head_size, dtype, device.type)
    if key not in _VERDICTS:
        result = verify.check(fn, head_size, dtype, device)
        _VERDICTS[key] = result
        if not result.ok:
            warnings.warn(
                f"wkv7: the {name} kernel failed its check against the reference for head size {head_size}, "
                f"{str(dtype).removeprefix('torch.')} on {device.type} ({result.describe()}); "
                "using the next backend instead",
                RuntimeWarning,
                stacklevel=2,
            )
    return _VERDICTS[key]


def first_verified(
    candidates: Sequence[tuple[str, WkvFn]], head_size: int, dtype: torch.dtype, device: torch.device
) -> WkvFn:
    """The first candidate that compiles this head size and passes its check; the reference otherwise."""
    for name, fn in candidates:
        if supports(name, head_size) and verdict(name, fn, head_size, dtype, device).ok:
            return fn
    return wkv7_reference


def resolve(
    backend: str, device: torch.device, head_size: int | None = None, dtype: torch.dtype | None = None
) -> WkvFn:
    """The function for `backend` on `device` tensors of this head size and (compute) dtype."""
    if backend == "auto":
        loaded = [(n, *load(n)) for n in _AUTO_ORDER.get(device.type, ())]
        return first_verified(
            [(n, fn) for n, mod, fn in loaded if mod is not None and mod.is_available(device)],
            _DEFAULT_HEAD_SIZE if head_size is None else head_size,
            _DEFAULT_DTYPE if dtype is None else dtype,
            device,
        )
    if not _usable(backend, device):
        raise RuntimeError(f"wkv7: backend {backend!r} is not available for {device.type} tensors here")
    return load(backend)[1]
