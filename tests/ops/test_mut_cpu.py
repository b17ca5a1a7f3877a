"""What the tests of ops/cpu.py (the CPU kernels' Python side) had left open, found by `scripts/mutation.sh cpu`:
a head size the kernel's lanes do not divide (zero-padded inside: no test had one, test_cpu_backend's "N % 8 != 0"
case was N 24), inputs of two dtypes, the decay trained alone, which buffers the caller's allocator makes, the
column tiles reaching the backward, which thin products the kernel takes, and the errors without the extension.

Oracles: the reference op (wkv7_reference, autograd) within tests/ops/conftest.wkv_rtol, torch's products in fp64,
and the calls the extension itself receives.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_rwkv7.ops import cpu, wkv7_reference
from tests.conftest import spy_extension
from tests.fp_oracle import U32
from tests.ops.conftest import assert_close, wkv_inputs, wkv_rtol
from tests.ops.test_cpu_backend import NAMES, compare, fwd_bwd, kernel, nan_alloc

OFFSET = 0.5  # the model's decay floor (ops.wkv7's decay_offset)


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu.is_available(torch.device("cpu")), "the CPU kernel did not build (see the warning above)"


def _decay_pair(offset: float | None, T: int, N: int):
    """(the kernel, the reference, their bound) for w given (offset None) or z given (decay_offset): the reference
    is then fed w = logsigmoid(z) - offset by autograd, and the bound is test_decay's, the WKV op's plus the decay's
    ~12 u."""
    tol = wkv_rtol(T, N, torch.float32)
    if offset is None:
        return kernel, wkv7_reference, tol
    return (lambda r, z, *t: kernel(r, z, *t, decay_offset=offset),
            lambda r, z, *t: wkv7_reference(r, F.logsigmoid(z) - offset, *t), tol + 12 * U32)


def _z(shape, seed: int) -> torch.Tensor:
    """Decay pre-activations of a model's range and beyond."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def _run(fn, inputs: list[torch.Tensor], state: torch.Tensor | None, trained=range(7), seed: int = 1):
    """[y, final state, each trained input's gradient] for upstream gradients exact in bf16 (so an output in bf16
    and one in fp32 meet the same ones)."""
    leaves = [x.clone().requires_grad_(i in trained) for i, x in enumerate([*inputs, state])]
    y, s = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    dy, ds = (torch.randn(t.shape, generator=g, dtype=torch.float32).bfloat16().float() for t in (y, s))
    ((y.float() * dy).sum() + (s * ds).sum()).backward()
    return [y.detach(), s.detach()] + [leaves[i].grad for i in trained]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [6, 12, 20])  # padded by 2, 4, 4 to 8, 16, 24 (24: the kernel's runtime-N code)
def test_a_head_size_off_the_kernels_lanes_is_padded_inside(N, dtype):
    """Every output and gradient against the reference, the initial state included (padded to [N + p, N + p])."""
    assert N % cpu.LANES
    inputs, state = wkv_inputs(2, cpu.CHUNK + 1, 3, N, dtype, seed=N, with_state=True)
    compare(fwd_bwd(kernel, inputs, state), fwd_bwd(wkv7_reference, inputs, state))


def test_a_padded_head_takes_the_decay_from_z():
    """decay_offset given: the decay and its gradient made from z (decay_forward) on the padded rows too."""
    inputs, state = wkv_inputs(2, 33, 3, 12, seed=4, with_state=True)
    inputs[1] = _z(inputs[1].shape, 5)
    fn, ref, tol = _decay_pair(OFFSET, 33, 12)
    got, want = _run(fn, inputs, state), _run(ref, inputs, state)
    for name, x, y in zip(NAMES, got, want):
        assert_close(x, y, tol, name)


@pytest.mark.parametrize("tiles", [16, 64])
def test_a_padded_heads_state_alone_trained(tiles):
    """State tuning's first layer (only the initial state wants a gradient: the kernel's state-only backward) with
    a padded head."""
    inputs, state = wkv_inputs(2, 33, 3, 12, seed=6, with_state=True)
    got = _run(lambda *t: kernel(*t[:6], t[6], tiles=tiles), inputs, state, trained=[6])
    want = _run(lambda *t: wkv7_reference(*t[:6], t[6]), inputs, state, trained=[6])
    for name, x, y in zip(("y", "state", "dstate"), got, want):
        assert_close(x, y, wkv_rtol(33, 12, torch.float32), name)


@pytest.mark.parametrize("r_dtype, others", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16-r", "fp32-r"])
def test_inputs_of_two_dtypes_are_computed_in_fp32_and_y_is_rs(r_dtype, others):
    """Only all-bf16 inputs go to the kernel as they are (it stages them); a mix takes fp32 copies, and y comes
    back in r's dtype, every gradient in its input's. Values: the reference on the same values in fp32."""
    inputs, state = wkv_inputs(2, 33, 3, 16, seed=7, with_state=True)
    mixed = [inputs[0].to(r_dtype), inputs[1], *(x.to(others) for x in inputs[2:])]
    got = _run(kernel, mixed, state)
    want = _run(wkv7_reference, [x.float() for x in mixed], state)
    assert got[0].dtype == r_dtype
    assert [g.dtype for g in got[2:8]] == [x.dtype for x in mixed]
    for name, x, y in zip(NAMES, got, want):
        # y and the gradients of bf16 inputs are fp32 results rounded once more
        tol = wkv_rtol(33, 16, x.dtype)
        assert_close(x.float(), y, tol, name)


@pytest.mark.parametrize("offset", [None, OFFSET], ids=["w", "z"])
def test_the_decay_alone_trained(offset):
    """Only w (or z) wants a gradient: dL/dd chained to it by dd/dw (dd/dz), which is made only where it is wanted."""
    inputs, state = wkv_inputs(2, 33, 3, 16, seed=8, with_state=True)
    if offset is not None:
        inputs[1] = _z(inputs[1].shape, 9)
    fn, ref, tol = _decay_pair(offset, 33, 16)
    got, want = _run(fn, inputs, state, trained=[1]), _run(ref, inputs, state, trained=[1])
    for name, x, y in zip(("y", "state", "dw"), got, want):
        assert_close(x, y, tol, name)


@pytest.mark.parametrize("offset", [None, OFFSET], ids=["w", "z"])
def test_a_frozen_decay_keeps_no_factor_for_its_gradient(offset):
    """The decay frozen, everything else trained (LoRA on the other projections): the factor dd/dw (dd/dz) is
    neither made nor kept for the backward (a [B, T, H, N] fp32 tensor a layer), and the other gradients are the
    reference's."""
    inputs, state = wkv_inputs(2, 33, 3, 16, seed=10, with_state=True)
    trained = [0, 2, 3, 4, 5, 6]
    if offset is not None:
        inputs[1] = _z(inputs[1].shape, 11)
    fn, ref, tol = _decay_pair(offset, 33, 16)
    kept = []

    def keeping(*t):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
            return fn(*t)

    got = _run(keeping, inputs, state, trained=trained)
    assert sum(shape == inputs[0].shape for shape in kept) == 6, kept  # r, d, k, v, a, b
    want = _run(ref, inputs, state, trained=trained)
    for name, x, y in zip(("y", "state", "dr", "dk", "dv", "da", "db", "dstate"), got, want):
        assert_close(x, y, tol, name)


def test_the_callers_allocator_makes_every_fp32_buffer():
    """`alloc` makes y, the checkpoints, the final state and (backward) every gradient where they are fp32: the
    NaN-filled allocator of the tests only finds unwritten elements in what it made."""
    made: list[torch.Tensor] = []

    def alloc(shape):
        made.append(nan_alloc(shape))
        return made[-1]

    inputs, state = wkv_inputs(2, 33, 3, 16, seed=2, with_state=True)
    leaves = [x.clone().requires_grad_() for x in [*inputs, state]]
    y, s = cpu.wkv7_cpu(*leaves[:6], leaves[6], alloc=alloc)
    ptrs = {t.data_ptr() for t in made}
    assert y.data_ptr() in ptrs and s.data_ptr() in ptrs
    assert len(made) == 3  # y, the checkpoints, the final state
    (y.sum() + s.sum()).backward()
    assert len(made) == 3 + 7  # six gradients and dL/dS_0
    ptrs = {t.data_ptr() for t in made}
    assert all(x.grad.data_ptr() in ptrs for x in leaves), "a gradient not from alloc"


def test_the_default_buffers_are_fp32_whatever_torchs_default_dtype():
    inputs, state = wkv_inputs(1, 9, 2, 16, seed=3, with_state=True)
    want = _run(cpu.wkv7_cpu, inputs, state)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = _run(cpu.wkv7_cpu, inputs, state)
    finally:
        torch.set_default_dtype(old)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("tiles", [16, 64])
@pytest.mark.parametrize("trained", ["all", "state"])
def test_the_column_tiles_reach_the_backward(monkeypatch, tiles, trained):
    """The width a caller (a test of both widths) asks for is the one every kernel call gets, the backward's too:
    a backward left to the CPU's own choice would run 64 on every AVX-512 machine whatever was asked."""
    seen = []
    ext = cpu._extension()
    real = {name: getattr(ext, name) for name in ("forward", "backward", "backward_state")}
    for name in real:
        monkeypatch.setattr(ext, name, lambda *a, _n=name: seen.append((_n, a[-1])) or real[_n](*a))
    inputs, state = wkv_inputs(1, 9, 2, 16, seed=3, with_state=True)
    _run(lambda *t: kernel(*t[:6], t[6], tiles=tiles), inputs, state, trained=range(7) if trained == "all" else [6])
    want = ["forward", "backward" if trained == "all" else "backward_state"]
    assert seen == [(n, tiles) for n in want], seen


def _fp64(x, w, alpha=1.0):
    return (x.double() @ w.double()) * alpha


@pytest.mark.parametrize("w_rk", [False, True])
def test_which_thin_products_the_kernel_takes(monkeypatch, w_rk):
    """thin_nt: the kernel where asked and it can (fp32 matrices, a kernel rank, >= THIN_MIN_ROWS rows: counted in
    x's rows, whatever the width), torch's product otherwise; the same product either way."""
    calls = spy_extension(monkeypatch, "thin_nt")
    g = torch.Generator().manual_seed(0)

    def factor(K, R):
        return torch.randn(R, K, generator=g) if w_rk else torch.randn(K, R, generator=g)

    def check(x, w, alpha, runs, **kw):
        calls.clear()
        out = cpu.thin_nt(x, w, alpha, w_rk=w_rk, **kw)
        want = _fp64(x, w.t() if w_rk else w, alpha)
        assert (out.double() - want).abs().max() <= 4 * x.shape[1] * U32 * (x.abs() @ (w.t() if w_rk else w).abs()
                                                                             ).max() * abs(alpha)
        assert calls == (["thin_nt"] if runs else []), (x.shape, w.shape, kw)

    rows = cpu.THIN_MIN_ROWS
    check(torch.randn(rows, 64, generator=g), factor(64, 16), 0.5, True, kernel=True)  # rows >= the minimum, K < it
    check(torch.randn(rows - 1, 512, generator=g), factor(512, 16), 0.5, False, kernel=True)  # K >= it, rows <
    check(torch.randn(rows, 64, generator=g), factor(64, 12), 0.5, False, kernel=True)  # not a kernel rank
    check(torch.randn(rows, 64, generator=g), factor(64, 16), 0.5, False)  # not asked: torch's
    check(torch.randn(rows, 64, generator=g), factor(64, 16), 2.0, False, kernel=False)  # torch's, alpha 2


def test_thin_tns_scale_and_where_the_kernel_takes_it(monkeypatch):
    calls = spy_extension(monkeypatch, "thin_tn")
    g = torch.Generator().manual_seed(1)
    gr, x = torch.randn(cpu.THIN_MIN_ROWS, 16, generator=g), torch.randn(cpu.THIN_MIN_ROWS, 48, generator=g)
    want = (gr.double().t() @ x.double())
    bound = 4 * gr.shape[0] * U32 * (gr.abs().t() @ x.abs()).max()
    for kw, runs in (({}, False), ({"kernel": True}, True), ({"kernel": True, "out_kr": True}, True),
                     ({"alpha": 2.0}, False)):
        calls.clear()
        out = cpu.thin_tn(gr, x, **kw)
        out = out.t() if kw.get("out_kr") else out
        assert (out.double() - want * kw.get("alpha", 1.0)).abs().max() <= bound * kw.get("alpha", 1.0), kw
        assert calls == (["thin_tn"] if runs else []), kw


def test_without_the_extension_each_op_says_which_it_is(monkeypatch):
    """A process whose build failed: the ops that need the extension raise one line naming themselves."""
    monkeypatch.setattr(cpu, "_extension", lambda: None)
    inputs, _ = wkv_inputs(1, 3, 1, 16)
    one = torch.zeros(1, 1, 16)
    for name, call in (("wkv7", lambda: cpu.wkv7_cpu(*inputs)), ("kernel_threads", cpu.kernel_threads),
                       ("logsumexp_f64", lambda: cpu.logsumexp_f64(torch.zeros(2, 3))),
                       ("matvec", lambda: cpu.matvec(torch.zeros(4, 3), torch.zeros(3))),
                       ("vecmat", lambda: cpu.vecmat(torch.zeros(3), torch.zeros(3, 4))),
                       ("wkv7_step", lambda: cpu.wkv7_step_cpu(one, one, one, one, one, one, None))):
        with pytest.raises(RuntimeError, match=rf"^{name}: the CPU extension is not available"):
            call()
    assert not cpu.is_available(torch.device("cpu"))
