"""ops/pointwise.py against the torch expressions they replace (the oracle: torch's own autograd of the same
formula): values and gradients bit for bit, fp32 and bf16, with and without autograd."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7.ops import cpu
from peft_rwkv7.ops.pointwise import _ReluSquare, relu_square


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["dispatch", "torch"])
def test_relu_square_is_torchs_relu_pow_bit_for_bit(dtype, impl):
    """`dispatch`: relu_square as the model calls it (the C++ op for CPU fp32 where the extension is built,
    checked to be the one taken); `torch`: the autograd Function of torch ops that the other cases take."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 40, generator=g).to(dtype)
    x[0, 0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])  # the kink
    x[0, 1, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -float("nan")])
    gy = torch.randn(x.shape, generator=g).to(dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = (relu_square if impl == "dispatch" else _ReluSquare.apply)(a), torch.relu(b) ** 2
    if impl == "dispatch" and cpu.is_available(x.device):  # fp32 and bf16 both take the C++ op
        assert type(ya.grad_fn).__name__ == "_ReluSquareCpuBackward"
    (ya * gy).sum().backward()
    (yb * gy).sum().backward()
    assert ya.dtype == yb.dtype == dtype
    cpp = impl == "dispatch" and dtype == torch.float32 and cpu.is_available(x.device)
    same = _same_bits if impl == "dispatch" and dtype == torch.float32 else _same_values
    assert same(ya, yb)
    if cpp:  # the C++ backward takes relu(x) as sqrt(y): x = 1e-30 squares to 0, its gradient is +0
        tiny = (x > 0) & (x < TINY_ROOT)
        assert int(tiny.sum()) == 1
        assert (a.grad[tiny] - b.grad[tiny]).abs().le(2 * TINY_ROOT * gy[tiny].abs()).all()
        a.grad[tiny], b.grad[tiny] = 0.0, 0.0
    assert same(a.grad, b.grad)
    with torch.no_grad():
        assert same(relu_square(x), torch.relu(x) ** 2)


TINY_ROOT = 1.0842022e-19  # sqrt(FLT_MIN): positive x below it square below the normal floats


@pytest.mark.skipif(not cpu.is_available(torch.device("cpu")), reason="the CPU extension did not build")
def test_relu_square_backward_recovers_relu_from_the_output_for_every_fp32():
    """The C++ backward reads y = relu(x)^2 and takes relu(x) = sqrt(y). Every x in [1, 2) (all 2^23
    mantissas): g = 1 must give exactly 2x. That covers every x with a normal square: x 2^k squares to
    x^2 4^k, the same mantissa and rounding, and its root is the root of x^2 times 2^k exactly."""
    ext = cpu._ext("relu_square")
    one = torch.tensor(1.0).view(torch.int32).item()
    x = torch.arange(one, one + (1 << 23), dtype=torch.int32).view(torch.float32)
    assert float(x[0]) == 1.0 and float(x[-1]) < 2.0
    y = ext.relu_square_forward(x)
    assert torch.equal(y, x * x)
    got = ext.relu_square_backward(torch.ones_like(x), y)
    assert torch.equal(got, 2 * x), f"{int((got != 2 * x).sum())} of 2^23 mantissas not recovered"
    # and at both ends of the normal range
    edge = torch.tensor([TINY_ROOT, 1.8446743e19, 1.0, 3.0])
    assert torch.equal(ext.relu_square_backward(torch.ones(4), ext.relu_square_forward(edge)), 2 * edge)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5)))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The C++ op's results are torch's bit for bit: signed zeros (torch's relu gradient is +0 where x <= 0,
    whatever the sign of the incoming gradient) and NaN included."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _bf16_all() -> torch.Tensor:
    """Every bf16 value: the 2^16 bit patterns (NaNs, infinities, signed zeros and subnormals included)."""
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _same_bf16_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, signed zeros included; a NaN matches any NaN (torch's bf16 relu turns every NaN into 0xFFFF,
    the op keeps the NaN it was given: the payload carries nothing)."""
    nan = a.isnan()
    return bool(torch.equal(nan, b.isnan()) and torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan]))


@pytest.mark.skipif(not cpu.is_available(torch.device("cpu")), reason="the CPU extension did not build")
def test_relu_square_bf16_op_is_torchs_bf16_ops_for_every_value():
    """The bf16 C++ op against the torch ops on bf16 that it replaces (_ReluSquare): relu(x) * relu(x) forward,
    (g * relu(x)) * 2 backward, each op rounding to bf16. Exhaustive: every bf16 x (with random g), and every
    bf16 g (with random x)."""
    ext = cpu._ext("relu_square")
    gen = torch.Generator().manual_seed(3)
    every = _bf16_all()
    rand = (torch.randn(every.shape, generator=gen) * 4).to(torch.bfloat16)
    for x, g in ((every, rand), (rand, every)):
        r = torch.relu(x)
        assert _same_bf16_bits(ext.relu_square_forward(x), r * r)
        assert _same_bf16_bits(ext.relu_square_backward_x(g, x), torch.mul(g, r).mul_(2.0))


@pytest.mark.skipif(not cpu.is_available(torch.device("cpu")), reason="the CPU extension did not build")
def test_relu_square_bf16_keeps_only_its_bf16_input():
    """Under bf16 the op keeps x, in bf16 and nothing else (y rounded cannot give relu(x) back), and makes
    no fp32 copy of [tokens, 4C]: one bf16 output each way."""
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).requires_grad_()
    y = relu_square(x)
    kept = y.grad_fn.saved_tensors
    assert len(kept) == 1 and kept[0].dtype == torch.bfloat16 and torch.equal(kept[0], x.detach())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        relu_square(x).backward(torch.ones_like(y))
    copies = [e.key for e in prof.events() if e.key in ("aten::copy_", "aten::_to_copy")]
    assert copies == [] and x.grad.dtype == torch.bfloat16


def test_relu_square_under_bf16_autocast_matches_torch():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(9, 16, generator=g), torch.randn(24, 16, generator=g)
    outs = []
    for fn in (relu_square, lambda t: torch.relu(t) ** 2):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(torch.nn.functional.linear(xx, w))
        y.float().sum().backward()
        outs.append((y, xx.grad))
    assert outs[0][0].dtype == torch.bfloat16
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
