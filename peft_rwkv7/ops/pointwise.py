"""Element-wise chains of the model written with fewer passes over memory than autograd's generic
backward takes for them. Same values, same gradients (bit for bit: see tests/ops/test_pointwise.py).

relu_square: ChannelMix's relu(x)^2 on [tokens, 4C]. torch's `relu(x) ** 2` backward is pow's
grad * 2 * relu(x)^1 (a copy for the power, a scale, a product) and relu's threshold: four passes over
the widest activation of the block; here one product and an in-place doubling (two passes forward).
On CPU fp32 with the extension built (cuda/token_mix_cpu.cpp) one pass each way, the same roundings
(torch's bits, save for a gradient off by < 2.2e-19 |g| where 0 < x < 1.08e-19: see _ReluSquareCpu). On CPU
bf16 (training under autocast) one pass each way as well, reading and writing bf16 with the roundings of
_ReluSquare's bf16 ops (the same bits): before, those ops took 4 passes over [tokens, 4C], ~19 ms of a 0.42 s
bf16 step at 0.1B ctx 512 on a CPU with AMX.
The torch path keeps relu(x): torch's CPU sqrt is not correctly rounded (off by an ulp for ~1e-5 of
fp32 values), so sqrt(y) would not give relu(x) back there.
"""

from __future__ import annotations

import torch

from . import cpu

__all__ = ["relu_square"]


class _ReluSquareCpu(torch.autograd.Function):
    """The same function in one pass each way. Saves its output y and takes relu(x) = sqrt(y) in backward
    (exact where y is a normal float; cuda/token_mix_cpu.cpp): the next Linear's LoRA keeps y as its input,
    so with LoRA on ffn.value this saves one [tokens, 4C] buffer per layer (x, which nothing else keeps)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = cpu._ext("relu_square").relu_square_forward(x)
        # bf16: y was rounded, so sqrt(y) is not relu(x); x is kept instead (as much memory as _ReluSquare's r)
        ctx.save_for_backward(x if x.dtype == torch.bfloat16 else y)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (kept,) = ctx.saved_tensors
        ext = cpu._ext("relu_square")
        if kept.dtype == torch.bfloat16:
            return ext.relu_square_backward_x(g.to(torch.bfloat16).contiguous(), kept)
        return ext.relu_square_backward(g.contiguous(), kept)


class _ReluSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        # d relu(x)^2 / dx = 2 relu(x) (zero where x <= 0); doubling is exact, so this is g * (2 r) rounded once
        return torch.mul(g, r).mul_(2.0)


def relu_square(x: torch.Tensor) -> torch.Tensor:
    """relu(x) ** 2, differentiable; without autograd two passes and one buffer."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and cpu.is_available(x.device):
        return _ReluSquareCpu.apply(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _ReluSquare.apply(x)
    return torch.relu(x).square_()
