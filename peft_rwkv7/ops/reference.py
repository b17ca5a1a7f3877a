"""Pure-PyTorch WKV7 recurrence: the oracle every fused backend is tested against.

Per head, with S value-major (S[i, j]: i = value index, j = key index):

    S_t = S_{t-1} (diag(d_t) + a_t b_t^T) + v_t k_t^T,    y_t = S_t r_t,    d_t = exp(-exp(w_t))

Written as a plain loop over time so that autograd differentiates every input, the initial
state included. The state is carried in fp32 whatever the input dtype, under autocast too (which would
otherwise run the products with the state in bf16: a GPU's token-by-token generation under bf16 autocast,
GRPO's rollouts, takes this step).
"""

from __future__ import annotations

import torch


def wkv7_reference(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r, w, k, v, a, b: [B, T, H, N]; state: [B, H, N, N] fp32 or None (zeros).

    Returns y [B, T, H, N] in the dtype of r and the final state [B, H, N, N] fp32.
    """
    with torch.autocast(r.device.type, enabled=False):
        return _wkv7_reference(r, w, k, v, a, b, state)


def _wkv7_reference(r, w, k, v, a, b, state):
    B, T, H, N = r.shape
    dtype = r.dtype
    r, w, k, v, a, b = (x.float() for x in (r, w, k, v, a, b))
    d = torch.exp(-torch.exp(w))
    if state is None:
        s = r.new_zeros(B, H, N, N)
    else:
        s = state.float()
    ys = []
    for t in range(T):
        # (S a)[i] = sum_j S[i, j] a[j]; the rank-1 term (S a) b^T, then the new write v k^T.
        sa = torch.einsum("bhij,bhj->bhi", s, a[:, t])
        s = (
            s * d[:, t, :, None, :]
            + sa[..., :, None] * b[:, t, :, None, :]
            + v[:, t, :, :, None] * k[:, t, :, None, :]
        )
        ys.append(torch.einsum("bhij,bhj->bhi", s, r[:, t]))
    if T == 0:
        y = r.new_zeros(B, 0, H, N)
    else:
        y = torch.stack(ys, dim=1)
    return y.to(dtype), s


def wkv7_step_reference(r, w, k, v, a, b, state):
    """One token of the same recurrence without autograd's time loop: inputs [B, H, N], state
    [B, H, N, N] or None. Returns y [B, H, N] and the new state [B, H, N, N], both fp32."""
    with torch.autocast(r.device.type, enabled=False):
        r, w, k, v, a, b = (x.float() for x in (r, w, k, v, a, b))
        d = torch.exp(-torch.exp(w))
        s = r.new_zeros(*r.shape, r.shape[-1]) if state is None else state.float()
        sa = (s @ a.unsqueeze(-1)).squeeze(-1)
        s = s * d.unsqueeze(-2) + sa.unsqueeze(-1) * b.unsqueeze(-2) + v.unsqueeze(-1) * k.unsqueeze(-2)
        return (s @ r.unsqueeze(-1)).squeeze(-1), s
