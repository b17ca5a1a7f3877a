"""Triton WKV7 chunk kernels, part 2: the backward kernel (notation in triton_fwd.py).

Each program walks its chunks last to first carrying dX = dL/dX at the chunk end (seeded with
the final-state gradient), reloads the chunk-start state X0 saved by the forward, recomputes the
chunk (U and the pairwise matrices) and back-propagates through the three chunk equations:

    dR~ = dY X0^T              dA_rb = (dY U^T)|<=     dA_rk = (dY V^T)|<=
    dU  = A_rb^T dY + Bbar dX  dV    = A_rk^T dY + Kbar dX + A_ak^T dRHS
    dRHS = inv^T dU            dA_ab = (dRHS U^T)|<    dA_ak = (dRHS V^T)|<
    dA~ = dRHS X0^T            dBbar = U dX^T          dKbar = V dX^T
    dX0 = diag(exp(lg_last)) dX + R~^T dY + A~^T dRHS

(dA_ab = dRHS U^T follows from d(M^{-1}) = -M^{-1} dM M^{-1} with U = M^{-1} RHS.) The key-side
gradients (r, w, k, a, b) sum over value columns, so with several value blocks each program
writes its partial sums and the caller adds them up; dv is complete per block.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_fwd import _chunk_forward, _dot, _load_rows, _row


@triton.jit
def _pairwise_grads(r, k, a, b, lg, lgp, dA_ab, dA_ak, dA_rb, dA_rk, offs_t, L: tl.constexpr):
    """Gradients of sum(dA_xy * A_xy) over the pairwise matrices, one row t at a time.

    For A[t, s] = sum_j x_t[j] y_s[j] e[t, s, j] with e = exp(lam_t - lg_s):
    dx_t = sum_s dA[t, s] y_s e,  dy_s = sum_t dA[t, s] x_t e,  dlam_t = x_t dx_t,  dlg_s -= y_s dy_s.
    Returns the [L, K] contributions dr, dk, da, db, dlg, dlgp.
    """
    dr = tl.zeros_like(r)
    dk = tl.zeros_like(r)
    da = tl.zeros_like(r)
    db = tl.zeros_like(r)
    dlg = tl.zeros_like(r)
    dlgp = tl.zeros_like(r)
    for t in range(L):
        a_t = _row(a, offs_t, t)
        r_t = _row(r, offs_t, t)
        e_p = tl.exp(tl.minimum(_row(lgp, offs_t, t)[None, :] - lg, 0.0))
        e_q = tl.exp(tl.minimum(_row(lg, offs_t, t)[None, :] - lg, 0.0))
        # Row t of each dA, laid out along s (the rows of the [L, K] tensors).
        p_ab = _row(dA_ab, offs_t, t)[:, None] * e_p
        p_ak = _row(dA_ak, offs_t, t)[:, None] * e_p
        p_rb = _row(dA_rb, offs_t, t)[:, None] * e_q
        p_rk = _row(dA_rk, offs_t, t)[:, None] * e_q
        da_t = tl.sum(p_ab * b + p_ak * k, 0)
        dr_t = tl.sum(p_rb * b + p_rk * k, 0)
        q_b = p_ab * a_t[None, :] + p_rb * r_t[None, :]
        q_k = p_ak * a_t[None, :] + p_rk * r_t[None, :]
        db += q_b
        dk += q_k
        dlg -= b * q_b + k * q_k
        sel = offs_t[:, None] == t
        da = tl.where(sel, da + da_t[None, :], da)
        dlgp = tl.where(sel, dlgp + (a_t * da_t)[None, :], dlgp)
        dr = tl.where(sel, dr + dr_t[None, :], dr)
        dlg = tl.where(sel, dlg + (r_t * dr_t)[None, :], dlg)
    return dr, dk, da, db, dlg, dlgp


@triton.jit
def wkv7_bwd_kernel(
    r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, ds_out_ptr, ckpt_ptr,
    dkey_ptr, dv_ptr, ds0_ptr,
    T, H, numel,
    N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, L: tl.constexpr,
    HAS_DS_OUT: tl.constexpr, WANT_DS0: tl.constexpr,
):  # fmt: skip
    """Grid (B * H, cdiv(N, BV)). dkey: [5, n_value_blocks, B, T, H, N] (dr, dw, dk, da, db partial
    sums per value block, numel = B * T * H * N apart); dv like v; ds0/ds_out [B, H, N, N]."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    n_vb = tl.num_programs(1).to(tl.int64)
    bb = pid_bh // H
    hh = pid_bh % H
    offs_t = tl.arange(0, L)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < N
    mv = offs_v < N
    row = H * N
    base = bb * T * row + hh * N
    s_mask = mk[:, None] & mv[None, :]
    s_offs = pid_bh * N * N + offs_v[None, :] * N + offs_k[:, None]
    if HAS_DS_OUT:
        dX = tl.load(ds_out_ptr + s_offs, mask=s_mask, other=0.0)
    else:
        dX = tl.zeros([BK, BV], dtype=tl.float32)
    lower = offs_t[None, :] <= offs_t[:, None]
    strict = offs_t[None, :] < offs_t[:, None]
    n_chunks = tl.cdiv(T, L)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        X0 = tl.load(ckpt_ptr + (pid_bh * n_chunks + c) * N * N + offs_k[:, None] * N + offs_v[None, :],
                     mask=s_mask, other=0.0)  # fmt: skip
        t = c * L + offs_t
        mt = t < T
        k_mask = mt[:, None] & mk[None, :]
        k_offs = base + t[:, None] * row + offs_k[None, :]
        v_mask = mt[:, None] & mv[None, :]
        v_offs = base + t[:, None] * row + offs_v[None, :]
        r = _load_rows(r_ptr, k_offs, k_mask)
        k = _load_rows(k_ptr, k_offs, k_mask)
        a = _load_rows(a_ptr, k_offs, k_mask)
        b = _load_rows(b_ptr, k_offs, k_mask)
        v = _load_rows(v_ptr, v_offs, v_mask)
        dy = _load_rows(dy_ptr, v_offs, v_mask)
        lw = tl.where(k_mask, -tl.exp(_load_rows(w_ptr, k_offs, k_mask)), 0.0)
        lg, lgp, lg_last, A_ak, A_rb, A_rk, inv, a_til, r_til, to_end, U = _chunk_forward(
            r, lw, k, a, b, v, X0, offs_t, L
        )
        b_bar = b * to_end
        k_bar = k * to_end
        g_last = tl.exp(lg_last)

        dA_rb = tl.where(lower, _dot(dy, tl.trans(U)), 0.0)
        dA_rk = tl.where(lower, _dot(dy, tl.trans(v)), 0.0)
        dU = _dot(tl.trans(A_rb), dy) + _dot(b_bar, dX)
        dv = _dot(tl.trans(A_rk), dy) + _dot(k_bar, dX)
        drhs = _dot(tl.trans(inv), dU)
        dA_ab = tl.where(strict, _dot(drhs, tl.trans(U)), 0.0)
        dA_ak = tl.where(strict, _dot(drhs, tl.trans(v)), 0.0)
        dv += _dot(tl.trans(A_ak), drhs)
        tl.store(dv_ptr + v_offs, dv.to(dv_ptr.dtype.element_ty), mask=v_mask)

        # Elementwise (diagonal-in-time) parts of the key-side gradients.
        dr_til = _dot(dy, tl.trans(X0))
        da_til = _dot(drhs, tl.trans(X0))
        db_bar = _dot(U, tl.trans(dX))
        dk_bar = _dot(v, tl.trans(dX))
        end_terms = db_bar * b_bar + dk_bar * k_bar
        dlg_last = g_last * tl.sum(dX * X0, 1) + tl.sum(end_terms, 0)
        dX = g_last[:, None] * dX + _dot(tl.trans(r_til), dy) + _dot(tl.trans(a_til), drhs)

        dr, dk, da, db, dlg, dlgp = _pairwise_grads(r, k, a, b, lg, lgp, dA_ab, dA_ak, dA_rb, dA_rk, offs_t, L)
        dr += dr_til * tl.exp(lg)
        da += da_til * tl.exp(lgp)
        db += db_bar * to_end
        dk += dk_bar * to_end
        dlg += dr_til * r_til - end_terms
        dlgp += da_til * a_til
        # lg_t = sum_{m<=t} lw_m, lgp_t = sum_{m<t} lw_m, lg_last = sum_m lw_m; d lw / d w = lw.
        dlw = tl.cumsum(dlg, 0, reverse=True) + tl.cumsum(dlgp, 0, reverse=True) - dlgp + dlg_last[None, :]
        dw = dlw * lw

        key_offs = pid_v.to(tl.int64) * numel + k_offs
        vb_stride = n_vb * numel
        tl.store(dkey_ptr + key_offs, dr.to(dkey_ptr.dtype.element_ty), mask=k_mask)
        tl.store(dkey_ptr + vb_stride + key_offs, dw.to(dkey_ptr.dtype.element_ty), mask=k_mask)
        tl.store(dkey_ptr + 2 * vb_stride + key_offs, dk.to(dkey_ptr.dtype.element_ty), mask=k_mask)
        tl.store(dkey_ptr + 3 * vb_stride + key_offs, da.to(dkey_ptr.dtype.element_ty), mask=k_mask)
        tl.store(dkey_ptr + 4 * vb_stride + key_offs, db.to(dkey_ptr.dtype.element_ty), mask=k_mask)
    if WANT_DS0:
        tl.store(ds0_ptr + s_offs, dX, mask=s_mask)
