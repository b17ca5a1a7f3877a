"""Triton WKV7 chunk kernels, part 1: shared chunk algebra and the forward kernel.

Notation (one head, one chunk of L = 16 steps, rows indexed by time t, s):
X = S^T is the key-major state [K, V]. With lw_t = -exp(w_t) (log decay), lg_t = sum_{m<=t} lw_m
and lgp_t = lg_{t-1} (exclusive), the step  X_t = diag(d_t) X_{t-1} + b_t u_t^T + k_t v_t^T,
u_t = X_{t-1}^T a_t  unrolls inside a chunk that starts from X0 to

    U = (I - A_ab)^{-1} (A~ X0 + A_ak V)                 rows u_t
    Y = R~ X0 + A_rb U + A_rk V                          rows y_t
    X_L = diag(exp(lg_last)) X0 + Bbar^T U + Kbar^T V

    A_xy[t, s] = sum_j x_t[j] y_s[j] exp(lam_t[j] - lg_s[j])   (lam = lgp, s < t for A_ab, A_ak;
                                                                lam = lg,  s <= t for A_rb, A_rk)
    A~ = a * exp(lgp),  R~ = r * exp(lg),  Bbar = b * exp(lg_last - lg),  Kbar = k * exp(lg_last - lg)

Every exponent above is a sum of log decays over a forward time span, so it is <= 0: nothing
can overflow whatever the decay (fla instead factors exp(lam_t - lg_s) = exp(lam_t) / exp(lg_s)
to use a matmul, which needs a clamp on w). The pairwise matrices are built one row t at a time
as [L, K] products, so no [L, L, K] tensor is ever materialised.

The value dimension is split into blocks of BV columns (value columns evolve independently);
each program owns one (batch, head, value block) and walks the chunks in order. Everything is
computed in fp32 (the interpreter cannot do bf16 arithmetic, and we want fp32 accumulation);
bf16 inputs are converted after loading and outputs converted at the store.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(x, y):
    # "ieee": true fp32 products; TF32 would cost ~1e-3 relative error in y and the gradients.
    return tl.dot(x, y, input_precision="ieee")


@triton.jit
def _row(x, offs_t, t):
    """Row t of x [L, C] as a [C] vector."""
    return tl.sum(tl.where(offs_t[:, None] == t, x, 0.0), 0)


@triton.jit
def _load_rows(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _chunk_decays(lw, offs_t, L: tl.constexpr):
    """lw [L, K] log decays -> lg (inclusive cumsum), lgp (exclusive), lg_last [K]."""
    lg = tl.cumsum(lw, 0)
    lgp = lg - lw
    lg_last = _row(lg, offs_t, L - 1)
    return lg, lgp, lg_last


@triton.jit
def _pairwise(r, k, a, b, lg, lgp, offs_t, L: tl.constexpr):
    """The four decayed [L, L] products A_ab, A_ak (strictly lower), A_rb, A_rk (lower)."""
    A_ab = tl.zeros([L, L], dtype=tl.float32)
    A_ak = tl.zeros([L, L], dtype=tl.float32)
    A_rb = tl.zeros([L, L], dtype=tl.float32)
    A_rk = tl.zeros([L, L], dtype=tl.float32)
    for t in range(L):
        a_t = _row(a, offs_t, t)
        r_t = _row(r, offs_t, t)
        # [L(s), K]: decay from after step s up to step t-1 (e_p) or t (e_q); min() only guards the
        # entries that the triangular masks discard below (s >= t resp. s > t).
        e_p = tl.exp(tl.minimum(_row(lgp, offs_t, t)[None, :] - lg, 0.0))
        e_q = tl.exp(tl.minimum(_row(lg, offs_t, t)[None, :] - lg, 0.0))
        pa = a_t[None, :] * e_p
        pr = r_t[None, :] * e_q
        sel = offs_t[:, None] == t
        A_ab = tl.where(sel, tl.sum(pa * b, 1)[None, :], A_ab)
        A_ak = tl.where(sel, tl.sum(pa * k, 1)[None, :], A_ak)
        A_rb = tl.where(sel, tl.sum(pr * b, 1)[None, :], A_rb)
        A_rk = tl.where(sel, tl.sum(pr * k, 1)[None, :], A_rk)
    strict = offs_t[None, :] < offs_t[:, None]
    lower = offs_t[None, :] <= offs_t[:, None]
    A_ab = tl.where(strict, A_ab, 0.0)
    A_ak = tl.where(strict, A_ak, 0.0)
    A_rb = tl.where(lower, A_rb, 0.0)
    A_rk = tl.where(lower, A_rk, 0.0)
    return A_ab, A_ak, A_rb, A_rk


@triton.jit
def _unit_lower_inverse(A, offs_t, L: tl.constexpr):
    """(I - A)^{-1} for strictly lower-triangular A [L, L], by forward substitution row by row."""
    inv = (offs_t[:, None] == offs_t[None, :]).to(tl.float32)
    for t in range(1, L):
        # row t of inv = e_t + sum_{s<t} A[t, s] inv[s, :]  (rows >= t of inv are still identity rows,
        # and A[t, s] = 0 there)
        a_row = _row(A, offs_t, t)
        new = tl.sum(a_row[:, None] * inv, 0) + (offs_t == t).to(tl.float32)
        inv = tl.where(offs_t[:, None] == t, new[None, :], inv)
    return inv


@triton.jit
def _chunk_forward(r, lw, k, a, b, v, X0, offs_t, L: tl.constexpr):
    """One chunk from state X0 [K, BV]; returns everything the forward and backward both need."""
    lg, lgp, lg_last = _chunk_decays(lw, offs_t, L)
    A_ab, A_ak, A_rb, A_rk = _pairwise(r, k, a, b, lg, lgp, offs_t, L)
    inv = _unit_lower_inverse(A_ab, offs_t, L)
    a_til = a * tl.exp(lgp)
    r_til = r * tl.exp(lg)
    to_end = tl.exp(tl.minimum(lg_last[None, :] - lg, 0.0))
    U = _dot(inv, _dot(a_til, X0) + _dot(A_ak, v))
    return lg, lgp, lg_last, A_ak, A_rb, A_rk, inv, a_til, r_til, to_end, U


@triton.jit
def wkv7_fwd_kernel(
    r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, y_ptr, s_out_ptr, ckpt_ptr,
    T, H,
    N: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, L: tl.constexpr,
    HAS_S0: tl.constexpr, SAVE_CKPT: tl.constexpr,
):  # fmt: skip
    """Grid (B * H, cdiv(N, BV)). Inputs [B, T, H, N]; states [B, H, N, N] value-major; ckpt
    [B, H, cdiv(T, L), N, N] key-major (X at the start of each chunk)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
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
    # X[k, v] = S[v, k]: the value-major state read transposed.
    s_offs = pid_bh * N * N + offs_v[None, :] * N + offs_k[:, None]
    if HAS_S0:
        X = tl.load(s0_ptr + s_offs, mask=s_mask, other=0.0)
    else:
        X = tl.zeros([BK, BV], dtype=tl.float32)
    n_chunks = tl.cdiv(T, L)
    for c in range(n_chunks):
        if SAVE_CKPT:
            c_offs = (pid_bh * n_chunks + c) * N * N + offs_k[:, None] * N + offs_v[None, :]
            tl.store(ckpt_ptr + c_offs, X, mask=s_mask)
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
        # Padding (t >= T, or key lanes >= N) gets log decay 0 and zero r, k, a, b, v: identity steps.
        lw = tl.where(k_mask, -tl.exp(_load_rows(w_ptr, k_offs, k_mask)), 0.0)
        lg, lgp, lg_last, A_ak, A_rb, A_rk, inv, a_til, r_til, to_end, U = _chunk_forward(
            r, lw, k, a, b, v, X, offs_t, L
        )
        y = _dot(r_til, X) + _dot(A_rb, U) + _dot(A_rk, v)
        tl.store(y_ptr + v_offs, y.to(y_ptr.dtype.element_ty), mask=v_mask)
        X = tl.exp(lg_last)[:, None] * X + _dot(tl.trans(b * to_end), U) + _dot(tl.trans(k * to_end), v)
    tl.store(s_out_ptr + s_offs, X, mask=s_mask)
