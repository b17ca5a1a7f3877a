"""CUDA WKV7 backend: the kernels in cuda/wkv7_cuda.cuh (launched from wkv7_cuda.cu), built on first use.

One block per (batch, head), one thread per value row; the forward stores the state every
`CHUNK_LEN` (16) steps and the backward recomputes each chunk from its checkpoint. Head sizes
16, 32, 64, 128; float32 or bfloat16 inputs (other dtypes run in float32), fp32 state and
accumulation. Differentiable in r, w, k, v, a, b and the initial state, with the gradient of the
final state flowing back (true BPTT across chunked calls).

The extension is compiled with torch.utils.cpp_extension.load the first time `is_available` sees
a CUDA device (cached by torch across processes). Without a CUDA toolchain it warns once and
reports itself unavailable, so "auto" falls back to Triton.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

from .build import load_extension
from .reference import wkv7_reference

SOURCE_DIR = Path(__file__).parent / "kernels"  # a link to the repository's cuda/
SOURCES = (SOURCE_DIR / "wkv7_cuda_op.cpp", SOURCE_DIR / "wkv7_cuda.cu")
HEAD_SIZES = (16, 32, 64, 128)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
CHUNK_LEN = 16  # steps between forward state checkpoints; kChunk in wkv7_cuda.cuh (checked there)


@functools.lru_cache(maxsize=1)
def _extension():
    """The compiled extension module, or None (after one warning) when it cannot be built."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            raise RuntimeError("no CUDA toolkit found (nvcc)")
        # No --use_fast_math: exp(-exp(w)) must match the reference to fp32 accuracy.
        return load_extension(
            "peft_rwkv7_wkv7_cuda",
            SOURCES,
            "the CUDA kernels, a few minutes",
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
        )
    except Exception as e:  # any build failure means "not available", never a crash
        msg = str(e).strip().splitlines()
        warnings.warn(
            f"peft_rwkv7: CUDA wkv7 kernel unavailable ({type(e).__name__}: {msg[0] if msg else ''}); "
            "using the Triton or reference backend",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def is_available(device: torch.device | str) -> bool:
    """True for CUDA devices once the extension builds; never compiles for CPU devices."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _extension() is not None


class _Wkv7Cuda(torch.autograd.Function):
    # ext: the compiled module (the CUDA build, or in tests the CPU emulation of the same kernels).
    @staticmethod
    def forward(ctx, ext, r, w, k, v, a, b, state):
        B, T, H, N = r.shape
        inputs = [x.contiguous() for x in (r, w, k, v, a, b)]
        need_grad = any(ctx.needs_input_grad)
        n_chunks = -(-T // CHUNK_LEN)
        y = torch.empty_like(inputs[0])
        s_out = r.new_empty(B, H, N, N, dtype=torch.float32)
        empty = r.new_empty(0, dtype=torch.float32)
        s0 = empty if state is None else state.to(torch.float32).contiguous()
        ckpt = r.new_empty(B, H, n_chunks, N, N, dtype=torch.float32) if need_grad else empty
        ext.forward(*inputs, s0, y, s_out, ckpt)
        ctx.save_for_backward(*inputs, ckpt)
        ctx.ext = ext
        ctx.state_dtype = None if state is None else state.dtype
        return y, s_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, ds_out):
        ext = ctx.ext
        r, w, k, v, a, b, ckpt = ctx.saved_tensors
        B, T, H, N = r.shape
        empty = r.new_empty(0, dtype=torch.float32)
        dy = r.new_zeros(r.shape) if dy is None else dy.to(r.dtype).contiguous()
        ds_out = empty if ds_out is None else ds_out.to(torch.float32).contiguous()
        scratch = r.new_empty(B, H, CHUNK_LEN, N, N, dtype=torch.float32)
        grads = [torch.empty_like(r) for _ in range(6)]
        want_state = ctx.state_dtype is not None and ctx.needs_input_grad[7]
        ds0 = r.new_empty(B, H, N, N, dtype=torch.float32) if want_state else empty
        ext.backward(r, w, k, v, a, b, dy, ds_out, ckpt, scratch, *grads, ds0)
        return (None, *grads, ds0.to(ctx.state_dtype) if want_state else None)


def wkv7_cuda(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV7 on CUDA. r, w, k, v, a, b: [B, T, H, N] on one CUDA device; state: [B, H, N, N] or None.

    Returns y [B, T, H, N] in r's dtype and the final state [B, H, N, N] fp32.
    """
    B, T, H, N = r.shape
    if N not in HEAD_SIZES:
        raise ValueError(
            f"wkv7 cuda backend: head size {N} is not compiled in (supported: "
            f"{', '.join(map(str, HEAD_SIZES))}); use backend='triton' or 'reference'"
        )
    if T == 0:
        return wkv7_reference(r, w, k, v, a, b, state)
    return wkv7_with_extension(_extension(), r, w, k, v, a, b, state)


def wkv7_with_extension(ext, r, w, k, v, a, b, state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """wkv7_cuda's dtype handling and autograd around a given extension module: the CUDA build, or in
    tests the CPU emulation of the same kernel source (cuda/wkv7_cuda_emu_op.cpp). T >= 1."""
    dtype = r.dtype
    same = all(x.dtype == dtype for x in (w, k, v, a, b))
    compute = dtype if same and dtype in _KERNEL_DTYPES else torch.float32
    args = [x.to(compute) for x in (r, w, k, v, a, b)]
    y, s_out = _Wkv7Cuda.apply(ext, *args, state)
    return y.to(dtype), s_out
