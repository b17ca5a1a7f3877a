"""peft's LoRA Linear with the low-rank term added inside one GEMM: `result += scaling * (x A^T) B^T` as an
in-place addmm on the base layer's output.

peft computes `result + lora_B(lora_A(dropout(x))) * scaling`: two element-wise passes over the output
([tokens, out]) in the forward, each a fresh tensor, and one more (the scaling) in the backward, for every
adapted Linear of every layer. The GEMM's alpha takes the scaling and its beta = 1 the sum, so those passes
go; the gradients are the same products (x's from the base and the low-rank paths, A's and B's thin ones).

Registered with peft's custom-module dispatch for the model's own Linear (`LoraConfig._register_custom_module`),
so the module is a peft LoRA Linear in every other respect (state-dict keys, merge, unmerge, disable, DoRA,
several adapters). Anything but the plain case -- dropout, a LoRA variant (DoRA), several active adapters,
merged or disabled adapters, peft's extra forward arguments -- takes peft's own forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import Linear as PeftLoraLinear


class FusedLoraLinear(PeftLoraLinear):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._plain_adapter(args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        # 2-D from the start: addmm_ on a view would make autograd copy the whole gradient (CopySlices)
        x2 = x.reshape(-1, x.shape[-1])
        result = self.base_layer(x2)
        xa = F.linear(self._cast_input_dtype(x2, a.dtype), a)
        # under autocast the base output is bf16: the low-rank product joins it in that dtype, as peft's does
        result.addmm_(xa.to(result.dtype), b.to(result.dtype).t(), alpha=self.scaling[name])
        return result.view(*x.shape[:-1], result.shape[-1])

    def _plain_adapter(self, args, kwargs) -> str | None:
        """The one active adapter when the forward is plain LoRA, else None (peft's forward handles it)."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = [n for n in self.active_adapters if n in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        if name in self.lora_variant or not isinstance(self.lora_dropout[name], nn.Identity):
            return None
        return name


__all__ = ["FusedLoraLinear"]
