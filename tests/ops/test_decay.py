"""The decay made from its pre-activation z in one pass (cuda/decay_cpu.cpp, `wkv7(..., decay_offset=)`), against
the formula in fp64: d = exp(-exp(logsigmoid(z) - offset)) and dd/dz = -exp(w) d sigmoid(-z)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peft_rwkv7.ops import cpu, wkv7, wkv7_reference
from tests.conftest import make_model, spy_wkv7
from tests.fp_oracle import U32, forward_rounding
from tests.ops.conftest import assert_close, wkv_inputs, wkv_rtol

OFFSET = 0.5  # the model's DECAY_FLOOR


@pytest.fixture(scope="module")
def ext():
    assert cpu.is_available(torch.device("cpu")), "the CPU kernel did not build (see the warning above)"
    return cpu._ext("wkv7")


def exact(z: torch.Tensor, offset: float = OFFSET) -> tuple[torch.Tensor, torch.Tensor]:
    zd = z.double()
    ew = torch.exp(F.logsigmoid(zd) - offset)
    d = torch.exp(-ew)
    return d, -ew * d * torch.sigmoid(-zd)


def sample() -> torch.Tensor:
    """Pre-activations of every size a model makes and beyond: normal ones, a sweep through both tails, the
    edges of the exp's clamp, signed zeros and infinities."""
    g = torch.Generator().manual_seed(0)
    edges = [0.0, -0.0, 1e-30, -1e-30, 86.9, -86.9, 87.0, -87.0, 87.1, -87.1, 1e4, -1e4, 3e38, -3e38]
    return torch.cat([torch.randn(200_000, generator=g) * 4, torch.linspace(-120, 120, 48_001), torch.tensor(edges),
                      torch.tensor([math.inf, -math.inf])])


@pytest.mark.parametrize("offset", [OFFSET, 0.0, 2.0])
def test_the_decay_and_its_gradient_are_the_formula_within_their_roundings(ext, offset):
    z = sample()
    d, dd = ext.decay_forward(z, offset, True)
    want_d, want_dd = exact(z, offset)
    # d = exp(u), u = -e^-offset sigmoid(z): sigmoid from one exp (<= 2.5 u), an add and a division (2 u);
    # u adds c's rounding and a product (2 u), and an error of |u| <= 1 times that moves exp(u) by as much
    # relative; the exp's own 2.5 u: ~9 u. dd = d u sigmoid(-z) adds two products and sigmoid(-z)'s 5 u: ~18 u.
    rel_d = ((d.double() - want_d).abs() / want_d).max().item()
    assert rel_d <= 12 * U32, f"d: {rel_d / U32:.1f} u"
    normal = want_dd.abs() > 1e-36  # below that dd's factor e = exp(-87) is clamped (an absolute error < 1e-37)
    rel_dd = ((dd.double() - want_dd).abs() / want_dd.abs())[normal].max().item()
    assert rel_dd <= 24 * U32, f"dd/dz: {rel_dd / U32:.1f} u"
    assert (dd.double() - want_dd).abs()[~normal].max().item() <= 1e-37
    assert (dd <= 0).all() and ((d > 0) & (d <= 1)).all()


def test_nan_stays_nan_and_no_gradient_skips_only_the_gradient(ext):
    z = torch.tensor([0.3, math.nan, -2.0, math.nan, 90.0])
    d, dd = ext.decay_forward(z, OFFSET, True)
    assert torch.isnan(d).tolist() == torch.isnan(z).tolist() == torch.isnan(dd).tolist()
    z = sample()
    d_only, none = ext.decay_forward(z, OFFSET, False)
    assert none.numel() == 0 and torch.equal(d_only, ext.decay_forward(z, OFFSET, True)[0])


@pytest.mark.parametrize("T", [1, 33])
def test_the_cpu_kernel_taking_z_equals_the_reference_taking_logsigmoid_z(T):
    """Every output and gradient (dL/dz through the one-pass decay) against the reference op fed
    w = logsigmoid(z) - offset by autograd, within the WKV bound plus the decay's ~12 u."""
    (r, w, k, v, a, b), state = wkv_inputs(2, T, 3, 16, seed=4, with_state=True)
    z = torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * 3

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (r, z, k, v, a, b, state)]
        y, s = fn(*leaves)
        g = torch.Generator().manual_seed(6)
        ((y * torch.randn(y.shape, generator=g)).sum() + (s * torch.randn(s.shape, generator=g)).sum()).backward()
        return [y, s] + [t.grad for t in leaves]

    got = run(lambda r, z, k, v, a, b, s: wkv7(r, z, k, v, a, b, s, backend="cpu", decay_offset=OFFSET))
    want = run(lambda r, z, k, v, a, b, s: wkv7_reference(r, F.logsigmoid(z) - OFFSET, k, v, a, b, s))
    tol = wkv_rtol(T, 16, torch.float32) + 12 * U32
    for name, x, y in zip(("y", "state", "dr", "dz", "dk", "dv", "da", "db", "dstate"), got, want):
        assert_close(x, y, tol, name)


def test_other_backends_get_w_made_from_z():
    (r, w, k, v, a, b), _ = wkv_inputs(1, 9, 2, 16, seed=1)
    z = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    got = wkv7(r, z, k, v, a, b, backend="reference", decay_offset=OFFSET)
    want = wkv7_reference(r, F.logsigmoid(z) - OFFSET, k, v, a, b)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_an_fp32_model_hands_the_op_z_and_the_offset(monkeypatch):
    import peft_rwkv7.model.rwkv7 as rwkv7

    real = rwkv7.wkv7
    seen = spy_wkv7(monkeypatch, lambda args, kwargs: kwargs.get("decay_offset"))
    model = make_model(seed=0, n_layer=2, n_embd=64, head_size=16, vocab_size=50)
    idx = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(0))
    ours = model(idx)
    assert seen == [rwkv7.DECAY_FLOOR] * 2
    # the same logits as the model computing w itself and the op taking it: two fp32 forwards, each within
    # forward_rounding of exact
    monkeypatch.setattr(rwkv7, "wkv7", lambda *a, decay_offset=None, **kw: real(
        *a[:1], F.logsigmoid(a[1]) - decay_offset, *a[2:], **kw))
    theirs = model(idx)
    assert_close(ours, theirs, 2 * forward_rounding(model.config, 7), "logits")


@pytest.mark.parametrize("T", [1, 33])
def test_bf16_z_is_made_into_the_decay_in_fp32(T):
    """bf16 inputs (a bf16 model under autocast hands the op z in bf16): z widened exactly, the decay and its
    gradient made from it in fp32, every output and gradient within the WKV bound for bf16 of the reference
    run in fp32 on the same bf16 values with w = logsigmoid(z) - offset, in the inputs' dtype."""
    (r, w, k, v, a, b), state = wkv_inputs(2, T, 3, 16, torch.bfloat16, seed=7, with_state=True)
    z = (torch.randn(w.shape, generator=torch.Generator().manual_seed(8)) * 3).bfloat16()

    def run(fn, dtype):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (r, z, k, v, a, b)] + [state.clone().requires_grad_()]
        y, s = fn(*leaves)
        g = torch.Generator().manual_seed(9)
        dy = torch.randn(y.shape, generator=g).bfloat16()
        ((y.float() * dy.float()).sum() + (s * torch.randn(s.shape, generator=g)).sum()).backward()
        return [y, s] + [t.grad for t in leaves]

    got = run(lambda r, z, k, v, a, b, s: wkv7(r, z, k, v, a, b, s, backend="cpu", decay_offset=OFFSET),
              torch.bfloat16)
    want = run(lambda r, z, k, v, a, b, s: wkv7_reference(r, F.logsigmoid(z) - OFFSET, k, v, a, b, s), torch.float32)
    tol = wkv_rtol(T, 16, torch.bfloat16) + 12 * U32
    for name, x, y in zip(("y", "state", "dr", "dz", "dk", "dv", "da", "db", "dstate"), got, want):
        assert x.dtype == (torch.float32 if name in ("state", "dstate") else torch.bfloat16), name
        assert_close(x, y, tol, name)


def test_a_bf16_model_hands_the_op_z_and_the_offset(monkeypatch):
    """A model stored in bf16 under bf16 autocast (the trainer's bf16 for adapters and state tuning): z is bf16,
    the kernel's dtype, so the op takes it and makes the decay in fp32 (before: logsigmoid, exp, exp in bf16 and
    torch passes). An fp32 w0 under autocast (full fine-tuning) still makes w itself."""
    import peft_rwkv7.model.rwkv7 as rwkv7

    seen = []
    real = rwkv7.wkv7
    monkeypatch.setattr(rwkv7, "wkv7", lambda *a, **kw: seen.append(kw.get("decay_offset")) or real(*a, **kw))
    model = make_model(seed=0, n_layer=2, n_embd=64, head_size=16, vocab_size=50)
    idx = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx)  # fp32 weights: z fp32, the kernel's dtype bf16
        model.to(torch.bfloat16)(idx)
    assert seen == [None] * 2 + [rwkv7.DECAY_FLOOR] * 2
