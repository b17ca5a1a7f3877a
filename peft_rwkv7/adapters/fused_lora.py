"""peft's LoRA Linear with the low-rank term added inside one GEMM and, through the model's plain Linear (training,
and without a gradient for more than one row), one autograd node for the whole layer (_LoraMatmul): the thin
product `scaling * (x A^T) B^T` is written first and the base GEMM adds onto it (beta 1). Elsewhere (a quantized
base, one row of generation) `result += scaling * (x A^T) B^T` as an in-place addmm on the base layer's output.

peft computes `result + lora_B(lora_A(dropout(x))) * scaling`: two element-wise passes over the output
([tokens, out]) in the forward, each a fresh tensor, and one more (the scaling) in the backward, for every
adapted Linear of every layer. The GEMM's alpha takes the scaling and its beta = 1 the sum, so those passes
go; the gradients are the same products (x's from the base and the low-rank paths, A's and B's thin ones).

Registered with peft's custom-module dispatch for the model's own Linear (`LoraConfig._register_custom_module`),
so the module is a peft LoRA Linear in every other respect (state-dict keys, merge, unmerge, disable, DoRA,
several adapters). Anything but the plain case -- dropout, a LoRA variant (DoRA), several active adapters,
merged or disabled adapters, peft's extra forward arguments -- takes peft's own forward. So do weights that
DeepSpeed ZeRO-3 partitions (ops.partitioned): they are whole only inside their own modules' calls, which
peft's forward makes and this one would not.

_LoraMatmul (a frozen, unquantized base weight; every tensor of one dtype, or autocast's dtype under autocast):
autograd would give x two gradients, (g W) and (s g B) A, each a fresh [tokens, in] tensor, and then add them;
the node sums them as the forward does (the thin one first, the base GEMM onto it), and scales A's and B's
gradients after their thin GEMMs. Same products, one pass over the largest gradient fewer per adapted Linear.
Under bf16 autocast (issue 23, round 15) that sum was ~18 ms of a 0.53 s bf16 LoRA step at 0.1B ctx 512 (AMX).
In fp32 on CPU the thin products (x A^T, g B and the factors' gradients) run in the CPU extension's kernel
(ops.cpu.thin_nt/thin_tn: about twice BLAS's speed on those shapes on a 2-core AVX-512 EPYC, issue 23, round 21) for
the ranks and kinds of product that its measured check found faster on this CPU (ops/thin_check.py: cached per
machine, read at a layer's first call that could take the kernel, or set with `route_thin`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import Linear as PeftLoraLinear

from ..model.rwkv7 import Linear
from ..ops import cpu, partitioned
from ..ops.rowsplit import row_chunks
from ..ops.thin_check import ThinCheck, cpu_thin_check


class FusedLoraLinear(PeftLoraLinear):
    # which thin products run in the CPU kernel (ops/thin_check.py); None: this CPU's cached check, at first need
    thin_check: ThinCheck | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._plain_adapter(args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        w = self.base_layer.weight
        if partitioned(w, a, b):
            return super().forward(x, *args, **kwargs)
        # 2-D from the start: addmm_ on a view would make autograd copy the whole gradient (CopySlices)
        x2 = x.reshape(-1, x.shape[-1])
        dt = self._node_dtype(x2, w, a, b)
        if dt is not None:
            # under autocast its casts (to bf16) are made here, outside the node, as F.linear would make them:
            # A's and B's gradients come back to fp32 through them; inside, every product is in `dt`
            chunks = row_chunks(x2.shape[0], w) if dt == torch.bfloat16 and self.base_layer.bf16_row_chunks else 1
            x2 = x2.to(dt)
            nt, tn = self._thin_kernel(x2, a.shape[0])
            args = (x2, w.to(dt), a.to(dt), b.to(dt), float(self.scaling[name]), chunks, nt)
            # without a gradient (DPO's reference, evaluation) the node's own forward: the bits a training forward gives
            y = _LoraMatmul.apply(*args, tn) if self._wants_grad(x2, a, b) else _lora_forward(*args)[0]
            return y.view(*x.shape[:-1], y.shape[-1])
        result = self.base_layer(x2)
        # peft casts x to A's dtype (fp32: trained tensors stay fp32); under autocast F.linear casts it back to
        # bf16, an exact round trip of two copies forward and two backward ([tokens, in] each: ~37 ms of a 0.55 s
        # bf16 LoRA step at 0.1B ctx 512), so there x goes in as it is: the same bits.
        amp = torch.is_autocast_enabled(x2.device.type)
        xin = x2 if amp else self._cast_input_dtype(x2, a.dtype)
        xa = F.linear(xin, a)
        # under autocast the base output is bf16: the low-rank product joins it in that dtype, as peft's does
        result.addmm_(xa.to(result.dtype), b.to(result.dtype).t(), alpha=self.scaling[name])
        return result.view(*x.shape[:-1], result.shape[-1])

    def _thin_kernel(self, x2: torch.Tensor, rank: int) -> tuple[bool, bool]:
        """(nt, tn): whether this call's x A^T and g B, and its factors' gradients, run in the CPU kernel: where the
        kernel can take them (ops.cpu.thin_takes) and this CPU's check found it faster for that kind at this rank."""
        if not cpu.thin_takes(x2, rank):
            return False, False
        if self.thin_check is None:
            self.thin_check = cpu_thin_check()  # cached per machine: measured once, ~0.3 s
        return rank in self.thin_check.nt, rank in self.thin_check.tn

    def _node_dtype(self, x2, w, a, b) -> torch.dtype | None:
        """The dtype _LoraMatmul (or, without a gradient, its forward) computes this call in, or None where it does
        not: it does through the model's plain Linear with a frozen weight (not quantized, no bias), for more than one
        row where no gradient is wanted (one row: the Linear's own matvec, for generation), under autocast in
        autocast's dtype (bf16 here), without it where every tensor has one dtype."""
        base = self.base_layer
        if not (type(base) is Linear and base.bias is None and not w.requires_grad and x2.device == w.device
                and (x2.shape[0] > 1 or self._wants_grad(x2, a, b))):
            return None
        if torch.is_autocast_enabled(x2.device.type):
            return torch.get_autocast_dtype(x2.device.type)
        return x2.dtype if x2.dtype == w.dtype == a.dtype == b.dtype else None

    @staticmethod
    def _wants_grad(x2, a, b) -> bool:
        return torch.is_grad_enabled() and (x2.requires_grad or a.requires_grad or b.requires_grad)

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


class _LoraMatmul(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T for x [tokens, in], frozen W [out, in], A [r, in], B [out, r]."""

    @staticmethod
    def forward(ctx, x, w, a, b, s: float, chunks: int = 1, nt: bool = False, tn: bool = False):
        # the thin products (here and in the backward) in the CPU kernel where nt (x A^T, g B) and tn (the factors'
        # gradients) say so (FusedLoraLinear._thin_kernel), torch's products elsewhere
        y, xa = _lora_forward(x, w, a, b, s, chunks, nt)
        ctx.save_for_backward(x, w, a, b, xa)
        ctx.s, ctx.chunks, ctx.nt, ctx.tn = s, chunks, nt, tn
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, a, b, xa = ctx.saved_tensors
        s, need = ctx.s, ctx.needs_input_grad
        g = g.contiguous()
        dx = da = db = None
        gb = cpu.thin_nt(g, b, kernel=ctx.nt) if need[0] or need[2] else None  # [tokens, r]: g B, unscaled
        if need[0]:
            dx = _sum_products(g, w, gb, a, s, ctx.chunks)  # x's two gradients, summed inside the base GEMM
        if need[2]:
            da = cpu.thin_tn(gb, x, s, kernel=ctx.tn)
        if need[3]:
            db = cpu.thin_tn(xa, g, s, out_kr=True, kernel=ctx.tn)  # [out, r]
        return dx, None, da, db, None, None, None, None


def _lora_forward(x, w, a, b, s: float, chunks: int, nt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T + s (x A^T) B^T, x A^T): x A^T in the CPU kernel where nt says so (see _LoraMatmul.forward)."""
    xa = cpu.thin_nt(x, a, w_rk=True, kernel=nt)
    return _sum_products(x, w.t(), xa, b.t(), s, chunks), xa


def _sum_products(x, w, u, v, s: float, chunks: int) -> torch.Tensor:
    """x w + s u v for a thin u v (rank columns): the thin product is written first (beta 0: the fresh tensor's
    contents are ignored) and the base GEMM adds onto it (beta 1), in row chunks where ops.rowsplit says so. The sum
    then happens inside the GEMM's own writes: adding the thin product afterwards was one more pass over the
    [tokens, out] result, ~1.5% of a LoRA r16 fp32 step at 0.1B ctx 512 (issue 23, round 37)."""
    out = x.new_empty(x.shape[0], w.shape[1])
    torch.addmm(out, u, v, beta=0, alpha=s, out=out)
    if chunks <= 1:
        return out.addmm_(x, w)
    for part, dst in zip(x.tensor_split(chunks), out.tensor_split(chunks), strict=True):
        dst.addmm_(part, w)
    return out


def route_thin(model: nn.Module, check: ThinCheck) -> int:
    """Route every FusedLoraLinear of `model` by `check` instead of this CPU's cached check (a test's injected
    measurement, or one check read once for a whole model); returns how many layers it set."""
    layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    for m in layers:
        m.thin_check = check
    return len(layers)


__all__ = ["FusedLoraLinear", "route_thin"]
