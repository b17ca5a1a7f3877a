"""Where test tolerances come from: unit roundoffs, rounding-error counts, and an fp64 forward as oracle.

Unit roundoff u (round to nearest): one rounding changes a value by at most u relative.
Higham's gamma_n = n u / (1 - n u) bounds n successive roundings, e.g. a dot product of n terms:
|fl(x.y) - x.y| <= gamma_n |x|.|y| (Accuracy and Stability of Numerical Algorithms, 2nd ed., 3.1).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import peft_rwkv7.model.rwkv7 as rwkv7_module

U32 = 2.0**-24  # fp32: 24-bit significand
U16 = 2.0**-11  # fp16: 11-bit significand
UBF16 = 2.0**-8  # bf16: 8-bit significand


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n: the relative bound on n successive roundings of unit roundoff u."""
    assert n * u < 1
    return n * u / (1 - n * u)


def forward_rounding(cfg, T: int, u: float = U32) -> float:
    """Bound on a forward's rounding error in logits, relative to max |logit|, computing in precision u.

    A logit ends a chain of n_layer + 1 residual stages (ln0 + embedding, then each block's TimeMix
    and ChannelMix add into the residual stream, LayerNorms keep it at unit scale, then ln_out + head).
    Within a stage the longest chain of roundings is a dot product of K <= max(n_embd, dim_ffn) terms
    after the WKV state's T time steps, each step one rounding of the state: gamma_(K+T) per stage,
    and the stages' errors add through the residual stream. Measured errors of fp32 against the fp64
    forward (`logits64`) are 5-10 u max|logit| for the tiny test models, this bound ~800 u."""
    return (cfg.n_layer + 1) * gamma(max(cfg.n_embd, cfg.dim_ffn) + T, u)


def loss_rounding(cfg, T: int, max_logit: float, loss: float, n_tokens: int, u: float = U32) -> float:
    """Absolute bound on |token-mean cross-entropy computed in precision u - exact|.

    A token's loss logsumexp(z) - z_y moves by at most 2 max|dz| when the logits z move (its gradient
    softmax(z) - onehot(y) has L1 norm <= 2), with max|dz| <= forward_rounding * max|logit|; logsumexp's
    sum of V exponentials rounds <= gamma_V relative in any summation order, and so the log gamma_(V+2)
    absolute; the mean of n_tokens losses adds gamma_(n_tokens) relative."""
    return 2 * forward_rounding(cfg, T, u) * max_logit + gamma(cfg.vocab_size + 2, u) + gamma(n_tokens, u) * loss


def wkv7_fp64(r, w, k, v, a, b, state=None, backend=None):
    """The WKV7 recurrence of DESIGN.md in fp64 (the oracle's op; the package's reference runs in fp32)."""
    r, w, k, v, a, b = (x.double() for x in (r, w, k, v, a, b))
    B, T, H, N = r.shape
    d = torch.exp(-torch.exp(w))
    s = r.new_zeros(B, H, N, N) if state is None else state.double()
    ys = []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", s, a[:, t])
        s = s * d[:, t, :, None, :] + sa[..., :, None] * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append(torch.einsum("bhij,bhj->bhi", s, r[:, t]))
    return torch.stack(ys, dim=1), s


def _wkv7_step_fp64(r, w, k, v, a, b, state=None):
    y, s = wkv7_fp64(*(t[:, None] for t in (r, w, k, v, a, b)), state)
    return y[:, 0], s


@contextlib.contextmanager
def fp64_forward():
    """Within the context an fp64 model computes in fp64 throughout (its WKV recurrence included)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rwkv7_module, "wkv7", wkv7_fp64)
        mp.setattr(rwkv7_module, "wkv7_step", _wkv7_step_fp64)
        yield


@torch.no_grad()
def logits64(model, idx: torch.Tensor) -> torch.Tensor:
    """fp64 logits [B, T, V] of `model`'s weights as they are (a copy cast to fp64; fp32 weights are
    exact in fp64), the WKV recurrence in fp64 too: an oracle ~1e-16 relative from exact arithmetic."""
    m = copy.deepcopy(model).double()
    with fp64_forward():
        return m(idx)
