"""Triton WKV7 backend: chunked (16-step) forward and backward, the portable GPU path.

The kernels (triton_fwd.py, triton_bwd.py) work chunk by chunk with fp32 accumulation; the
forward keeps the state at each chunk start for the backward. Any head size (masked to a power
of two >= 16), any T, float32 or bfloat16 inputs (others run in float32). Differentiable in
r, w, k, v, a, b and the initial state, with the final-state gradient flowing back.

On CPU tensors the backend is available only when Triton's interpreter built our kernels
(TRITON_INTERPRET=1 set before triton was first imported: tests use this); we detect that from
the kernel objects themselves and never read the environment.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from .reference import wkv7_reference
from .triton_bwd import wkv7_bwd_kernel
from .triton_fwd import wkv7_fwd_kernel

CHUNK_LEN = 16
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(wkv7_fwd_kernel, InterpretedFunction)


def is_available(device: torch.device | str) -> bool:
    """CUDA devices when torch sees a GPU; CPU only under Triton's interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreted()


def _blocks(N: int, value_block: int | None) -> tuple[int, int, int]:
    """Key block (all of N, padded to a power of two >= 16), value block, number of value blocks."""
    BK = max(16, triton.next_power_of_2(N))
    # Value columns are independent: smaller blocks give more programs per head but repeat the
    # key-side chunk algebra in each; 16 for small heads, 32 otherwise.
    BV = value_block or (16 if BK <= 32 else 32)
    BV = min(max(16, triton.next_power_of_2(BV)), BK)
    return BK, BV, triton.cdiv(N, BV)


def _on(device: torch.device):
    """Triton launches on the current CUDA device, not the tensors': the tensors' GPU made current for the launch
    (a model on cuda:1 while cuda:0 is current); nothing on the CPU (the interpreter's tests)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _Wkv7Triton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, state, value_block):
        B, T, H, N = r.shape
        inputs = [x.contiguous() for x in (r, w, k, v, a, b)]
        BK, BV, n_vb = _blocks(N, value_block)
        need_grad = any(ctx.needs_input_grad)
        y = torch.empty_like(inputs[0])
        s_out = r.new_empty(B, H, N, N, dtype=torch.float32)
        s0 = s_out if state is None else state.to(torch.float32).contiguous()  # s_out: unused placeholder
        ckpt = r.new_empty(B, H, triton.cdiv(T, CHUNK_LEN), N, N, dtype=torch.float32) if need_grad else s_out
        with _on(r.device):
            wkv7_fwd_kernel[(B * H, n_vb)](
                *inputs, s0, y, s_out, ckpt, T, H,
                N=N, BK=BK, BV=BV, L=CHUNK_LEN, HAS_S0=state is not None, SAVE_CKPT=need_grad, num_warps=4,
            )  # fmt: skip
        ctx.save_for_backward(*inputs, ckpt)
        ctx.state_dtype = None if state is None else state.dtype
        ctx.value_block = value_block
        return y, s_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, ds_out):
        r, w, k, v, a, b, ckpt = ctx.saved_tensors
        B, T, H, N = r.shape
        BK, BV, n_vb = _blocks(N, ctx.value_block)
        dy = r.new_zeros(r.shape) if dy is None else dy.to(r.dtype).contiguous()
        has_ds_out = ds_out is not None
        ds_out = ds_out.to(torch.float32).contiguous() if has_ds_out else ckpt  # ckpt: unused placeholder
        want_ds0 = ctx.state_dtype is not None and ctx.needs_input_grad[6]
        ds0 = r.new_empty(B, H, N, N, dtype=torch.float32) if want_ds0 else ckpt
        # One value block writes the key-side gradients in the input dtype; several write fp32
        # partial sums that are added here.
        dkey = r.new_empty(5, n_vb, B, T, H, N, dtype=r.dtype if n_vb == 1 else torch.float32)
        dv = torch.empty_like(v)
        with _on(r.device):
            wkv7_bwd_kernel[(B * H, n_vb)](
                r, w, k, v, a, b, dy, ds_out, ckpt, dkey, dv, ds0, T, H, r.numel(),
                N=N, BK=BK, BV=BV, L=CHUNK_LEN, HAS_DS_OUT=has_ds_out, WANT_DS0=want_ds0, num_warps=8,
            )  # fmt: skip
        dkey = dkey.sum(1).to(r.dtype) if n_vb > 1 else dkey[:, 0]
        dr, dw, dk, da, db = dkey.unbind(0)
        return dr, dw, dk, dv, da, db, ds0.to(ctx.state_dtype) if want_ds0 else None, None


def wkv7_triton(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    value_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV7 with the Triton chunk kernels. r, w, k, v, a, b: [B, T, H, N]; state: [B, H, N, N] or None.

    value_block: columns of the state per program (power of two >= 16; default by head size).
    Returns y [B, T, H, N] in r's dtype and the final state [B, H, N, N] fp32.
    """
    if r.shape[1] == 0:
        return wkv7_reference(r, w, k, v, a, b, state)
    dtype = r.dtype
    same = all(x.dtype == dtype for x in (w, k, v, a, b))
    compute = dtype if same and dtype in _KERNEL_DTYPES else torch.float32
    args = [x.to(compute) for x in (r, w, k, v, a, b)]
    y, s_out = _Wkv7Triton.apply(*args, state, value_block)
    return y.to(dtype), s_out
