"""LoRA's thin products in the CPU extension (cuda/thin_cpu.cpp, ops.cpu.thin_nt/thin_tn) against torch's fp64
products: every rank the kernel takes, row and column counts that leave partial bands, both layouts, a scale.

Bound: each output is an fp32 sum of n products (n = K for thin_nt, T for thin_tn) in some order, then scaled:
gamma_(n+1) of alpha times the sum of the products' magnitudes (Higham 3.1; one more rounding for the scale).
The kernels are called through the extension directly, so they run on any CPU (the AVX2 and baseline clones under
tests/ops/test_cpu_isa.py's emulated CPUs), whether or not LoRA's measured check routes its products to them there."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7.ops import cpu
from tests.fp_oracle import gamma


@pytest.fixture(scope="module")
def ext():
    assert cpu.is_available(torch.device("cpu")), "the CPU extension did not build (see the warning above)"
    return cpu._extension()


# (T, K, R): rows not a multiple of any band, columns not a multiple of a column block, the model's shapes
SHAPES = [(1, 5, 8), (29, 50, 8), (13, 37, 16), (515, 768, 16), (64, 3072, 16), (33, 70, 32), (40, 200, 64), (9, 1, 8)]


def _close(got: torch.Tensor, want: torch.Tensor, mag: torch.Tensor, n: int) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = (got.double() - want).abs()
    assert (err <= gamma(n + 1) * mag).all(), f"max error {err.max().item():.3g}, n {n}"


@pytest.mark.parametrize("T, K, R", SHAPES)
@pytest.mark.parametrize("w_rk", [False, True], ids=["w_KR", "w_RK"])
def test_thin_nt_matches_fp64(ext, T, K, R, w_rk):
    g = torch.Generator().manual_seed(T * 31 + K + R)
    x, w = torch.randn(T, K, generator=g), torch.randn(K, R, generator=g)
    alpha = 0.75
    got = ext.thin_nt(x, w.t().contiguous() if w_rk else w, alpha, w_rk)
    want = alpha * (x.double() @ w.double())
    _close(got, want, alpha * (x.double().abs() @ w.double().abs()), K)


@pytest.mark.parametrize("T, K, R", SHAPES)
@pytest.mark.parametrize("out_kr", [False, True], ids=["out_RK", "out_KR"])
def test_thin_tn_matches_fp64(ext, T, K, R, out_kr):
    g = torch.Generator().manual_seed(T * 17 + K + R)
    gr, x = torch.randn(T, R, generator=g), torch.randn(T, K, generator=g)
    alpha = -1.5
    got = ext.thin_tn(gr, x, alpha, out_kr)
    want = alpha * (gr.double().t() @ x.double())
    mag = abs(alpha) * (gr.double().abs().t() @ x.double().abs())
    if out_kr:
        want, mag = want.t(), mag.t()
    _close(got, want, mag, T)


def test_the_result_does_not_depend_on_the_thread_count(ext):
    g = torch.Generator().manual_seed(5)
    x, w, gr = torch.randn(515, 768, generator=g), torch.randn(768, 16, generator=g), torch.randn(515, 16, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.thin_nt(x, w, 1.0, False), ext.thin_tn(gr, x, 1.0, False)
        torch.set_num_threads(max(2, threads))
        many = ext.thin_nt(x, w, 1.0, False), ext.thin_tn(gr, x, 1.0, False)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_what_the_kernel_refuses_says_so(ext):
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="rank 12 is not 8, 16, 32 or 64"):
        ext.thin_nt(x, torch.randn(6, 12), 1.0, False)
    with pytest.raises(RuntimeError, match="thin_tn: g must be a contiguous fp32 CPU tensor"):
        ext.thin_tn(torch.randn(4, 8, dtype=torch.float64), x, 1.0, False)
    with pytest.raises(RuntimeError, match=r"thin_tn: g has shape \[3, 8\], expected \[4, 8\]"):
        ext.thin_tn(torch.randn(3, 8), x, 1.0, False)


def test_ops_route_only_what_the_kernel_takes(ext):
    """With `kernel` (a layer's measured check found it faster, ops/thin_check.py), fp32 and a kernel rank at 256 rows
    or more: the kernel; anything else torch's own product, bit for bit."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(cpu.THIN_MIN_ROWS, 48, generator=g)
    assert cpu.thin_takes(x, 16) and cpu.thin_takes(x, 64)
    assert not cpu.thin_takes(x[1:], 16)  # fewer rows (generation's one): BLAS, faster there
    assert not cpu.thin_takes(x, 12) and not cpu.thin_takes(x, 128)
    assert not cpu.thin_takes(x.bfloat16(), 16) and not cpu.thin_takes(x.double(), 16)
    a, gr = torch.randn(16, 48, generator=g), torch.randn(cpu.THIN_MIN_ROWS, 16, generator=g)
    # the kernel's bits where asked for; torch's where not, or with fewer rows
    assert torch.equal(cpu.thin_nt(x, a, 0.5, w_rk=True, kernel=True), ext.thin_nt(x, a, 0.5, True))
    assert torch.equal(cpu.thin_tn(gr, x, 0.5, kernel=True), ext.thin_tn(gr, x, 0.5, False))
    assert torch.equal(cpu.thin_tn(gr, x, 0.5, out_kr=True, kernel=True), ext.thin_tn(gr, x, 0.5, True))
    assert torch.equal(cpu.thin_nt(x, a, w_rk=True), torch.mm(x, a.t()))
    assert torch.equal(cpu.thin_tn(gr, x, 0.5), torch.mm(gr.t(), x).mul_(0.5))
    assert torch.equal(cpu.thin_nt(x[:20], a, w_rk=True, kernel=True), torch.mm(x[:20], a.t()))
    x = x[:20]
    for r in (12, 128):  # not a kernel rank: torch's products
        a, gr = torch.randn(r, 48, generator=g), torch.randn(20, r, generator=g)
        assert torch.equal(cpu.thin_nt(x, a, 0.5, w_rk=True, kernel=True), torch.mm(x, a.t()).mul_(0.5))
        assert torch.equal(cpu.thin_tn(gr, x, 0.5, kernel=True), torch.mm(gr.t(), x).mul_(0.5))
        assert torch.equal(cpu.thin_tn(gr, x, 0.5, out_kr=True, kernel=True), torch.mm(x.t(), gr).mul_(0.5))
    xb, ab = x.bfloat16(), torch.randn(16, 48, generator=g).bfloat16()
    assert torch.equal(cpu.thin_nt(xb, ab, w_rk=True, kernel=True), torch.mm(xb, ab.t()))
