"""What mutation testing of adapters/fused_lora.py found untested (scripts/mutation.sh fused_lora, docs/mutation.md):
which calls take the training node (_LoraMatmul) and which take peft's or the plain path: every mix of x, A and B
wanting a gradient, no autograd, a trained base weight, mixed dtypes without autocast, ZeRO-3's partitioned
weights, peft's mixed-batch `adapter_names`; and that the node's backward makes only the products a wanted gradient
needs. Values against the fp64 formula (tests/adapters/test_fused_lora.py's bound) or peft's own forward."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft.tuners.lora import Linear as PeftLoraLinear

from peft_rwkv7.adapters import fused_lora
from peft_rwkv7.ops import cpu
from tests.adapters.test_fused_lora import U, _adapted

ROWS = 20  # below the thin kernel's rows: torch's products whatever this CPU's check says


@pytest.fixture
def applied(monkeypatch) -> list[int]:
    """Counts the calls of the training node (_LoraMatmul.apply)."""
    calls: list[int] = []
    real = fused_lora._LoraMatmul.apply
    monkeypatch.setattr(fused_lora._LoraMatmul, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def _f64(lin):
    w = lin.base_layer.weight.detach().double()
    a, b = lin.lora_A["default"].weight.detach().double(), lin.lora_B["default"].weight.detach().double()
    return w, a, b, lin.scaling["default"]


def _close(got: torch.Tensor, want: torch.Tensor, name: str, ulps: float = 64) -> None:
    assert (got.double() - want).abs().max() <= ulps * U * want.abs().max(), name


@pytest.mark.parametrize("rows", [ROWS, 1])
@pytest.mark.parametrize("wants", [m for m in itertools.product([False, True], repeat=3) if any(m)],
                         ids=lambda m: "+".join(n for n, on in zip(("x", "A", "B"), m) if on))
def test_every_mix_of_wanted_gradients_takes_the_node_and_gets_its_gradients(wants, rows, applied, monkeypatch):
    """x, A, B each wanting a gradient or not (a first layer's x wants none; a frozen factor, e.g. A frozen as in
    LoRA-FA, wants none): the node runs, each wanted gradient is the formula's and no other is set; g B (the
    [tokens, r] product) is made only where x's or A's gradient needs it. One row too (a one-token sequence in
    training: the node, where a no-grad row takes the Linear's matvec)."""
    want_x, want_a, want_b = wants
    _, lin = _adapted()
    lin.lora_A["default"].weight.requires_grad_(want_a)
    lin.lora_B["default"].weight.requires_grad_(want_b)
    gen = torch.Generator().manual_seed(11)
    x, gy = torch.randn(rows, 64, generator=gen), torch.randn(rows, lin.out_features, generator=gen)
    xx = x.clone().requires_grad_(want_x)
    y = lin(xx)
    assert applied == [1]
    thin: list[tuple] = []
    real = cpu.thin_nt
    monkeypatch.setattr(cpu, "thin_nt", lambda t, w, *a, **k: thin.append(tuple(w.shape)) or real(t, w, *a, **k))
    y.backward(gy)
    assert thin == ([tuple(lin.lora_B["default"].weight.shape)] if want_x or want_a else [])
    w, a, b, s = _f64(lin)
    x64, g64 = x.double(), gy.double()
    _close(y.detach(), x64 @ w.t() + s * (x64 @ a.t()) @ b.t(), "y", 8)
    grads = {"x": xx.grad, "A": lin.lora_A["default"].weight.grad, "B": lin.lora_B["default"].weight.grad}
    want = {"x": g64 @ w + s * (g64 @ b) @ a, "A": s * (g64 @ b).t() @ x64, "B": s * g64.t() @ (x64 @ a.t())}
    for (name, got), on in zip(grads.items(), wants):
        if on:
            _close(got, want[name], name)
        else:
            assert got is None, name


def test_without_autograd_the_node_never_runs(applied):
    """No grad mode, or grad mode with nothing that wants a gradient: never the training node (rows: its forward
    without autograd; one row, generation's: the base layer's own matvec)."""
    _, lin = _adapted()
    x = torch.randn(ROWS, 64)
    with torch.no_grad():
        lin(x.clone().requires_grad_())
        lin(x[:1])
    for p in (lin.lora_A["default"].weight, lin.lora_B["default"].weight):
        p.requires_grad_(False)
    y = lin(x)
    assert applied == [] and y.grad_fn is None


def test_a_trained_base_weight_gets_its_gradient_through_the_plain_path(applied):
    """A base weight that is itself trained (requires_grad) is not frozen: the node, which returns no gradient for
    W, must not run; W's gradient is g^T x."""
    _, lin = _adapted()
    w_param = lin.base_layer.weight
    w_param.requires_grad_(True)
    gen = torch.Generator().manual_seed(12)
    x, gy = torch.randn(ROWS, 64, generator=gen), torch.randn(ROWS, lin.out_features, generator=gen)
    lin(x.clone().requires_grad_()).backward(gy)
    assert applied == []
    _close(w_param.grad, gy.double().t() @ x.double(), "dW")


def test_mixed_dtypes_without_autocast_take_the_plain_path(applied):
    """A bf16 base (weight and x bf16) with fp32 factors, outside autocast: the node computes in one dtype only, so
    the plain path runs: the base product in bf16, x A^T in fp32 (peft's cast), the low-rank term added in bf16.
    Within bf16 rounding of the fp64 formula, and bf16 out, as peft's own layer gives."""
    _, lin = _adapted()
    lin.base_layer.weight.data = lin.base_layer.weight.data.bfloat16()
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(ROWS, 64, generator=gen).bfloat16()
    y = lin(x.clone().requires_grad_())
    assert applied == [] and y.dtype == torch.bfloat16
    w, a, b, s = _f64(lin)
    x64 = x.double()
    mag = x64.abs() @ w.abs().t() + s * (x64.abs() @ a.abs().t()) @ b.abs().t()
    assert ((y.double() - (x64 @ w.t() + s * (x64 @ a.t()) @ b.t())).abs() <= 4 * 2.0**-8 * mag).all()
    lin.__class__ = PeftLoraLinear
    try:
        peft_y = lin(x)
    finally:
        lin.__class__ = fused_lora.FusedLoraLinear
    assert peft_y.dtype == torch.bfloat16


@pytest.mark.parametrize("which", ["W", "A", "B"])
def test_a_weight_zero3_partitions_takes_peft_s_forward(which, applied):
    """ZeRO-3 partitions parameters (a `ds_id` on each, ops.partitioned): whole only inside their own module's call,
    which peft's forward makes. Any one of W, A and B partitioned: peft's forward, the same values as peft's layer."""
    _, lin = _adapted()
    param = {"W": lin.base_layer.weight, "A": lin.lora_A["default"].weight, "B": lin.lora_B["default"].weight}[which]
    param.ds_id = 3
    x = torch.randn(2, ROWS, 64, generator=torch.Generator().manual_seed(14))
    fused = lin(x.clone().requires_grad_())
    assert applied == []
    lin.__class__ = PeftLoraLinear
    try:
        plain = lin(x.clone().requires_grad_())
    finally:
        lin.__class__ = fused_lora.FusedLoraLinear
    assert torch.equal(fused, plain) and fused.shape == (2, ROWS, lin.out_features)


def test_peft_s_mixed_batch_adapter_names_are_honoured(applied):
    """peft's `adapter_names` (one adapter per input row, "__base__" for none) goes to peft's forward: the first row
    is the base layer's output alone, the second the adapted one."""
    _, lin = _adapted()
    x = torch.randn(2, ROWS, 64, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        y = lin(x, adapter_names=["__base__", "default"])
        assert applied == []
        assert torch.equal(y[0], lin.base_layer(x[0]))
    w, a, b, s = _f64(lin)
    x64 = x[1].double()
    _close(y[1], x64 @ w.t() + s * (x64 @ a.t()) @ b.t(), "adapted row", 8)
    assert ((x64 @ a.t()) @ b.t()).abs().max() > 0.1  # the low-rank term is not negligible: row 0 tells
