"""DiSHA (Dimension-Sharding Adaptation): the weight update is built from shards of size r.

Bone is HF peft's MiSS (`init_weights=True`), which is exactly the DiSHA/RWKV-PEFT definition:
a trainable D [r, out] is shared by every r-wide column block of W, dW[o, i] = D[i mod r, o], so
the layer adds (sum of the r-wide slices of x) @ D.

Bat (block affine transformation) is written here because peft's "bat" shares D over the *output*
blocks ([out/r, r, r]), while DiSHA as RWKV-PEFT trains it shares it over the *input* blocks:
with W split into r x r blocks W_ab (a: output block, b: input block) and D [in/r, r, r],

    dW_ab = W_ab @ D_b + D_b

which is nonlinear in (W, D) and zero at D = 0. Files in RWKV-PEFT's layout (`.disha` keys) then
load and merge the same here and there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quant import dequantized_weight


def bone_delta(disha: torch.Tensor, in_features: int) -> torch.Tensor:
    """Bone: D [r, out] -> dW [out, in] with dW[o, i] = D[i mod r, o] (a partial last block is cut)."""
    r = disha.shape[0]
    reps = -(-in_features // r)
    return disha.t().repeat(1, reps)[:, :in_features]


def bat_delta(weight: torch.Tensor, disha: torch.Tensor) -> torch.Tensor:
    """Bat: W [out, in], D [in/r, r, r] -> dW [out, in] with dW_ab = W_ab @ D_b + D_b."""
    out_f, in_f = weight.shape
    r = disha.shape[-1]
    blocks = weight.reshape(out_f // r, r, in_f // r, r).permute(0, 2, 1, 3)  # [a, b, r, r]
    delta = blocks @ disha + disha  # D_b broadcasts over the output blocks a
    return delta.permute(0, 2, 1, 3).reshape(out_f, in_f)


class BatLinear(nn.Module):
    """A frozen Linear (float or bitsandbytes-quantized) plus a trainable Bat shard D [in/r, r, r].

    y = x @ (W + dW)^T with W the (dequantized) frozen weight; the full [out, in] weight is formed
    per forward, as RWKV-PEFT does (Bat needs W itself, not only x @ W^T).
    """

    def __init__(self, base_layer: nn.Module, r: int):
        super().__init__()
        out_f, in_f = base_layer.out_features, base_layer.in_features
        if in_f % r or out_f % r:
            raise ValueError(f"Bat needs r dividing both dimensions of a [{out_f}, {in_f}] weight, got r={r}")
        self.base_layer = base_layer
        self.in_features, self.out_features, self.r = in_f, out_f, r
        self.disha = nn.Parameter(torch.zeros(in_f // r, r, r, device=base_layer.weight.device))  # the base's device
        self.enabled = True  # False: the frozen layer alone (adapters.disable_adapter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        w = dequantized_weight(self.base_layer)
        w = w + bat_delta(w, self.disha.float())
        return F.linear(x, w.to(x.dtype))
