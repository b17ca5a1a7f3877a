"""bf16 products through frozen weights on the CPU in row chunks, where this CPU's oneDNN runs a whole call slowly.

On a 2-core Xeon with AMX (torch 2.13, oneDNN 3.12) torch's bf16 GEMM runs the model's products at 2,000-2,800
GFLOP/s for up to ~600 rows and from ~1,800, but at half that (and 665-900 for some shapes) between: a 0.1B
block's [rows, 3072] x [3072, 768] at 1,024 rows ran at 1,140 GFLOP/s, the speed of one thread, against 2,030
at 512 rows and 2,340 at 2,048 (fp32 through MKL has no such hole). A training step's products have as many
rows as the micro-batch has tokens, so ctx 768-1,536, or micro-batches of two 512-token rows, fell into it. Cut
into near-equal chunks of at most CHUNK_ROWS rows, every call runs at the small-call speed.

Which CPUs have the hole is measured, not assumed: ops/precision.py times whole calls against chunked ones
at a few row counts in the zone when it measures bf16 (cached per machine, shown by `rwkv-peft doctor`), and
the trainer and evaluation switch the chunks on only where they are faster (`RWKV7.set_bf16_row_chunks`).
Chunked rows are the same products; a row's bits may differ from the whole call's (oneDNN picks another
kernel), within bf16 GEMM rounding. The weight's own gradient (full fine-tuning) stays one call: its rows
are the reduction.
"""

from __future__ import annotations

import torch

ZONE = (600, 1792)  # row counts (exclusive) where the chunks are taken, when switched on
CHUNK_ROWS = 512
MIN_FEATURES = 512  # both sides of the weight at least this: the thin low-rank products have no hole


def row_chunks(rows: int, weight: torch.Tensor) -> int:
    """Chunks for a product of `rows` rows through `weight` [out, in]: 1 (one call) outside the zone."""
    if not (ZONE[0] < rows < ZONE[1]) or min(weight.shape) < MIN_FEATURES:
        return 1
    return -(-rows // CHUNK_ROWS)


def mm_rows(a: torch.Tensor, b: torch.Tensor, chunks: int) -> torch.Tensor:
    """a @ b for a 2-D a, as `chunks` near-equal row chunks written into one result (no copy)."""
    if chunks <= 1:
        return torch.mm(a, b)
    out = a.new_empty(a.shape[0], b.shape[1])
    for part, dst in zip(a.tensor_split(chunks), out.tensor_split(chunks)):
        torch.mm(part, b, out=dst)
    return out


class _RowChunkedLinear(torch.autograd.Function):
    """y = x W^T for x [rows, in], W [out, in], both bf16; x's gradient in the same chunks."""

    @staticmethod
    def forward(ctx, x, w, chunks: int):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)
        ctx.chunks = chunks
        return mm_rows(x, w.t(), chunks)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = g.contiguous()
        dx = mm_rows(g, w, ctx.chunks) if need[0] else None
        dw = torch.mm(g.t(), x) if need[1] else None
        return dx, dw, None


def chunked_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x @ weight.T in row chunks where a bf16 CPU product of these rows falls in the zone, else None (the
    caller takes its own path). bf16: both tensors bf16, or CPU autocast to bf16 (whose cast this makes, as
    F.linear would)."""
    if x.device.type != "cpu" or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        return None
    rows = x.numel() // max(1, x.shape[-1])
    chunks = row_chunks(rows, weight)
    if chunks == 1:
        return None
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return None
        x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
    elif not x.dtype == weight.dtype == torch.bfloat16:
        return None
    y = _RowChunkedLinear.apply(x.reshape(rows, x.shape[-1]), weight, chunks)
    return y.view(*x.shape[:-1], weight.shape[0])


__all__ = ["CHUNK_ROWS", "ZONE", "chunked_linear", "mm_rows", "row_chunks"]
