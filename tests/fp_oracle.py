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
from torch.overrides import TorchFunctionMode

import peft_rwkv7.model.rwkv7 as rwkv7_module

U64 = 2.0**-53  # fp64: 53-bit significand
U32 = 2.0**-24  # fp32: 24-bit significand
U16 = 2.0**-11  # fp16: 11-bit significand
UBF16 = 2.0**-8  # bf16: 8-bit significand
LOGGED = 5e-7  # log.jsonl keeps losses and metrics to 6 decimals (train/logger.py): half a unit of the 6th


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


def fp64_nll_rounding(vocab: int, max_logit: float) -> float:
    """Bound on |difference| of two fp64 log-softmax NLLs of the same fp32 logits (or means of them): per
    token max-shift, exp, a V-term sum, log and two subtractions, gamma_(V+4) in fp64 of 1 + 2 max|logit|,
    on each side."""
    return 2 * gamma(vocab + 4, U64) * (1 + 2 * max_logit)


def adam_bound(steps: int, beta1: float = 0.9, beta2: float = 0.99) -> float:
    """Largest difference per coordinate, in units of lr, between two Adam runs (no weight decay) of
    `steps` steps whose gradients differ by rounding: a coordinate whose gradient is near zero can take
    the opposite sign in the other run, and Adam's step lr m^/(sqrt(v^) + eps) has magnitude at most
    lr sqrt(sum_i w_i^2 / w'_i) (Cauchy-Schwarz; w, w' the bias-corrected weights of m^ and v^)."""
    total = 0.0
    for t in range(1, steps + 1):
        w = [(1 - beta1) * beta1 ** (t - i) / (1 - beta1**t) for i in range(1, t + 1)]
        w2 = [(1 - beta2) * beta2 ** (t - i) / (1 - beta2**t) for i in range(1, t + 1)]
        total += 2 * sum(a * a / b for a, b in zip(w, w2)) ** 0.5
    return total


def logp_rounding(cfg, T: int, max_logit: float, n_tokens: int, u: float = U32) -> float:
    """Bound on |a sequence's log-prob summed over n_tokens, computed in precision u (fp32 cross-entropy)
    - exact|: per token twice the logits' error (forward_rounding) plus the log-sum-exp's gamma_(V+2),
    and the sum's gamma_(n_tokens)."""
    token = 2 * forward_rounding(cfg, T, u) * max_logit + gamma(cfg.vocab_size + 2, u)
    return n_tokens * token * (1 + gamma(n_tokens, u))


def wkv7_fp64(r, w, k, v, a, b, state=None, backend=None, decay_offset=None):
    """The WKV7 recurrence of DESIGN.md in fp64 (the oracle's op; the package's reference runs in fp32).
    decay_offset as ops.wkv7's: w holds z and the log-log decay is logsigmoid(z) - decay_offset."""
    r, w, k, v, a, b = (x.double() for x in (r, w, k, v, a, b))
    if decay_offset is not None:
        w = torch.nn.functional.logsigmoid(w) - decay_offset
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


def stored_rounding(model, idx: torch.Tensor, u: float, seed: int = 0) -> tuple[torch.Tensor, float]:
    """(proj, bound): storing every weight of `model` in a format of unit roundoff u moves the projection
    sum(proj * logits) of its logits on idx by at most u sum |d/dW| |W| over all weights, to first order.
    proj: fixed random fp64 [B, T, V]; compare (logits_a - logits_b) * proj summed against the bound."""
    model = copy.deepcopy(model).float()
    for p in model.parameters():
        p.requires_grad_(True)
    logits = model(idx)
    proj = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (logits.double() * proj).sum().backward()
    bound = sum((p.grad.double() * p.double()).abs().sum().item() for p in model.parameters() if p.grad is not None)
    return proj, u * bound


# Functions whose result holds values of their inputs unchanged (no rounding), and the functions that
# autocast runs in the low precision, rounding their fp32 operands first.
_EXACT = {"view", "reshape", "__getitem__", "cat", "stack", "neg", "relu", "embedding", "requires_grad_",
          "unsqueeze", "squeeze", "expand", "permute", "transpose", "contiguous", "flatten", "clone", "detach", "t",
          "chunk", "split", "unbind", "narrow", "select", "__get__", "dim", "size"}
_CASTS_OPERANDS = {"linear", "matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "einsum"}


class LowPrecisionRoundings(TorchFunctionMode):
    """Collects, during a forward, every place a low-precision (`dtype`) computation rounds: each result in
    `dtype` of a function that is not a pure data movement (PyTorch's CPU and CUDA kernels compute bf16 in
    fp32 and round the result once), and each fp32 operand that autocast rounds to `dtype` for a matmul
    (cloned, so that each use gets the gradient of that use alone). After backward, `terms()` are the
    |dL/dz| |z| of all of them: one rounding moves z by at most u |z|, so the loss by <= u |dL/dz| |z|
    to first order."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype, self.sites = dtype, []

    def _track(self, t):
        if isinstance(t, torch.Tensor) and t.requires_grad and t.grad_fn is not None:
            t.retain_grad()
            self.sites.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _CASTS_OPERANDS and (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            args = tuple(a.clone() if isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a.requires_grad
                         else a for a in args)
            for a in args:
                if isinstance(a, torch.Tensor) and a.dtype == torch.float32:
                    self._track(a)
        out = func(*args, **(kwargs or {}))
        if name not in _EXACT:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == self.dtype:
                    self._track(t)
        return out

    def terms(self) -> torch.Tensor:
        return torch.cat([(t.grad.double() * t.double()).abs().flatten() for t in self.sites if t.grad is not None])


def rounding_bounds(terms: torch.Tensor, u: float, lam: float = 6.0) -> tuple[float, float]:
    """(worst case, probabilistic bound) on sum_i a_i e_i with |e_i| <= u and terms a_i = |dL/dz_i| |z_i|.

    Worst case: u sum a_i. Probabilistic (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019: rounding errors
    as independent, mean-zero): by Hoeffding, |sum a_i e_i| <= lam u sqrt(sum a_i^2) but with probability
    <= 2 exp(-lam^2 / 2) (3e-8 for lam = 6)."""
    return u * terms.sum().item(), lam * u * terms.pow(2).sum().sqrt().item()
