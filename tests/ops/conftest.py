"""Shared helpers for op tests: WKV7 inputs in the ranges a real RWKV-7 layer produces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.fp_oracle import U32, UBF16, gamma


def wkv_inputs(
    B: int,
    T: int,
    H: int,
    N: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    with_state: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Realistic random WKV7 inputs: ([r, w, k, v, a, b] each [B, T, H, N] in `dtype`, state or None).

    Built as the model builds them (docs/rwkv7.md): w = -softplus(-x) - 0.5, so the per-step decay
    exp(-exp(w)) lies in (0.545, 1); kk is unit-norm per head, a = -kk, b = kk * sigmoid(.);
    k is scaled like k * (1 + (a - 1) * k_a). The state is fp32 [B, H, N, N] of the size a
    trained model carries.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    shape = (B, T, H, N)
    r = randn(*shape) * 0.5
    w = -F.softplus(-(randn(*shape) - 0.5)) - 0.5
    k = randn(*shape) * 0.5
    v = randn(*shape)
    kk = F.normalize(randn(*shape), dim=-1, eps=1e-12)
    a_gate = torch.sigmoid(randn(*shape))
    k = k * (1 + (a_gate - 1) * torch.rand(*shape, generator=g))
    inputs = [x.to(dtype) for x in (r, w, k, v, -kk, kk * a_gate)]
    state = randn(B, H, N, N) * 0.5 if with_state else None
    return inputs, state


def wkv_rtol(T: int, N: int, dtype: torch.dtype) -> float:
    """Bound on max |a - b| / max |b| for two implementations of the WKV7 op, outputs and gradients.

    Per step each state entry is an N-term sum (S a) and 3 more roundings (the decay, the rank-1 and the
    v k^T terms), the errors of T steps add up (the transition does not grow the state: |d| < 1 and
    a b^T = -kk (kk * gate)^T with unit kk), and y = S r adds N more: gamma_(T (N + 3) + N) of the largest
    entry. The backward runs the same recurrence in reverse (x2), and two implementations differ by at
    most the sum of their errors (x2). bf16 outputs are fp32 results rounded once on each side (2^-8)."""
    fp32 = 2 * 2 * gamma(max(T, 1) * (N + 3) + N)
    return fp32 if dtype == torch.float32 else 2 * UBF16 + fp32


def wkv_rounding_level(T: int, N: int, dtype: torch.dtype, lam: float = 6.0) -> float:
    """Where a correct WKV7 implementation's error sits, as wkv_rtol measures it: the n = T (N + 3) + N
    roundings wkv_rtol counts add as a random walk, lam sqrt(n) u with lam = 6 (the probabilistic model of
    Higham & Mary 2019), x4 as there; bf16 outputs: one round-to-nearest of the fp32 result (2^-8)."""
    fp32 = 4 * lam * (max(T, 1) * (N + 3) + N) ** 0.5 * U32
    return fp32 if dtype == torch.float32 else UBF16 + fp32


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str) -> None:
    """Max abs error relative to the expected tensor's max magnitude (robust to tiny elements)."""
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = expected.abs().max().clamp_min(1e-6)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


@pytest.fixture
def fresh(monkeypatch):
    """An empty per-process cache of wkv7 kernel verdicts (ops.dispatch) for this test; the real one is restored
    afterwards."""
    from peft_rwkv7.ops import dispatch

    monkeypatch.setattr(dispatch, "_VERDICTS", {})
