"""What mutation testing of ops/linear_ce.py found untested (scripts/mutation.sh linear_ce, docs/mutation.md): the
bf16 path without the CPU extension (a GPU's: q rounded into the bf16 buffer, dW from it), logits beyond exp's range,
labels on the online path's block edges with torch's fold, a vocabulary smaller than a chunk's rows, int32 labels,
a trained head with one scored row, none, or an h that wants no gradient, bf16 h without autocast, which work the
C++ extension does (each block folded in C++ with the caller's block size, bf16 chunks by its softmax op), and the
memory promises: the chunk's logits in the workspace's buffers, a chunk of about chunk_elements logits, h and W kept
for the backward only for a trained head. Oracles: fp64 autograd of F.cross_entropy (tests/ops/test_linear_ce.py),
the plain bf16 path with that file's bounds, hand-derived values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from peft_rwkv7.ops import cpu
from peft_rwkv7.ops import linear_ce as lce
from peft_rwkv7.ops.linear_ce import Workspace, linear_cross_entropy
from tests.conftest import spy_extension
from tests.fp_oracle import UBF16, gamma
from tests.ops.test_linear_ce import _bounds, _oracle, _problem, test_bf16_autocast_matches_the_plain_bf16_path

HAS_EXT = cpu.is_available(torch.device("cpu"))
CPU = torch.device("cpu")


def _no_extension(monkeypatch) -> None:
    monkeypatch.setattr(lce, "_cpu_extension", lambda: None)


def test_bf16_without_the_extension_matches_the_plain_bf16_path(monkeypatch):
    """A GPU's path (and a CPU without the compiled extension): the chunk's softmax in fp32, q rounded into the
    bf16 buffer, dL/dh = q W in bf16; the same bounds as the CPU's bf16 path against the plain bf16 path."""
    _no_extension(monkeypatch)
    test_bf16_autocast_matches_the_plain_bf16_path()


def _bf16_trained_head(h, w, y, weights, chunk_elements: int, h_grad: bool):
    """The fused and the plain bf16 path (under CPU bf16 autocast) with the head trained: ((NLL, dL/dh, dL/dW) fused,
    (the same) plain), for L = sum_t weights_t nll_t."""
    def run(fn):
        hh, ww = h.clone().requires_grad_(h_grad), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll = fn(hh, ww)
        (nll * weights).sum().backward()
        return nll.detach(), hh.grad, ww.grad

    return (run(lambda hh, ww: linear_cross_entropy(hh, ww, y, chunk_elements=chunk_elements)),
            run(lambda hh, ww: F.cross_entropy(F.linear(hh, ww).float(), y, ignore_index=-100, reduction="none")))


def _bf16_bounds(h, w, y, weights):
    """test_bf16_autocast_matches_the_plain_bf16_path's bounds between the two bf16 paths, over the finite logits (a
    -inf logit has softmax 0): (d [N], the largest finite |z| [N], the dL/dh bound [N, C], the dL/dW bound [V, C])."""
    hb, wb = h.bfloat16().float(), w.bfloat16().float()
    z, wf = hb @ wb.t(), wb.masked_fill(torch.isinf(wb), 0.0)
    zmax = z.masked_fill(torch.isinf(z), 0.0).abs().amax(dim=1)
    d = UBF16 * zmax + gamma(h.shape[1]) * (hb.abs() @ wf.abs().t()).amax(dim=1)
    pq = (torch.softmax(z, 1) + F.one_hot(y.clamp(min=0), w.shape[0])).mul((y != -100)[:, None])
    scale = weights[:, None] * (6 * UBF16 + 4 * d[:, None])
    return d, zmax, scale * (pq @ wf.abs()), (scale * pq).t() @ hb.abs()


@pytest.mark.parametrize("extension", [True, False], ids=["extension", "torch"])
def test_a_trained_head_under_bf16_gets_the_plain_paths_gradient(extension, monkeypatch):
    """`train_parts: [head]` under bf16 autocast: dW = sum_t g_t q_t^T h_t from bf16 q and h, within the roundings
    of the plain bf16 path (test_bf16_autocast_matches_the_plain_bf16_path's bound, summed over the rows)."""
    if not extension:
        _no_extension(monkeypatch)
    h, w, y, weights = _problem(n=120, c=32, v=900, seed=2)
    (_, ghf, gwf), (_, ghp, gwp) = _bf16_trained_head(h, w, y, weights, 50 * 900, h_grad=True)
    assert gwf.dtype == torch.float32 and ghf.dtype == torch.float32
    _, _, bound_h, bound_w = _bf16_bounds(h, w, y, weights)
    assert ((gwf - gwp).abs() <= bound_w + 1e-30).all()
    assert ((ghf - ghp).abs() <= bound_h + 1e-30).all()


@pytest.mark.parametrize("path", ["online", "online-torch", "chunked"])
def test_logits_far_beyond_exps_range_give_the_exact_loss(path, monkeypatch):
    """Logits of +-2000 (e^2000 overflows fp32 and fp64): every path shifts by the row's running max, so the NLL and
    its gradient are the fp64 oracle's (which shifts too) within the fp32 bounds, not inf or NaN."""
    if path == "online-torch":
        _no_extension(monkeypatch)
    h, w, y, weights = _problem(n=40, c=16, v=500, seed=3)
    h = h * 300  # |z| up to ~2000
    nll0, dh0, dw0 = _oracle(h, w, y, weights)
    assert nll0.isfinite().all() and (h.double() @ w.double().t()).abs().max() > 1000
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(path == "chunked")
    nll = linear_cross_entropy(hh, ww, y, vocab_block=64)
    (nll * weights).sum().backward()
    nll_b, dh_b, dw_b = _bounds(h, w, y, weights, blocks=8)
    assert ((nll.double() - nll0).abs() <= nll_b + 1e-30).all()
    assert ((hh.grad.double() - dh0).abs() <= dh_b + 1e-30).all()
    if path == "chunked":
        assert ((ww.grad.double() - dw0).abs() <= dw_b + 1e-30).all()


def test_labels_on_the_block_edges_are_picked_by_torchs_fold(monkeypatch):
    """The online path with torch's fold (no extension, or a block with an infinite logit): a label equal to a
    block's first column is that block's, one equal to its end is the next block's; V = 70 in blocks of 7."""
    _no_extension(monkeypatch)
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(12, 8, generator=g), torch.randn(70, 8, generator=g)
    y = torch.tensor([0, 6, 7, 13, 14, 35, 62, 63, 69, 7, 0, 69])
    weights = torch.ones(12)
    nll0, dh0, _ = _oracle(h, w, y, weights)
    hh = h.clone().requires_grad_()
    nll = linear_cross_entropy(hh, w, y, vocab_block=7)
    nll.sum().backward()
    nll_b, dh_b, _ = _bounds(h, w, y, weights, blocks=10)
    assert ((nll.double() - nll0).abs() <= nll_b + 1e-30).all()
    assert ((hh.grad.double() - dh0).abs() <= dh_b + 1e-30).all()


@pytest.mark.parametrize("bf16", [False, True])
def test_a_vocabulary_smaller_than_a_chunks_rows(bf16, monkeypatch):
    """A chunk of 60 rows over a 5-word vocabulary (the chunked path: a trained head; under bf16 torch's path):
    every row's log-sum-exp is taken, not only the first V rows'."""
    g = torch.Generator().manual_seed(5)
    h, w, y = torch.randn(60, 8, generator=g), torch.randn(5, 8, generator=g), torch.randint(0, 5, (60,), generator=g)
    if bf16:
        _no_extension(monkeypatch)
        h, w = h.bfloat16().float(), w.bfloat16().float()
    ww = w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        nll = linear_cross_entropy(h, ww, y)
    z = (h.double() @ w.double().t())
    want = F.cross_entropy(z, y, reduction="none")
    tol = (4 * UBF16 if bf16 else 1e-5) * (1 + z.abs().amax(dim=1))
    assert ((nll.double() - want).abs() <= tol).all()


def test_int32_labels_are_the_int64_labels_loss():
    h, w, y, weights = _problem(n=50, c=16, v=700, seed=6)
    nll0, dh0, _ = _oracle(h, w, y, weights)
    nll_b, dh_b, _ = _bounds(h, w, y, weights, blocks=11)
    for labels in (y, y.int()):
        hh = h.clone().requires_grad_()
        nll = linear_cross_entropy(hh, w, labels, vocab_block=64)
        (nll * weights).sum().backward()
        assert ((nll.double() - nll0).abs() <= nll_b + 1e-30).all()
        assert ((hh.grad.double() - dh0).abs() <= dh_b + 1e-30).all()


@pytest.mark.parametrize("scored", [1, 0])
@pytest.mark.parametrize("h_grad", [True, False])
def test_a_trained_head_with_one_scored_row_or_none(scored, h_grad):
    """A trained head (dW summed in the forward, scaled in the backward) where one row is scored, or none (dW = 0),
    with h wanting a gradient or not (`train_parts: [head]` alone)."""
    h, w, y, _ = _problem(n=6, c=8, v=40, seed=7)
    y[:] = -100
    y[2:2 + scored] = 11
    weights = torch.full((6,), 0.75)
    hh, ww = h.clone().requires_grad_(h_grad), w.clone().requires_grad_()
    (linear_cross_entropy(hh, ww, y) * weights).sum().backward()
    _, dh0, dw0 = _oracle(h, w, y, weights)
    assert ((ww.grad.double() - dw0).abs() <= 1e-5 * (1 + dw0.abs().max())).all()
    if scored == 0:
        assert not ww.grad.any()
    assert (hh.grad is None) == (not h_grad)
    if h_grad:
        assert ((hh.grad.double() - dh0).abs() <= 1e-5 * (1 + dh0.abs().max())).all()


def test_bf16_h_without_autocast_gives_an_fp32_loss():
    """A bf16 model run without autocast (bf16 h and head): the NLL is fp32, as documented, not rounded to bf16."""
    h, w, y, _ = _problem(n=30, c=16, v=300, seed=8)
    hb, wb = h.bfloat16(), w.bfloat16()
    nll = linear_cross_entropy(hb, wb, y)
    assert nll.dtype == torch.float32
    z = hb.float() @ wb.float().t()
    want = F.cross_entropy(z.double(), y, ignore_index=-100, reduction="none")
    # the logits are rounded to bf16 (<= u |z| each), the rest fp32: far from the bf16 rounding of the NLL itself
    assert ((nll.double() - want).abs() <= 2 * UBF16 * z.abs().amax(dim=1) + 1e-5).all()
    assert not torch.equal(nll.double(), nll.bfloat16().double())  # values bf16 cannot hold


@pytest.mark.skipif(not HAS_EXT, reason="the CPU extension did not build")
@pytest.mark.parametrize("grad", [True, False])
def test_the_extension_folds_every_block_of_the_callers_size(grad, monkeypatch):
    """fp32 on the CPU: each vocabulary block of the caller's `vocab_block` is folded by the C++ pass, with and
    without autograd (V = 700 in blocks of 64: 11 blocks per chunk)."""
    calls = spy_extension(monkeypatch, "online_softmax_block")
    h, w, y, _ = _problem(n=20, c=8, v=700, seed=9)
    with torch.set_grad_enabled(grad):
        linear_cross_entropy(h.clone().requires_grad_(grad), w, y, vocab_block=64)
    assert len(calls) == 11


@pytest.mark.skipif(not HAS_EXT, reason="the CPU extension did not build")
def test_bf16_chunks_on_the_cpu_take_the_extensions_softmax(monkeypatch):
    calls = spy_extension(monkeypatch, "softmax_grad_bf16")
    h, w, y, _ = _problem(n=20, c=8, v=700, seed=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy(h.clone().requires_grad_(), w, y, chunk_elements=5 * 700)
    assert len(calls) == 4  # 17 scored rows in chunks of 5


class _HeadProducts(TorchDispatchMode):
    """Records every matmul whose result has `cols` columns (the head's logits): (op, rows)."""

    def __init__(self, cols):
        super().__init__()
        self.cols, self.seen = cols, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm) and out.dim() == 2 \
                and out.shape[1] == self.cols:
            self.seen.append((str(func), out.shape[0]))
        return out


@pytest.mark.parametrize("case", ["bf16-extension", "bf16-torch", "fp32-trained-head"])
def test_the_chunks_logits_are_made_in_the_workspaces_buffers(case, monkeypatch):
    """The chunked path writes each chunk's [rows, V] logits into the workspace (`out=`: the buffers kept between
    steps, no fresh pages), in chunks of about chunk_elements logits, and the buffers hold no more than that."""
    if case == "bf16-torch" or not HAS_EXT:
        _no_extension(monkeypatch)
    h, w, y, _ = _problem(n=40, c=8, v=500, seed=11)
    ws = Workspace()
    ww = w.clone().requires_grad_(case == "fp32-trained-head")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case != "fp32-trained-head"), _HeadProducts(500) as rec:
        linear_cross_entropy(h.clone().requires_grad_(), ww, y, chunk_elements=6 * 500, workspace=ws)
    assert rec.seen and all(op.endswith(".out") for op, _ in rec.seen), rec.seen
    assert max(rows for _, rows in rec.seen) == 6  # 34 scored rows in chunks of 6
    for (dtype, _), buf in ws._bufs.items():
        assert buf.numel() == 6 * 500, (dtype, buf.numel())
    assert (torch.bfloat16, CPU) in ws._bufs or case == "fp32-trained-head"


def test_without_a_trained_head_the_backward_keeps_neither_h_nor_the_weight():
    """dL/dh is made in the forward: the node keeps dnll/dh and the labels, not h ([N, C]) nor W ([V, C])."""
    h, w, y, _ = _problem(n=20, c=8, v=300, seed=12)
    nll = linear_cross_entropy(h.clone().requires_grad_(), w, y)
    todo, node = [nll.grad_fn], None
    while todo and node is None:
        fn = todo.pop()
        if fn is not None and type(fn).__name__ == "_LinearCrossEntropyBackward":
            node = fn
        elif fn is not None:
            todo.extend(f for f, _ in fn.next_functions)
    assert node is not None
    kept = node.saved_tensors
    assert [t is None for t in kept] == [False, True, True, True, False]  # dh, dW, h, W, labels


def test_a_small_vocabulary_under_many_rows_takes_every_rows_log_sum_exp():
    """A trained 256-word head (a byte-level vocabulary) over 2,100 rows in one chunk: the softmax blocks of
    BLOCK_ELEMENTS logits hold 2,048 rows each, so the chunk takes two, and the last 52 rows are not skipped."""
    g = torch.Generator().manual_seed(13)
    h, w = torch.randn(2100, 8, generator=g), torch.randn(256, 8, generator=g)
    y = torch.randint(0, 256, (2100,), generator=g)
    nll = linear_cross_entropy(h, w.clone().requires_grad_(), y, chunk_elements=2100 * 256)
    want = F.cross_entropy(h.double() @ w.double().t(), y, reduction="none")
    assert ((nll.double() - want).abs() <= 1e-5 * (1 + want.abs())).all()


@pytest.mark.parametrize("case", ["fp32-online", "fp32-trained-head", "bf16-extension", "bf16-torch"])
def test_a_workspace_serves_a_few_more_rows_without_a_new_buffer(case, monkeypatch):
    """Scored rows grow a little from batch to batch: the workspace's buffers, made for twice the first request
    (up to a full chunk), serve the next call of 12 rows after one of 10 without being made again."""
    if case == "bf16-torch" or not HAS_EXT:
        _no_extension(monkeypatch)
    h, w, y, _ = _problem(n=12, c=8, v=500, seed=14)
    y[:] = 3
    ws = Workspace()

    def call(rows):
        ww = w.clone().requires_grad_(case == "fp32-trained-head")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.startswith("bf16")):
            linear_cross_entropy(h[:rows].clone().requires_grad_(), ww, y[:rows], workspace=ws)
        return dict(ws._bufs)  # the buffer tensors themselves: held here, so none can be freed and made again

    first = call(10)
    second = call(12)
    assert first and second.keys() == first.keys() and all(second[k] is first[k] for k in first)


def test_a_trained_heads_backward_recomputes_the_logits_only_for_per_row_weights():
    """dW for a token-sum or token-mean loss (one weight for every row) is the forward's sum scaled: no head product
    in the backward. Per-row weights (per-sequence log-probs) recompute each chunk, in chunks of the forward's rows."""
    h, w, y, weights = _problem(n=30, c=8, v=500, seed=15)
    for per_row in (False, True):
        ww = w.clone().requires_grad_()
        nll = linear_cross_entropy(h, ww, y, chunk_elements=6 * 500)
        loss = (nll * (weights if per_row else 0.5)).sum()
        with _HeadProducts(500) as rec:
            loss.backward()
        if per_row:
            assert rec.seen and max(rows for _, rows in rec.seen) == 6, rec.seen
        else:
            assert rec.seen == []
        _, _, dw0 = _oracle(h, w, y, weights if per_row else torch.full((30,), 0.5))
        assert ((ww.grad.double() - dw0).abs() <= 1e-5 * (1 + dw0.abs().max())).all()


@pytest.mark.parametrize("extension", [True, False], ids=["extension", "torch"])
def test_a_trained_head_under_bf16_with_a_minus_inf_logit(extension, monkeypatch):
    """A head row of -inf (a word the model must never emit) under bf16 autocast with the head trained: every row's
    logit there is -inf, which the C++ softmax op leaves to torch's ops (the row's q = softmax - onehot made in fp32
    there). dW of the other words is the plain bf16 path's within its bounds (dL/dh is NaN on both: 0 x -inf)."""
    if not extension:
        _no_extension(monkeypatch)
    h, w, y, _ = _problem(n=40, c=16, v=300, seed=16)
    weights = torch.full((40,), 0.5)  # a token mean: dW is the forward's sum, made from the forward's q
    h[:, 0] = h[:, 0].abs() + 0.5  # so that h_t0 x -inf is -inf for every row, not NaN
    w[7] = 0.0
    w[7, 0] = -float("inf")
    y[y == 7] = 8
    (nf, _, gwf), (npl, _, gwp) = _bf16_trained_head(h, w, y, weights, 10 * 300, h_grad=False)
    assert torch.isneginf(h.bfloat16().float() @ w.bfloat16().float()[7]).all()
    d, zmax, _, bound_w = _bf16_bounds(h, w, y, weights)
    assert ((nf - npl).abs() <= 4 * d + 2 * gamma(304) * (1 + 2 * zmax)).all()
    others = torch.arange(300) != 7
    assert gwf[others].isfinite().all()
    assert ((gwf - gwp)[others].abs() <= bound_w[others] + 1e-30).all()
