"""What mutation testing of ops/pointwise.py found untested (scripts/mutation.sh pointwise, docs/mutation.md):
relu_square's torch paths as the model reaches them through the entry point, for tensors the C++ op does not
take (fp64, fp16) and for a process without the extension (a GPU, no compiler). The oracle is torch's own
`relu(x) ** 2` and its autograd, in the same dtype."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7.ops import cpu
from peft_rwkv7.ops.pointwise import relu_square
from tests.conftest import graph_nodes


def _x(dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(5, 33, generator=torch.Generator().manual_seed(7)).to(dtype)
    x[0, :3] = torch.tensor([0.0, -0.0, -2.0])
    return x


def _check(x: torch.Tensor, node: str) -> None:
    """relu_square(x) equals torch's relu(x) ** 2 forward and backward, through the node `node`, and without
    autograd gives the same values, no graph, and leaves x as it was."""
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(x.dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = relu_square(a), torch.relu(b) ** 2
    assert node in graph_nodes(ya)
    (ya * gy).sum().backward()
    (yb * gy).sum().backward()
    assert ya.dtype == x.dtype and torch.equal(ya, yb) and torch.equal(a.grad, b.grad)
    before = x.clone()
    with torch.no_grad():
        y = relu_square(x)
    assert y.grad_fn is None and torch.equal(y, torch.relu(before) ** 2) and torch.equal(x, before)
    y = relu_square(x)  # grad enabled, nothing requires it: no graph either
    assert y.grad_fn is None and torch.equal(y, torch.relu(before) ** 2) and torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_relu_square_in_dtypes_the_cpu_op_does_not_take_is_torchs(dtype):
    _check(_x(dtype), "_ReluSquareBackward")


def test_relu_square_without_the_extension_is_torchs(monkeypatch):
    """A process where the extension did not build (or a GPU tensor) takes the torch Function for fp32 too."""
    monkeypatch.setattr(cpu, "is_available", lambda device=None: False)
    _check(_x(torch.float32), "_ReluSquareBackward")


@pytest.mark.skipif(not cpu.is_available(torch.device("cpu")), reason="the CPU extension did not build")
def test_relu_square_takes_the_cpu_op_for_fp32_and_bf16_only():
    for dtype in (torch.float32, torch.bfloat16):
        y = relu_square(_x(dtype).requires_grad_())
        assert "_ReluSquareCpuBackward" in graph_nodes(y)
    for dtype in (torch.float64, torch.float16):
        assert "_ReluSquareCpuBackward" not in graph_nodes(relu_square(_x(dtype).requires_grad_()))
