"""The CPU matvec batch-1 generation uses (ops.linear) against torch's fp64 product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_rwkv7 import ops
from peft_rwkv7.ops import cpu
from tests.conftest import make_model
from tests.fp_oracle import UBF16, forward_rounding, gamma


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu.is_available(torch.device("cpu")), "the CPU extension did not build (see the warning above)"


# out sizes not a multiple of the kernel's 4-row bands, in sizes not a multiple of 8 SIMD lanes,
# and out large enough to be split across threads
@pytest.mark.parametrize("out_f, in_f", [(1, 1), (3, 5), (7, 13), (64, 768), (768, 64), (4099, 37), (1000, 3072)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matvec_matches_fp64(out_f, in_f, dtype):
    g = torch.Generator().manual_seed(out_f * 7 + in_f)
    weight = torch.randn(out_f, in_f, generator=g).to(dtype)
    x = torch.randn(in_f, generator=g).to(dtype)
    got = cpu.matvec(weight, x)
    assert got.shape == (out_f,) and got.dtype == dtype
    want = weight.double() @ x.double()
    # an fp32 sum of in_f products in any order: gamma_(in_f) of sum |w x| (Higham 3.1); bf16 adds the
    # rounding of the result to bf16 (2^-8 relative)
    scale = weight.double().abs() @ x.double().abs()
    tol = gamma(in_f) * scale
    if dtype == torch.bfloat16:
        tol = UBF16 * want.abs() + (1 + UBF16) * tol
    assert ((got.double() - want).abs() <= tol).all()


def test_linear_takes_matvec_for_one_row_without_grad(monkeypatch):
    weight, x = torch.randn(33, 20), torch.randn(1, 1, 20)
    calls = []
    real = cpu.matvec
    monkeypatch.setattr(cpu, "matvec", lambda w, v: calls.append(1) or real(w, v))
    with torch.no_grad():
        y = ops.linear(x, weight)
    assert calls and y.shape == (1, 1, 33)
    # two fp32 sums of 20 products, each within gamma_20 of sum |w x|
    assert ((y - F.linear(x, weight)).abs() <= 2 * gamma(20) * F.linear(x.abs(), weight.abs())).all()
    calls.clear()
    ops.linear(torch.randn(2, 1, 20), weight)  # two rows
    ops.linear(x, weight.t().contiguous().t())  # not [out, in] contiguous
    with pytest.raises(RuntimeError):  # mixed dtypes: F.linear's own error, not the kernel's
        ops.linear(x.bfloat16(), weight)
    assert not calls


def test_linear_keeps_autograd():
    weight = torch.randn(9, 6, requires_grad=True)
    x = torch.randn(1, 6, requires_grad=True)
    ops.linear(x, weight).sum().backward()
    assert torch.equal(weight.grad, x.detach().expand(9, 6))  # 1 * x: exact
    w = weight.detach()
    assert ((x.grad - w.sum(0, keepdim=True)).abs() <= 2 * gamma(9) * w.abs().sum(0, keepdim=True)).all()


def test_rnn_step_uses_matvec_and_matches_the_sequence(monkeypatch):
    model = make_model(seed=3).eval()
    idx = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = model(idx)[0]
    calls = []
    real = cpu.matvec
    monkeypatch.setattr(cpu, "matvec", lambda w, v: calls.append(1) or real(w, v))
    state, steps = None, []
    for t in range(idx.shape[1]):
        logits, state = model.step(idx[:, t], state)
        steps.append(logits[0])
    assert len(calls) == idx.shape[1] * (6 * model.config.n_layer + 1)  # r k v o, ffn key value; the head
    # two fp32 forwards of one network (step kernels, sequence op): twice the forward's rounding bound
    assert (torch.stack(steps) - whole).abs().max() <= 2 * forward_rounding(model.config, 6) * whole.abs().max()


@pytest.mark.parametrize("in_f, out_f", [(1, 1), (5, 3), (13, 7), (768, 64), (64, 768), (37, 4099), (3072, 100)])
def test_vecmat_matches_fp64(in_f, out_f):
    g = torch.Generator().manual_seed(in_f * 5 + out_f)
    weight = torch.randn(in_f, out_f, generator=g)
    x = torch.randn(in_f, generator=g)
    got = cpu.vecmat(x, weight)
    want = x.double() @ weight.double()
    scale = x.double().abs() @ weight.double().abs()  # fp32 sums of in_f products: gamma_(in_f), any order
    assert got.shape == (out_f,) and ((got.double() - want).abs() <= gamma(in_f) * scale).all()


def test_matmul_takes_vecmat_for_one_row_only(monkeypatch):
    weight, x = torch.randn(20, 33), torch.randn(1, 1, 20)
    calls = []
    real = cpu.vecmat
    monkeypatch.setattr(cpu, "vecmat", lambda v, w: calls.append(1) or real(v, w))
    with torch.no_grad():
        y = ops.matmul(x, weight)
        assert calls and y.shape == (1, 1, 33)
        assert ((y - x @ weight).abs() <= 2 * gamma(20) * (x.abs() @ weight.abs())).all()  # as for linear
        calls.clear()
        ops.matmul(torch.randn(3, 20), weight)
        ops.matmul(x.bfloat16(), weight.bfloat16())  # fp32 only
    ops.matmul(x, weight.requires_grad_())  # autograd on
    assert not calls


@pytest.mark.parametrize("B, H, N", [(1, 1, 1), (1, 12, 64), (3, 2, 12), (2, 4, 16)])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
def test_wkv7_step_matches_the_reference_op(B, H, N, with_state):
    """The single-token kernel against wkv7_reference at T = 1 (its time loop, an independent path)."""
    g = torch.Generator().manual_seed(B * 100 + H * 10 + N)
    r, w, k, v = (torch.randn(B, 1, H, N, generator=g) for _ in range(4))
    kk = torch.nn.functional.normalize(torch.randn(B, 1, H, N, generator=g), dim=-1)
    a = torch.sigmoid(torch.randn(B, 1, H, N, generator=g))
    w = -torch.nn.functional.softplus(-w) - 0.5
    state = torch.randn(B, H, N, N, generator=g) if with_state else None
    want_y, want_s = ops.wkv7_reference(r, w, k, v, -kk, kk * a, state)
    with torch.no_grad():
        got_y, got_s = ops.wkv7_step(*(t[:, 0] for t in (r, w, k, v, -kk, kk * a)), state)
        ref_y, ref_s = ops.wkv7_step_reference(*(t[:, 0] for t in (r, w, k, v, -kk, kk * a)), state)
    # One step S' = S diag(d) + (S a) b^T + v k^T, y = S' r: an N-term sum then 3 more roundings per state
    # entry, N more for y; two fp32 computations differ by at most twice that, relative to the terms.
    s0 = torch.zeros(B, H, N, N) if state is None else state.abs()
    d = torch.exp(-torch.exp(w[:, 0]))
    terms_s = s0 * d[..., None, :] + (s0 @ kk[:, 0].abs()[..., None]) * (kk * a)[:, 0].abs()[..., None, :] \
        + v[:, 0].abs()[..., None] * k[:, 0].abs()[..., None, :]
    terms_y = (terms_s @ r[:, 0].abs()[..., None])[..., 0]
    for y, s in ((got_y, got_s), (ref_y, ref_s)):
        assert ((y - want_y[:, 0]).abs() <= 2 * gamma(2 * N + 3) * terms_y).all()
        assert ((s - want_s).abs() <= 2 * gamma(N + 3) * terms_s).all()
