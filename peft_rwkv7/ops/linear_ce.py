"""The head and the cross-entropy fused and chunked: per-token NLL of `labels` under `h @ weight.T` without
ever holding all [N, V] logits.

The plain path materialises the logits (0.1B at ctx 4096: 4096 x 65536 fp32 = 1 GiB), keeps log-softmax for
backward (another 1 GiB) and builds a gradient of the same size. Here the rows go through in chunks of
about CHUNK_ELEMENTS logits; each chunk's logits are turned in place into the softmax and the gradient of
its NLL with respect to h is computed at once, in the forward: the NLL of row t is a function of h[t]
alone, so whatever weight g[t] the caller's loss gives it, dL/dh[t] = g[t] * dnll[t]/dh[t], and backward
only scales rows (the idea of Liger-Kernel's fused linear cross-entropy, here with per-token weights so
that per-sequence log-probs, DPO's included, take it too). Saved for backward: dnll/dh [N, C] fp32.

A trained head (full fine-tuning, `train_parts: [head]`) also needs dW = sum_t g[t] q[t]^T h[t] with
q[t] = softmax - onehot: its g-independent part is summed in the forward, and backward scales it when g is
the same for every row (a token-sum or token-mean loss); for other weights (per-sequence ones) backward
recomputes the chunks' softmax.

On the CPU in fp32 without a trained head (the common case: adapters and state tuning) a chunk's rows go
through the vocabulary in blocks of VOCAB_BLOCK columns instead, online (flash-attention's softmax): each
block's logits are made, folded into a running max and sum of exponentials, and multiplied by the block's
weight rows into dnll/dh while they are still in cache, the sums rescaled when a row's max grows; at the end
dnll/dh = (sum_v e^(z_v - m) W_v) / s - W_label. The [rows, V] logits are never held (a 4 MiB block instead of
a 128 MiB chunk), and the head's GEMM writes cache-sized blocks: on a 2-core AMD EPYC (AVX2) the forward head
GEMM runs at 172 GFLOP/s in [512, 2048] blocks against 138 into a [512, 65536] chunk, and the loss alone
(scripts/bench_loss.py) takes 0.60 s instead of 0.71 s at ctx 512, 4.8 s instead of 5.3 s at ctx 4096. Where
the CPU extension is built, a block's fold (max, exponentials, sums, the label's logit) is one C++ call of two
passes (cuda/loss_cpu.cpp); a block with a non-finite logit is folded by torch's ops (`_fold`), whose rules
for infinities the C++ pass does not copy.

Precision follows the plain path: the products run in the autocast dtype where autocast is on (bf16
logits, then fp32 for the log-sum-exp), otherwise in the promoted dtype of h and the weight. Under bf16 on the
CPU a chunk's softmax and q are made from the bf16 logits in place, in fp32 per row (`_chunk_q_bf16`).
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 128 MiB fp32, 512 rows at V = 65536 (fewer rows lose GEMM speed)
BLOCK_ELEMENTS = 1 << 19  # logits per softmax block: 2 MiB fp32, 8 rows at V = 65536 (one core's L2 holds it)
VOCAB_BLOCK = 2048  # vocabulary columns per block of the online path: [512, 2048] fp32 logits are 4 MiB


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


class Workspace:
    """Reusable logits buffers for one caller (the model's head keeps one): a fresh 128 MiB chunk each
    step is fresh pages from the OS each step (glibc maps allocations over 32 MiB and unmaps them on
    free): ~33k page faults per chunk, 0.1-0.4 s of system time per 0.1B step on a 2-core VM. Buffers are
    scratch only: nothing saved for backward points into them, so calls may follow each other freely
    (not run concurrently from two threads)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device, most: int = 0) -> torch.Tensor:
        """A [rows, cols] view of the buffer for (dtype, device), grown where too small: to twice `rows`, up
        to `most` rows (the largest request the caller will make), so that requests growing a little at a
        time (the scored rows of each batch) make one or two buffers, not one each (freed ones are kept in
        the training process's heap, see train/memory.py)."""
        key = (dtype, device)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < rows * cols:
            self._bufs.pop(key, None)  # free the smaller one first
            size = max(rows, min(most, 2 * rows)) * cols
            buf = self._bufs[key] = torch.empty(size, dtype=dtype, device=device)
        return buf[: rows * cols].view(rows, cols)


def _chunk(h, w, labels, lo, hi, dtype, ws, most):
    """Rows lo:hi (all scored: linear_cross_entropy passes no ignored row on) -> (the softmax [n, V] fp32
    in ws's buffer, log-sum-exp [n], labels [n], the labels' logits [n]). `most`: the largest chunk's rows
    (Workspace.get)."""
    n, V = hi - lo, w.shape[0]
    logits = ws.get(n, V, torch.float32, h.device, most)
    if dtype == torch.float32:
        torch.mm(h[lo:hi].float(), w.t(), out=logits)
    else:
        logits.copy_(torch.mm(h[lo:hi].to(dtype), w.t(), out=ws.get(n, V, dtype, h.device, most)))
    lab = labels[lo:hi]
    picked = logits.gather(1, lab[:, None]).squeeze(1)
    return logits, _logsumexp_(logits), lab, picked


def _chunk_q_bf16(h, w, labels, lo, hi, ws, most, want_q, ext):
    """Rows lo:hi in bf16 on the CPU with the extension (the chunked path's rows under bf16 autocast): (q =
    softmax - onehot(label) [n, V] bf16 in ws's bf16 buffer where want_q, log-sum-exp [n], the labels' logits
    [n]), the softmax in fp32 per row in one C++ call of three passes over the bf16 logits (cuda/loss_cpu.cpp,
    softmax_grad_bf16), where _chunk widens the chunk into an fp32 copy (128 MiB at V = 65536), takes five
    passes over it and q is rounded back. A row with a non-finite logit (left untouched there) goes through
    _chunk's torch ops, which keep their rules for infinities."""
    n, V = hi - lo, w.shape[0]
    z = torch.mm(h[lo:hi].to(torch.bfloat16), w.t(), out=ws.get(n, V, torch.bfloat16, h.device, most))
    lab = labels[lo:hi].contiguous()
    lse, picked = h.new_empty(n, dtype=torch.float32), h.new_empty(n, dtype=torch.float32)
    ok = torch.empty(n, dtype=torch.uint8)
    ext.softmax_grad_bf16(z, lab, lse, picked, ok, want_q)
    bad = (ok == 0).nonzero().squeeze(1)
    if bad.numel():
        zf, lb = z.index_select(0, bad).float(), lab.index_select(0, bad)
        picked[bad] = zf.gather(1, lb[:, None]).squeeze(1)
        lse[bad] = _logsumexp_(zf)
        if want_q:
            z[bad] = _to_q(zf, lb).to(torch.bfloat16)
    return z, lse, picked


def _logsumexp_(logits, block_elements=BLOCK_ELEMENTS):
    """Log-sum-exp of each row; leaves exp(logits - rowmax) in `logits` and the row sums' reciprocal
    applied, i.e. the softmax (no second buffer as torch.logsumexp makes). Five passes over the rows, made
    over blocks of about `block_elements` logits so that four of them find the block in the core's cache:
    on a 0.1B chunk (512 x 65536) 32 -> 21.6 ms on one Xeon with a 260 MB L3 (more where a chunk does not fit
    the L3). Each row's result is the same bits either way (every op is row-wise)."""
    out = logits.new_empty(logits.shape[0])
    step = max(1, block_elements // max(1, logits.shape[1]))
    for lo in range(0, logits.shape[0], step):
        rows = logits[lo:lo + step]
        m = _finite(rows.amax(dim=1, keepdim=True))
        s = rows.sub_(m).exp_().sum(dim=1, keepdim=True)
        rows.div_(s)
        out[lo:lo + step] = (s.log_() + m).squeeze(1)
    return out


def _finite(m):
    """A row max as the shift of its exponentials: 0 where it is not finite (rows of -inf or with inf keep
    torch.logsumexp's answer)."""
    return m.masked_fill(~torch.isfinite(m), 0.0)


def _to_q(softmax, lab):
    """In place: softmax -> q = softmax - onehot(label) (the NLL's gradient wrt logits)."""
    rows = torch.arange(softmax.shape[0], device=softmax.device)
    softmax[rows, lab] -= 1.0
    return softmax


def _most(vocab: int, elements: int) -> int:
    """Rows of a full chunk: about `elements` logits, at least one row."""
    return max(1, elements // max(1, vocab))


def _spans(n_rows: int, vocab: int, elements: int):
    """(lo, hi) row ranges of the chunks: whole rows, about `elements` logits each, at least one row."""
    step = max(1, min(n_rows, _most(vocab, elements)))
    return ((lo, min(n_rows, lo + step)) for lo in range(0, n_rows, step))


def _fold(z, lab, a, b, m, s, picked):
    """Block z [n, cols] of logits (columns a:b) into the running max m and sum s (s in place), with torch's
    ops: (the new m, the scale e^(m_old - m_new) (None where no max grew), whether one grew). The row rules are
    _logsumexp_'s: a max that is not finite (all -inf, or inf) is taken as 0."""
    inside = ((lab >= a) & (lab < b)).nonzero().squeeze(1)
    picked[inside] = z[inside, lab[inside] - a]
    m_new = torch.maximum(m, z.amax(dim=1))
    shift = _finite(m_new)
    grew = bool((m_new > m).any())  # else every scale below is 1: skip the passes
    scale = None
    if grew:
        scale = (m - shift).exp_()  # e^(m_old - m_new): 0 where m_old was -inf
        s.mul_(scale)
    s.add_(z.sub_(shift[:, None]).exp_().sum(dim=1))
    return m_new, scale, grew


def _cpu_extension():
    """The CPU extension for the online softmax's C++ pass, or None (not built: torch's ops do it)."""
    from . import cpu

    return cpu._extension() if cpu.is_available(torch.device("cpu")) else None


def _online(h, w, lab, nll, dh, ws, most, cols):
    """Rows h [n, C] fp32 through the vocabulary in blocks of `cols` columns (see the module docstring): NLL
    into nll [n], dnll/dh into dh [n, C] where given. Per row, with m the running max and s the running sum
    of e^(z - m): a block's max above m scales s and the partial dh by e^(m_old - m_new) first. The row
    rules are _logsumexp_'s: a max that is not finite (all -inf, or inf) is taken as 0."""
    n, V = h.shape[0], w.shape[0]
    m = h.new_full((n,), -math.inf, dtype=torch.float32)
    s = h.new_zeros(n, dtype=torch.float32)
    picked = h.new_empty(n, dtype=torch.float32)
    scales = h.new_empty(n, dtype=torch.float32)  # the C++ pass's e^(m_old - m_new)
    ext = _cpu_extension() if lab.dtype == torch.int64 and lab.is_contiguous() else None
    for a in range(0, V, cols):
        b = min(V, a + cols)
        z = ws.get(n, b - a, torch.float32, h.device, most)
        torch.mm(h, w[a:b].t(), out=z)
        # the block into m and s: two passes in C++ where every logit is finite (cuda/loss_cpu.cpp), else torch
        folded = -1 if ext is None else ext.online_softmax_block(z, lab, a, m, s, picked, scales)
        if folded < 0:
            m, scale, grew = _fold(z, lab, a, b, m, s, picked)
        else:
            scale, grew = scales, folded == 1
        if dh is not None and a == 0:
            torch.mm(z, w[a:b], out=dh)
        elif dh is not None:
            if grew:
                dh.mul_(scale[:, None])
            torch.addmm(dh, z, w[a:b], out=dh)  # (not addmm_: torch's FLOP counter knows addmm only)
    torch.sub(s.log() + _finite(m), picked, out=nll)
    if dh is not None:
        dh.div_(s[:, None]).sub_(w.index_select(0, lab))


def _forward(h, weight, labels, dtype, need_h, need_w, elements, ws, cols=VOCAB_BLOCK):
    """NLL [N] fp32, and where asked dnll/dh [N, C] fp32 and the g-independent dW [V, C] fp32 (else None)."""
    w = weight.to(dtype)
    nll = h.new_empty(h.shape[0], dtype=torch.float32)
    dh = h.new_empty(h.shape, dtype=torch.float32) if need_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    most = _most(weight.shape[0], elements)
    if dtype == torch.float32 and not need_w and h.device.type == "cpu" and h.shape[0]:
        for lo, hi in _spans(h.shape[0], weight.shape[0], elements):
            _online(h[lo:hi].float(), w, labels[lo:hi], nll[lo:hi], dh[lo:hi] if need_h else None, ws, most, cols)
        return nll, dh, dw
    ext = _cpu_extension() if dtype == torch.bfloat16 and h.device.type == "cpu" else None
    for lo, hi in _spans(h.shape[0], weight.shape[0], elements):
        if ext is not None:  # bf16 on the CPU: q made in place in the bf16 logits, fp32 inside (_chunk_q_bf16)
            q, lse, picked = _chunk_q_bf16(h, w, labels, lo, hi, ws, most, need_h or need_w, ext)
            torch.sub(lse, picked, out=nll[lo:hi])
            if need_h:
                dh[lo:hi] = torch.mm(q, w)
            if need_w:
                dw.add_(torch.mm(q.t(), h[lo:hi].to(dtype)))
            continue
        softmax, lse, lab, picked = _chunk(h, w, labels, lo, hi, dtype, ws, most)
        torch.sub(lse, picked, out=nll[lo:hi])
        if need_h or need_w:
            q = _to_q(softmax, lab)
            if dtype != torch.float32:  # into the (consumed) low-precision logits buffer
                q = ws.get(hi - lo, w.shape[0], dtype, h.device, most).copy_(q)
            if need_h:
                if q.dtype == dh.dtype:
                    torch.mm(q, w, out=dh[lo:hi])
                else:
                    dh[lo:hi] = torch.mm(q, w)
            if need_w:
                dw.add_(torch.mm(q.t(), h[lo:hi].to(dtype)))
    return nll, dh, dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, dtype, need_h, need_w, elements, ws, cols):
        nll, dh, dw = _forward(h, weight, labels, dtype, need_h, need_w, elements, ws, cols)
        # the weight detached: a sharded-parameter engine (ZeRO-3) may swap the Parameter's data after forward
        ctx.save_for_backward(dh, dw, h if need_w else None, weight.detach() if need_w else None, labels)
        ctx.dtype, ctx.h_dtype, ctx.elements, ctx.ws = dtype, h.dtype, elements, ws
        return nll

    @staticmethod
    def backward(ctx, g):
        dh, dw, h, weight, labels = ctx.saved_tensors
        g = g.float()
        grad_h = (dh * g[:, None]).to(ctx.h_dtype) if dh is not None else None
        grad_w = None
        if dw is not None:  # every row is scored (linear_cross_entropy passes only those on)
            if g.numel() == 0 or bool((g == g[0]).all()):
                grad_w = dw * (g[0] if g.numel() else 0.0)
            else:  # per-row weights: recompute each chunk's q and weigh its rows
                grad_w = torch.zeros_like(dw)
                w, most = weight.to(ctx.dtype), _most(weight.shape[0], ctx.elements)
                for lo, hi in _spans(h.shape[0], weight.shape[0], ctx.elements):
                    softmax, _, lab, _ = _chunk(h, w, labels, lo, hi, ctx.dtype, ctx.ws, most)
                    q = _to_q(softmax, lab).mul_(g[lo:hi, None])
                    grad_w.add_(torch.mm(q.to(ctx.dtype).t(), h[lo:hi].to(ctx.dtype)))
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_elements: int = CHUNK_ELEMENTS, workspace: Workspace | None = None,
                         vocab_block: int = VOCAB_BLOCK) -> torch.Tensor:
    """Per-token NLL (fp32, 0 where labels == -100) of `labels` under logits `h @ weight.T`.

    h: [..., C]; weight: [V, C] (nn.Linear's layout); labels: h.shape[:-1] int64. The same values and
    gradients (for h and weight) as `F.cross_entropy(F.linear(h, weight).float(), labels, reduction="none")`
    up to rounding, in O(rows x C + chunk_elements) memory instead of O(rows x V) (chunks of whole rows,
    at least one row each; ignored rows never reach the head). `workspace` keeps the chunk buffers between
    calls (a fresh one otherwise). `vocab_block`: the online path's columns per block (CPU fp32, no trained
    head)."""
    if weight.dim() != 2 or weight.shape[1] != h.shape[-1] or labels.shape != h.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)}, weight {tuple(weight.shape)} and labels "
                         f"{tuple(labels.shape)} do not fit ([..., C], [V, C], [...])")
    lead = h.shape[:-1]
    h2, lab = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    dtype = _compute_dtype(h, weight)
    ws = workspace if workspace is not None else Workspace()
    grad = torch.is_grad_enabled()
    need_h, need_w = grad and h.requires_grad, grad and weight.requires_grad
    # Only the scored rows go through the head: an ignored row's NLL is 0 and its gradient 0 whatever its
    # logits, and in instruction data (prompts, padding) they are often most rows and the head is the
    # biggest matmul. index_select's backward puts the scored rows' gradients back, zeros elsewhere. This is
    # the one place ignored rows are handled: everything below sees scored rows only.
    scored = lab != IGNORE_INDEX
    rows = None if bool(scored.all()) else scored.nonzero().squeeze(1)
    if rows is not None:
        h2, lab = h2.index_select(0, rows), lab.index_select(0, rows)
    if lab.numel():
        least, most = torch.stack(torch.aminmax(lab)).tolist()  # one reduction, one device sync
        if least < 0 or most >= weight.shape[0]:
            raise ValueError(f"linear_cross_entropy: labels must be in [0, {weight.shape[0]}) or {IGNORE_INDEX}, "
                             f"got {least}..{most}")
    # autocast off inside: `dtype` already says what autocast would choose, and every product uses it
    with torch.autocast(h.device.type, enabled=False):
        if not (need_h or need_w):
            with torch.no_grad():
                nll = _forward(h2, weight, lab, dtype, False, False, chunk_elements, ws, vocab_block)[0]
        else:
            nll = _LinearCrossEntropy.apply(h2, weight, lab, dtype, need_h, need_w, chunk_elements, ws, vocab_block)
    if rows is not None:
        nll = nll.new_zeros(scored.shape[0]).index_copy(0, rows, nll)
    return nll.view(lead)


__all__ = ["linear_cross_entropy", "IGNORE_INDEX", "CHUNK_ELEMENTS", "Workspace"]
