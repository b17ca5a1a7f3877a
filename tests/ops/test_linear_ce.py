"""The fused chunked head + cross-entropy (ops.linear_ce) against an fp64 oracle and the plain path.

Bounds (Higham's gamma_n, tests/fp_oracle.py), per token t with logits z = h W^T in fp32:
- a logit is a C-term dot product: |dz_tv| <= gamma_C sum_c |h_tc| |W_vc| =: d_t (max over v);
- the NLL lse(z) - z_y moves by <= 2 d_t (its gradient has L1 norm <= 2), and the log-sum-exp's V-term
  sum, exp and log add gamma_(V+4) (1 + 2 max|z_t|);
- q = softmax - onehot moves by <= p_v (e^(2 d_t + gamma_(V+4)(1 + 2 max|z|)) - 1) per entry, and
  dnll/dh = q W is a V-term product: gamma_V sum_v |q_v| |W_vc| on top;
- dW = sum_t g_t q_t^T h_t adds gamma_N over the N rows.
The plain path (F.linear + F.cross_entropy) is held to the same bounds, which checks the bounds are not
tighter than fp32 can do; fused and plain then agree within the sum of both.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peft_rwkv7.ops.linear_ce import _logsumexp_, linear_cross_entropy
from tests.fp_oracle import U32, UBF16, gamma


def _problem(n=300, c=48, v=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g)
    w = torch.randn(v, c, generator=g) * 0.3
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100  # not scored
    weights = torch.rand(n, generator=g) + 0.5  # per-token loss weights (as per-sequence log-probs give)
    return h, w, y, weights


def _oracle(h, w, y, weights):
    """fp64 NLL, dL/dh, dL/dW for L = sum_t weights_t nll_t."""
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    nll = F.cross_entropy(h64 @ w64.t(), y, ignore_index=-100, reduction="none")
    (nll * weights.double()).sum().backward()
    return nll.detach(), h64.grad, w64.grad


def _bounds(h, w, y, weights, blocks=0):
    """Per-token NLL bound [N], dL/dh bound [N, C], dL/dW bound [V, C] (see the module docstring). `blocks`:
    the online path's vocabulary blocks, each of which may rescale the running sum and dL/dh once more (an
    exp, a product and a sum per block: 3 more roundings each, counted as 3 more terms of the V-term sums)."""
    c, v, n = h.shape[1], w.shape[0] + 3 * blocks, h.shape[0]
    hd, wd = h.double(), w.double()
    z = hd @ wd.t()
    d = gamma(c) * (hd.abs() @ wd.abs().t()).amax(dim=1)  # [N]
    lse_err = gamma(v + 4) * (1 + 2 * z.abs().amax(dim=1))
    valid = (y != -100).double()
    nll_b = (2 * d + lse_err) * valid
    p = torch.softmax(z, dim=1)
    q = p.clone()
    rows = torch.arange(n)
    q[rows, y.clamp(min=0)] -= 1
    q = q * valid[:, None]
    dq = p * torch.expm1(2 * d + lse_err)[:, None] * valid[:, None]  # bound on |q_fp32 - q|
    g = weights.double()[:, None]
    dh_b = g * (dq @ wd.abs() + gamma(v) * (q.abs() @ wd.abs()))
    dw_b = (g * (dq + gamma(n + 1) * q.abs())).t() @ hd.abs()
    return nll_b, dh_b, dw_b


@pytest.mark.parametrize("chunk_elements", [1, 7 * 3000, 1 << 25])  # one row, 7 rows, all rows per chunk
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("uniform", [False, True])
def test_fused_and_plain_both_within_fp32_bounds_of_the_fp64_oracle(chunk_elements, train_head, uniform):
    h, w, y, weights = _problem()
    if uniform:  # a token-sum loss: the trained head's gradient is scaled, not recomputed
        weights = torch.full_like(weights, 0.75)
    nll64, dh64, dw64 = _oracle(h, w, y, weights)
    nll_b, dh_b, dw_b = _bounds(h, w, y, weights)

    def run(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(train_head)
        nll = fn(hh, ww)
        (nll * weights).sum().backward()
        return nll.detach(), hh.grad, ww.grad

    fused = run(lambda hh, ww: linear_cross_entropy(hh, ww, y, chunk_elements=chunk_elements))
    plain = run(lambda hh, ww: F.cross_entropy(F.linear(hh, ww), y, ignore_index=-100, reduction="none"))
    for name, (nll, dh, dw) in (("fused", fused), ("plain", plain)):
        assert ((nll.double() - nll64).abs() <= nll_b).all(), name
        assert ((dh.double() - dh64).abs() <= dh_b).all(), name
        if train_head:
            assert ((dw.double() - dw64).abs() <= dw_b).all(), name
        else:
            assert dw is None
    assert (fused[0][y == -100] == 0).all()  # unscored tokens: NLL 0 and no gradient
    assert (fused[1][y == -100] == 0).all()
    with torch.no_grad():  # evaluation (no autograd): the same values within the same bound
        nll = linear_cross_entropy(h, w, y, chunk_elements=chunk_elements)
    assert ((nll.double() - nll64).abs() <= nll_b).all()


@pytest.mark.parametrize("vocab_block", [1, 7, 1000, 1 << 20])  # one column, 7, three blocks, one block
def test_the_online_path_is_within_fp32_bounds_of_the_fp64_oracle(vocab_block):
    """CPU fp32 without a trained head: blocks of `vocab_block` columns, the running max and sums rescaled
    where a block raises a row's max (a one-column block rescales at nearly every column)."""
    h, w, y, weights = _problem()
    blocks = -(-w.shape[0] // vocab_block)
    nll64, dh64, _ = _oracle(h, w, y, weights)
    nll_b, dh_b, _ = _bounds(h, w, y, weights, blocks=blocks)
    hh = h.clone().requires_grad_()
    chunk = 7 * 3000 if vocab_block > 1 else 1 << 25  # 7-row chunks; one-column blocks in one chunk (time)
    nll = linear_cross_entropy(hh, w, y, chunk_elements=chunk, vocab_block=vocab_block)
    (nll * weights).sum().backward()
    assert ((nll.detach().double() - nll64).abs() <= nll_b).all()
    assert ((hh.grad.double() - dh64).abs() <= dh_b).all()
    assert (nll.detach()[y == -100] == 0).all() and (hh.grad[y == -100] == 0).all()
    with torch.no_grad():
        assert ((linear_cross_entropy(h, w, y, vocab_block=vocab_block).double() - nll64).abs() <= nll_b).all()


def test_the_online_path_holds_one_block_of_logits():
    """The workspace of the online path is one [rows, vocab_block] block, not a [rows, V] chunk: at the 0.1B
    head's shape (V 65536) 4 MiB instead of 128 MiB. A trained head keeps the chunk (its dW needs the final
    softmax of every logit)."""
    from peft_rwkv7.ops.linear_ce import VOCAB_BLOCK, Workspace

    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(512, 16, generator=g), torch.randn(65536, 16, generator=g) * 0.1
    y = torch.randint(0, 65536, (512,), generator=g)
    for trained, most in ((False, 512 * VOCAB_BLOCK), (True, 512 * 65536)):
        ws, hh = Workspace(), h.clone().requires_grad_()
        linear_cross_entropy(hh, w.clone().requires_grad_(trained), y, workspace=ws).sum().backward()
        assert max(t.numel() for t in ws._bufs.values()) == most


def test_labels_outside_the_vocabulary_are_an_error():
    h, w, y, _ = _problem(n=20, v=50)
    for bad in (50, -3):
        y2 = y.clone()
        y2[4] = bad
        with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
            linear_cross_entropy(h, w, y2)


def test_bf16_autocast_matches_the_plain_bf16_path():
    """Under CPU bf16 autocast both paths round the logits and the backward's products to bf16: they agree
    within those roundings (a logit may round to the neighbouring bf16 value: u_bf16 |z| per logit, and
    the bf16 gradient product differs by a few bf16 roundings of sum_v |q_v| |W_vc|)."""
    h, w, y, weights = _problem(n=200, c=64, v=2000, seed=1)
    wb = w.to(torch.bfloat16)  # frozen weights are stored in bf16 under bf16 training

    def run(fn):
        hh = h.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll = fn(hh)
        (nll * weights).sum().backward()
        return nll.detach(), hh.grad

    nf, gf = run(lambda hh: linear_cross_entropy(hh, wb, y, chunk_elements=5 * 2000))
    npl, gpl = run(lambda hh: F.cross_entropy(F.linear(hh, wb).float(), y, ignore_index=-100, reduction="none"))
    assert nf.dtype == torch.float32 and gf.dtype == torch.float32
    z = h.to(torch.bfloat16).float() @ wb.float().t()
    zmax = z.abs().amax(dim=1)
    # each path's logits within u_bf16 |z| + gamma_C |h||W| of exact: NLLs within twice that, twice over
    d = UBF16 * zmax + gamma(64) * (h.abs() @ wb.float().abs().t()).amax(dim=1)
    assert ((nf - npl).abs() <= 4 * d + 2 * gamma(2004) * (1 + 2 * zmax)).all()
    qw = (torch.softmax(z, 1) + F.one_hot(y.clamp(min=0), 2000)).mul((y != -100)[:, None]) @ wb.float().abs()
    bound = weights[:, None] * (6 * UBF16 + 4 * d[:, None]) * qw  # q's bf16 rounding, product, output rounding
    assert ((gf - gpl).abs() <= bound + 1e-30).all()
    # and bf16 really ran: the gap to fp32 products of the same (bf16-stored) weights is bf16-sized
    nll32 = F.cross_entropy(h @ wb.float().t(), y, ignore_index=-100, reduction="none")
    assert (nf - nll32).abs().max() > 100 * U32 * nll32.abs().max()


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(torch.zeros(2, 3, 8), torch.zeros(10, 7), torch.zeros(2, 3, dtype=torch.long))
    out = linear_cross_entropy(torch.zeros(2, 3, 8), torch.zeros(10, 8), torch.zeros(2, 3, dtype=torch.long))
    assert out.shape == (2, 3)
    assert torch.allclose(out, torch.full((2, 3), math.log(10)))  # uniform logits: NLL = log V


@pytest.mark.parametrize("bf16", [False, True])
def test_a_shared_workspace_changes_no_bit_even_between_forward_and_backward(bf16):
    """Two losses through one workspace, both backwards after both forwards (as DPO's chosen and rejected
    do): the same NLL and gradients, bit for bit, as with a fresh workspace each (nothing saved for
    backward may point into the reused buffers)."""
    from peft_rwkv7.ops.linear_ce import Workspace

    (h1, w, y1, g1), (h2, _, y2, g2) = _problem(seed=1), _problem(seed=2)

    def run(shared):
        ws = Workspace() if shared else None
        hs = [h1.clone().requires_grad_(), h2.clone().requires_grad_()]
        wt = w.clone().requires_grad_()  # a trained head: per-row weights make backward recompute chunks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            nlls = [linear_cross_entropy(h, wt, y, chunk_elements=70 * 3000, workspace=ws)
                    for h, y in zip(hs, (y1, y2))]
        ((nlls[0] * g1).sum() + (nlls[1] * g2).sum()).backward()
        return [n.detach() for n in nlls] + [hs[0].grad, hs[1].grad, wt.grad], ws

    fresh, _ = run(False)
    shared, ws = run(True)
    for a, b in zip(fresh, shared):
        assert torch.equal(a, b)
    # the buffers were made once: a third call takes the same memory
    bufs = {k: t.data_ptr() for k, t in ws._bufs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.no_grad():
        linear_cross_entropy(h1, w, y1, chunk_elements=70 * 3000, workspace=ws)
    assert {k: t.data_ptr() for k, t in ws._bufs.items()} == bufs


def test_the_models_head_keeps_its_workspace():
    from tests.conftest import make_model

    model = make_model(seed=0, n_layer=1, n_embd=32, head_size=16)
    idx = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    model.token_nll(idx, idx)[0].sum().backward()
    ws = model.head._ce_workspace
    ptrs = [t.data_ptr() for t in ws._bufs.values()]
    model.token_nll(idx, idx)[0].sum().backward()
    assert model.head._ce_workspace is ws and [t.data_ptr() for t in ws._bufs.values()] == ptrs
    assert "_ce_workspace" not in "".join(model.state_dict())


@pytest.mark.parametrize("block_elements", [1, 5 * 1000, 1 << 40])  # one row, 5 rows, the whole chunk per block
def test_the_softmax_blocks_leave_each_row_as_torch_computes_it(block_elements):
    """_logsumexp_ works over blocks of rows (cache-sized): each row gets torch.logsumexp's value within fp32
    rounding (its own V-term sum, exp and log: gamma_(V+4) (1 + 2 max|z|)) and the softmax within the same,
    relative, and non-finite rows keep torch's answers; the blocks change no bit against one block."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(23, 1000, generator=g) * 8
    z[4] = float("-inf")  # an all -inf row: lse -inf, softmax nan (as torch)
    z[9, 17] = float("inf")  # a +inf logit: lse inf
    z[12, :500] = float("-inf")  # half the row masked out
    got = z.clone()
    lse = _logsumexp_(got, block_elements)
    want = torch.logsumexp(z.double(), dim=1)
    finite = torch.isfinite(want)
    zmax = z.double().abs().where(torch.isfinite(z), 0).amax(dim=1)
    tol = gamma(1000 + 4) * (1 + 2 * zmax)
    assert ((lse.double() - want).abs() <= tol)[finite].all()
    assert torch.equal(lse[~finite], want[~finite].float())
    p = torch.softmax(z.double(), dim=1)
    assert ((got.double() - p).abs() <= p * torch.expm1(tol)[:, None] + 1e-300)[finite].all()
    assert torch.isnan(got[4]).all() and torch.isnan(got[9, 17])  # torch.softmax: nan in both rows (all of row 9)
    one = z.clone()
    assert torch.equal(_logsumexp_(one, 1 << 40), lse) and torch.equal(one.nan_to_num(7.0), got.nan_to_num(7.0))


@pytest.mark.parametrize("train_head", [False, True])
def test_ignored_rows_never_reach_the_head(train_head):
    """Rows labelled -100 skip the head's products: the matmul FLOPs are those of the scored rows alone
    (2 C V each for the logits and dL/dh; a trained head with per-row weights adds dL/dW in forward and the
    logits and dL/dW again in backward: 5 products), counted by torch's FlopCounterMode, and whatever an
    ignored row holds (here inf/nan) changes no NLL and no gradient."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w, y, weights = _problem(n=60, c=16, v=500)
    y[30:] = -100  # a padded tail on top of every 7th row
    n_scored = int((y != -100).sum())
    nll64, dh64, dw64 = _oracle(h, w, y, weights)
    nll_b, dh_b, dw_b = _bounds(h, w, y, weights)
    bad = h.clone()
    bad[y == -100] = float("inf")
    bad[50] = float("nan")
    hh, ww = bad.requires_grad_(), w.clone().requires_grad_(train_head)
    with FlopCounterMode(display=False) as fc:
        nll = linear_cross_entropy(hh, ww, y, chunk_elements=7 * 500)
        (nll * weights).sum().backward()
    assert fc.get_total_flops() == (5 if train_head else 2) * 2 * n_scored * 16 * 500
    assert ((nll.detach().double() - nll64).abs() <= nll_b).all()
    assert ((hh.grad.double() - dh64).abs() <= dh_b).all()
    assert (nll.detach()[y == -100] == 0).all() and (hh.grad[y == -100] == 0).all()
    if train_head:
        assert ((ww.grad.double() - dw64).abs() <= dw_b).all()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        nll = linear_cross_entropy(bad, w, y)
    assert fc.get_total_flops() == 2 * n_scored * 16 * 500 and ((nll.double() - nll64).abs() <= nll_b).all()
    none = torch.full_like(y, -100)  # nothing scored: zeros, and a gradient of zeros
    hh = h.clone().requires_grad_()
    out = linear_cross_entropy(hh, w, none)
    out.sum().backward()
    assert (out == 0).all() and (hh.grad == 0).all()


def test_the_workspace_grows_by_doubling_up_to_a_full_chunk():
    """Scored rows vary from batch to batch: requests growing a few rows at a time take one or two buffers
    (twice the request, up to the largest chunk), not one each; a buffer is never more than the largest
    chunk, and without `most` it is the request (a caller that knows no bound)."""
    from peft_rwkv7.ops.linear_ce import Workspace

    ws, made = Workspace(), set()
    for rows in (3, 4, 5, 7, 9, 12, 16, 20, 26, 31, 32, 30, 5):
        buf = ws.get(rows, 10, torch.float32, torch.device("cpu"), most=32)
        assert buf.shape == (rows, 10)
        made.add(ws._bufs[(torch.float32, torch.device("cpu"))].numel())
    assert made == {6 * 10, 14 * 10, 32 * 10}  # 3 -> 6, 7 -> 14, 16 -> 32 rows (doubling), then all fit
    plain = Workspace()
    plain.get(3, 10, torch.float32, torch.device("cpu"))
    assert plain._bufs[(torch.float32, torch.device("cpu"))].numel() == 30
