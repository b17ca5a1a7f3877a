"""The fused loss's online softmax folded by the C++ pass (cuda/loss_cpu.cpp) against torch's ops doing the same
fold (ops/linear_ce._fold) and against the exact row sums; non-finite logits left to torch's ops."""

from __future__ import annotations

import math

import pytest
import torch

import peft_rwkv7.ops.linear_ce as lce
from peft_rwkv7.ops import cpu
from tests.fp_oracle import U32, gamma


@pytest.fixture(scope="module")
def ext():
    assert cpu.is_available(torch.device("cpu")), "the CPU kernel did not build (see the warning above)"
    return cpu._ext("wkv7")


def block(rows=37, cols=300, seed=0):
    """Logits of one block, running maxes some below and some above the block's (so some rows grow and some do
    not, one row before its first block: m = -inf), running sums and labels inside and outside the block."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=g) * 4
    m = z.amax(dim=1) + torch.randn(rows, generator=g) * 3
    m[0] = -math.inf
    s = torch.rand(rows, generator=g) * 50 + 1
    s[0] = 0.0
    a = 1000
    lab = torch.randint(a - cols, a + 2 * cols, (rows,), generator=g)
    return z, lab, a, m, s


def test_the_cpp_fold_is_torchs_fold_within_rounding(ext):
    z, lab, a, m, s = block()
    rows, cols = z.shape
    zt, mt, st, pt = z.clone(), m.clone(), s.clone(), torch.full((rows,), -7.0)
    m_new, scale_t, _ = lce._fold(zt, lab, a, a + cols, mt, st, pt)
    zc, mc, sc, pc, scale = z.clone(), m.clone(), s.clone(), torch.full((rows,), -7.0), torch.empty(rows)
    grew = ext.online_softmax_block(zc, lab, a, mc, sc, pc, scale)
    assert grew == 1 and bool((m_new > m).any())
    assert torch.equal(mc, m_new) and torch.equal(pc, pt)  # a max and a copy: exact
    inside = (lab >= a) & (lab < a + cols)
    assert inside.any() and (~inside).any() and (pc[~inside] == -7.0).all()
    # exp(x), x = z - m' rounded to fp32 first (u |x| absolute, so u |x| relative after the exp), then the exp
    # itself within a few u (Cephes' here, SLEEF's in torch)
    x = z.double() - m_new.double()[:, None]
    exact = torch.exp(x)
    assert ((zc.double() - exact).abs() <= (x.abs() + 4) * U32 * exact).all()
    assert ((zt.double() - exact).abs() <= (x.abs() + 4) * U32 * exact).all()
    want_scale = torch.exp(m.double() - m_new.double())
    assert ((scale.double() - want_scale).abs() <= 2 * U32 * want_scale).all() and scale[0] == 0
    assert (scale[m_new == m] == 1).all()
    # s scale + a cols-term sum of those exps: each term's error above, and gamma_(cols + 3) of the sum
    want_s = s.double() * want_scale + exact.sum(dim=1)
    bound = ((x.abs() + 4) * U32 * exact).sum(dim=1) + 2 * U32 * s.double() * want_scale + gamma(cols + 3) * want_s
    assert ((sc.double() - want_s).abs() <= bound).all()
    assert ((sc.double() - st.double()).abs() <= 2 * bound).all()


def test_a_block_where_no_max_grows_reports_it(ext):
    z, lab, a, _, s = block()
    m = z.amax(dim=1) + 1.0
    scale = torch.empty(z.shape[0])
    assert ext.online_softmax_block(z, lab, a, m.clone(), s, torch.empty(z.shape[0]), scale) == 0
    assert (scale == 1).all()


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_block_with_a_non_finite_logit_is_left_whole_to_torch(ext, bad):
    z, lab, a, m, s = block()
    z[5, 17] = bad
    copies = [t.clone() for t in (z, m, s)]
    picked = torch.full((z.shape[0],), -7.0)
    assert ext.online_softmax_block(z, lab, a, m, s, picked, torch.empty(z.shape[0])) == -1
    assert all(torch.equal(x, y) or (x.isnan() == y.isnan()).all() for x, y in zip((z, m, s), copies))
    assert (picked == -7.0).all()
    m[3] = math.inf  # a running max that is not finite (torch's fold of an earlier block) also goes to torch
    z[5, 17] = 0.0
    assert ext.online_softmax_block(z, lab, a, m, s, picked, torch.empty(z.shape[0])) == -1


@pytest.mark.parametrize("bad", [None, math.inf, -math.inf])
def test_the_loss_is_the_same_with_the_cpp_pass_and_without(monkeypatch, bad):
    """linear_cross_entropy with the C++ fold against torch's fold in every block: NLL and dL/dh within the
    rounding of their sums; rows with an infinite logit take torch's rules either way (a block of them
    goes to torch's ops)."""
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(40, 24, generator=g), torch.randn(700, 24, generator=g) * 0.5
    y = torch.randint(0, 700, (40,), generator=g)
    if bad is not None:
        w[650, 3] = bad  # an infinite logit in the last block for every row whose h[:, 3] is not 0

    def run():
        hh = h.clone().requires_grad_()
        nll = lce.linear_cross_entropy(hh, w, y, vocab_block=128)
        nll.sum().backward()
        return nll.detach(), hh.grad

    fused = run()
    monkeypatch.setattr(lce, "_cpu_extension", lambda: None)
    plain = run()
    for a, b in zip(fused, plain):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite) and torch.equal(a.isnan(), b.isnan())
        if finite.any():
            scale = b[finite].abs().max()
            assert ((a - b)[finite].abs() <= gamma(700 + 3 * 6) * 8 * (1 + scale)).all()


def bf16_chunk(rows=37, V=3000, seed=3):
    """A chunk of bf16 logits with labels, as _chunk_q_bf16 makes it (h @ W^T rounded to bf16)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, V, generator=g) * 4).bfloat16()
    return z, torch.randint(0, V, (rows,), generator=g)


def test_the_bf16_chunk_op_is_the_softmax_of_its_logits_within_roundings(ext):
    """softmax_grad_bf16 against fp64 on the same bf16 logits: the label's logit exact; the log-sum-exp within the
    exps' errors and gamma_(V+1) of its sum; q = softmax - onehot within its fp32 work ((|x| + 4) u per exp,
    gamma_(V+2) for the sum and the division) and one rounding to bf16 (2^-8 relative)."""
    z, lab = bf16_chunk()
    rows, V = z.shape
    lse, picked, ok = torch.empty(rows), torch.empty(rows), torch.empty(rows, dtype=torch.uint8)
    q = z.clone()
    ext.softmax_grad_bf16(q, lab, lse, picked, ok, True)
    zd = z.double()
    assert ok.all() and torch.equal(picked, z.float()[torch.arange(rows), lab])
    x = zd - zd.amax(dim=1, keepdim=True)
    e = torch.exp(x)
    s = e.sum(dim=1)
    want_lse = s.log() + zd.amax(dim=1)
    rel = ((x.abs() + 4) * U32 * e).sum(dim=1) / s + gamma(V + 1)  # the sum's relative error
    assert ((lse.double() - want_lse).abs() <= rel + 2 * U32 * want_lse.abs()).all()
    p = e / s[:, None]
    want_q = p.clone()
    want_q[torch.arange(rows), lab] -= 1
    err = (q.double() - want_q).abs()
    bound = 2.0**-8 * want_q.abs() + p * ((x.abs() + 4) * U32 + 2 * rel[:, None] + 2 * U32)
    assert (err <= bound).all(), (err - bound).max()
    # want_q False: the log-sum-exp alone, the logits untouched
    lse2, z2 = torch.empty(rows), z.clone()
    ext.softmax_grad_bf16(z2, lab, lse2, torch.empty(rows), ok, False)
    assert torch.equal(z2, z) and torch.equal(lse2, lse)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_bf16_row_with_a_non_finite_logit_goes_to_torchs_ops(ext, bad):
    """The C++ op leaves such a row untouched (ok = 0); _chunk_q_bf16 then gives it torch's rules: that row's
    log-sum-exp, label logit and q equal _chunk's, bit for bit, NaN where torch has NaN; the other rows are
    the C++ op's."""
    z, lab = bf16_chunk(rows=9, V=500, seed=4)
    z[4, 17] = bad
    h, w = z.clone(), torch.eye(500, dtype=torch.bfloat16)  # h @ w^T = z exactly
    ws = lce.Workspace()
    q, lse, picked = lce._chunk_q_bf16(h, w, lab, 0, 9, ws, 9, True, ext)
    softmax, lse_t, _, picked_t = lce._chunk(h, w, lab, 0, 9, torch.bfloat16, lce.Workspace(), 9)
    q_t = lce._to_q(softmax, lab).bfloat16()
    for got, want in ((q[4], q_t[4]), (lse[4:5], lse_t[4:5]), (picked[4:5], picked_t[4:5])):
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    others = torch.arange(9) != 4
    lse_c, ok = torch.empty(9), torch.empty(9, dtype=torch.uint8)
    q_c = z.clone()
    ext.softmax_grad_bf16(q_c, lab, lse_c, torch.empty(9), ok, True)
    assert ok.tolist() == [1] * 4 + [0] + [1] * 4
    assert torch.equal(q[others], q_c[others]) and torch.equal(lse[others], lse_c[others])


# evaluation's fp64 log-sum-exp (ops.cpu.logsumexp_f64, cuda/loss_cpu.cpp): against torch's fp64 logsumexp of the
# same rows. Tolerance: tests/fp_oracle.fp64_nll_rounding, two fp64 computations of V terms; the C++ exp_f64 is
# within 2 u of glibc's exp (measured over 2e7 points of [-708, 0]), so each term counts two roundings more.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 7, 65, 5000])
def test_the_fp64_log_sum_exp_is_torchs_within_fp64_rounding(ext, dtype, V):
    from tests.fp_oracle import fp64_nll_rounding

    g = torch.Generator().manual_seed(V)
    z = torch.randn(41, V, generator=g) * 8
    z[1] = 3.0  # all equal: the sum is V exactly
    z[2] = -1e4  # terms far below exp(-708) (they add nothing) beside the max
    z[2, V // 2] = 0.0
    z[3] *= 300  # a wide row: most terms underflow
    z[4] = z[4] * 1e-3 + 80.0  # large logits, tiny spread
    z = z.to(dtype)
    out = torch.full((41,), -7.0, dtype=torch.float64)
    ok = torch.zeros(41, dtype=torch.uint8)
    ext.logsumexp_f64(z, out, ok)
    assert ok.all()
    want = torch.logsumexp(z.double(), dim=1)
    assert (out - want).abs().max().item() <= fp64_nll_rounding(V + 4, z.abs().max().item())
    assert out[1].item() == pytest.approx(3.0 + math.log(V), abs=fp64_nll_rounding(V + 4, 3.0))
    assert torch.equal(cpu.logsumexp_f64(z), out)  # the public function: the same pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_non_finite_row_of_the_fp64_log_sum_exp_goes_to_torch(ext, dtype):
    z = torch.randn(6, 300, generator=torch.Generator().manual_seed(3))
    z[1, 5] = math.inf
    z[2, 7] = math.nan
    z[3, 9] = -math.inf  # one masked logit
    z[4] = -math.inf  # all masked
    z = z.to(dtype)
    out = torch.full((6,), -7.0, dtype=torch.float64)
    ok = torch.zeros(6, dtype=torch.uint8)
    ext.logsumexp_f64(z, out, ok)
    assert ok.tolist() == [1, 0, 0, 0, 0, 1]
    assert (out[1:5] == -7.0).all()  # left to the caller: not written
    got, want = cpu.logsumexp_f64(z), torch.logsumexp(z.double(), dim=1)
    assert torch.equal(got[1:5].nan_to_num(), want[1:5].nan_to_num())  # torch's own values: inf, nan, finite, -inf
    assert got[2].isnan() and got[1].item() == math.inf and got[4].item() == -math.inf
