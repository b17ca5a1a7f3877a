"""The WKV7 operator: one entry point, several backends, no model code.

`wkv7(r, w, k, v, a, b, state=None, backend="auto") -> (y, final_state)`; see docs/rwkv7.md for the
layout and conventions. Fused backends are listed in `dispatch._MODULES` (names in `BACKENDS`);
"auto" picks the fastest one available for the tensors' device that passes its check against the
reference (`ops.verify`), and falls back to the reference.

For the single-token RNN step (generation, no autograd) there are `wkv7_step`, and `linear`
(x @ weight.T) and `matmul` (x @ weight), which take the CPU extension's kernels for the single rows
of batch-1 generation and are plain torch products otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .reference import wkv7_reference, wkv7_step_reference

__all__ = [
    "wkv7",
    "wkv7_reference",
    "wkv7_step",
    "wkv7_step_reference",
    "linear",
    "matmul",
    "BACKENDS",
    "available_backends",
    "partitioned",
]

WkvFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


def _check_inputs(r, w, k, v, a, b, state) -> None:
    shape = r.shape
    if r.dim() != 4:
        raise ValueError(f"wkv7: inputs must be [B, T, H, N], got r of shape {tuple(shape)}")
    for name, x in zip("wkvab", (w, k, v, a, b)):
        if x.shape != shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)}, expected {tuple(shape)} like r")
    if state is not None:
        B, _, H, N = shape
        if tuple(state.shape) != (B, H, N, N):
            raise ValueError(f"wkv7: state has shape {tuple(state.shape)}, expected {(B, H, N, N)}")


def _resolve(backend: str, device: torch.device, head_size: int, dtype: torch.dtype) -> WkvFn:
    if backend not in BACKENDS:
        raise ValueError(f"wkv7: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return wkv7_reference
    from . import dispatch

    return dispatch.resolve(backend, device, head_size, dtype)


def partitioned(*tensors: torch.Tensor) -> bool:
    """Whether any of these parameters is DeepSpeed ZeRO-3's (it sets `ds_id` on each one it partitions): such a
    weight is whole only inside its own module's call, so code that reads another module's weight directly
    (the fused ops, the fused LoRA layer) takes the path that calls that module instead."""
    return any(hasattr(t, "ds_id") for t in tensors)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` in this process (reference always can)."""
    from . import dispatch

    return dispatch.available(torch.device(device))


def wkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    backend: str = "auto",
    decay_offset: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV7 recurrence over [B, T, H, N] inputs.

    w: log-log decay (per-step decay = exp(-exp(w))); a = -kk, b = kk * a as RWKV-7 passes them;
    state: [B, H, N, N] value-major initial state (fp32) or None for zeros.
    decay_offset: None, or w holds the decay's pre-activation z and the log-log decay is
    logsigmoid(z) - decay_offset (RWKV-7's w = -softplus(-z) - 0.5). A backend that takes this form (the CPU
    kernel: the decay from z in one pass) gets z; the others get logsigmoid(z) - decay_offset.
    Returns y [B, T, H, N] (dtype of r) and the final state [B, H, N, N] fp32. Differentiable in
    every input, including the initial state.
    """
    _check_inputs(r, w, k, v, a, b, state)
    # The dtype the kernels compute in: the inputs' when they all share it, else fp32 (auto checks a
    # kernel once per head size and dtype before using it).
    dtype = r.dtype if all(x.dtype == r.dtype for x in (w, k, v, a, b)) else torch.float32
    fn = _resolve(backend, r.device, r.shape[-1], dtype)
    if decay_offset is None:
        return fn(r, w, k, v, a, b, state)
    if getattr(fn, "takes_decay_logit", False):
        return fn(r, w, k, v, a, b, state, decay_offset=decay_offset)
    return fn(r, F.logsigmoid(w) - decay_offset, k, v, a, b, state)


def _one_row_on_cpu(x: torch.Tensor, weight: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """True where the CPU extension can take x times the 2-D weight: one row, no autograd, matching dtypes."""
    if not (
        x.device.type == "cpu"
        and x.numel() == x.shape[-1]
        and x.dtype == weight.dtype
        and x.dtype in dtypes
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return False
    from . import cpu

    return cpu.is_available(x.device)


def linear(x: torch.Tensor, weight: torch.Tensor, row_chunks: bool = False) -> torch.Tensor:
    """x @ weight.T (weight [out, in], as nn.Linear stores it).

    One row on CPU outside autograd (an RNN step at batch 1) is memory-bound; it goes through the CPU
    extension's matvec, which streams the weight 2-2.5x faster than BLAS's gemv. With `row_chunks`, a bf16
    CPU product of a row count in ops.rowsplit's zone runs in row chunks (rowsplit.chunked_linear; not for a
    weight DeepSpeed ZeRO-3 partitions, which its own call must read). Everything else, and any case the
    extension cannot take, is F.linear."""
    fits = weight.dim() == 2 and weight.shape[1] == x.shape[-1]
    if fits and _one_row_on_cpu(x, weight, (torch.float32, torch.bfloat16)):
        from . import cpu

        return cpu.matvec(weight, x).view(*x.shape[:-1], weight.shape[0])
    if row_chunks and not partitioned(weight):
        from .rowsplit import chunked_linear

        y = chunked_linear(x, weight)
        if y is not None:
            return y
    return F.linear(x, weight)


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight (weight [in, out], as RWKV-7's low-rank w1/w2, a1/a2, ... are stored); one fp32 row on
    CPU outside autograd goes through the CPU extension's vecmat, the rest is torch's matmul."""
    if weight.dim() == 2 and weight.shape[0] == x.shape[-1] and _one_row_on_cpu(x, weight, (torch.float32,)):
        from . import cpu

        return cpu.vecmat(x, weight).view(*x.shape[:-1], weight.shape[1])
    return x @ weight


def wkv7_step(r, w, k, v, a, b, state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the WKV7 recurrence for generation; call it with autograd off (no gradients).

    r, w, k, v, a, b: [B, H, N] (wkv7's conventions); state [B, H, N, N] or None (zeros). Returns y
    [B, H, N] in r's dtype and the new state [B, H, N, N] fp32. The CPU extension's kernel on CPU,
    torch's batched products elsewhere."""
    if r.device.type == "cpu":
        from . import cpu

        if cpu.is_available(r.device):
            y, s = cpu.wkv7_step_cpu(r, w, k, v, a, b, state)
            return y.to(r.dtype), s
    y, s = wkv7_step_reference(r, w, k, v, a, b, state)
    return y.to(r.dtype), s
