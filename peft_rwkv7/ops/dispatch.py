"""Backend selection for wkv7.

Each fused backend lives in its own module exposing `is_available(device) -> bool` and a
function with wkv7's signature: `cpu.wkv7_cpu`, `cuda.wkv7_cuda`, `triton_wkv.wkv7_triton`.
"auto" picks CUDA then Triton on GPU tensors, the CPU kernel on CPU tensors, and the reference
where none of them is available.
"""

from __future__ import annotations

import importlib

import torch

from .reference import wkv7_reference

_MODULES = {"cpu": ("cpu", "wkv7_cpu"), "cuda": ("cuda", "wkv7_cuda"), "triton": ("triton_wkv", "wkv7_triton")}
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def _load(name: str):
    modname, fn = _MODULES[name]
    try:
        mod = importlib.import_module(f".{modname}", __package__)
    except ImportError:
        return None, None
    return mod, getattr(mod, fn)


def _usable(name: str, device: torch.device) -> bool:
    mod, _ = _load(name)
    return mod is not None and mod.is_available(device)


def available(device: torch.device) -> list[str]:
    return ["reference"] + [n for n in _MODULES if _usable(n, device)]


def resolve(backend: str, device: torch.device):
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ()):
            if _usable(name, device):
                return _load(name)[1]
        return wkv7_reference
    if not _usable(backend, device):
        raise RuntimeError(f"wkv7: backend {backend!r} is not available for {device.type} tensors here")
    return _load(backend)[1]
