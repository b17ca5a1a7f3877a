"""TimeMix's element-wise chains (and ChannelMix's token shift) as five ops, each with a torch reference
and a fused CPU form (cuda/token_mix_cpu.cpp, cuda/timemix_cpu.cpp, cuda/gate_cpu.cpp): one pass over
[tokens, C] forward and one backward where torch's autograd takes 3-20 (issue 23's profile: ~17 ms of a 47 ms
TimeMix layer at 0.1B ctx 512 for the first three).

    token_mix(x, prev, mix)               -> M tensors [B, T, C]: x + (x_prev - x) * mix[m]  (x_prev: the
                                             token before, `prev` [B, C] or zeros before the first)
    key_prep(k0, a, k_k, k_a, H)          -> k0 ((1 - k_a) + a k_a), -kk, kk a  with kk = normalize(k0 k_k)
                                             per head of the [B, T, C] inputs
    wkv_output(y, r, k, v, g, ln_x, r_k)  -> (group_norm(y) + (sum_n r k r_k) v) g, per head
    bias_sigmoid(p, bias)                 -> sigmoid(bias + p)  (the in-context learning rate a)
    value_residual(v, v_first, p, v0)     -> v + (v_first - v) sigmoid(v0 + p)  (layers >= 1)

The fused form runs where every tensor is a CPU fp32 or bf16 tensor and the CPU extension is built; otherwise
(GPU, no compiler) the torch reference. The [B, T, C] rows (x, k0, a, y, r, k, v, g, the outputs and their
gradients) go to the C++ op in the dtype of the result torch's ops would give, fp32 or bf16 (bf16 only where
every input is bf16: a bf16 model, bf16 autocast). It reads and writes bf16 in place and computes in fp32, so
each output is rounded once, within one bf16 rounding of the exact result, where the reference rounds after
each of its ops (the bits of widening the inputs, the fp32 op and one rounding, up to the order of the sums
across a head). wkv_output's rows may be bf16 with an fp32 output (fp32 ln_x weights promote it). The
[C]-sized parameters go in fp32. Both forms are differentiable in every input and parameter; the fused
backward returns parameter gradients only when they are asked for (full fine-tuning), summed over fixed
32-row blocks in order, so no result depends on the thread count.
Equal to the reference within fp32 rounding (tests/ops/test_timemix.py: against it and against fp64).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu, partitioned

__all__ = ["token_mix", "key_prep", "wkv_output", "bias_sigmoid", "value_residual", "token_mix_reference",
           "key_prep_reference", "wkv_output_reference", "bias_sigmoid_reference", "value_residual_reference",
           "fused_available"]


_WIDENED = (torch.float32, torch.bfloat16)


def fused_available(*tensors: torch.Tensor | None) -> bool:
    """True where the fused CPU ops apply: every tensor given is a CPU fp32 or bf16 tensor and the extension
    loads."""
    ts = [t for t in tensors if t is not None]
    return all(t.device.type == "cpu" and t.dtype in _WIDENED for t in ts) and cpu.is_available(ts[0].device)


def _result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype torch's ops give for these inputs (fp32 or bf16 here)."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def _params(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The ops' [C]-sized parameters, flat and fp32 (autograd takes their gradients back to their dtype)."""
    return [t.reshape(-1).float().contiguous() for t in tensors]


# ---- references: the model's formulas in torch ops -------------------------------------------------------

def token_mix_reference(x: torch.Tensor, prev: torch.Tensor | None, mix: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if prev is None:
        prev = x.new_zeros(x.shape[0], x.shape[2])
    if x.shape[1] == 1:  # an RNN step: no concatenation needed
        dx = prev.to(x.dtype)[:, None] - x
    else:
        dx = torch.cat([prev.to(x.dtype)[:, None], x[:, :-1]], dim=1) - x
    return tuple(torch.addcmul(x, dx, m) for m in mix.to(x.dtype))


def key_prep_reference(k0: torch.Tensor, a: torch.Tensor, k_k: torch.Tensor, k_a: torch.Tensor, H: int):
    B, T, C = k0.shape
    kk = F.normalize((k0 * k_k).view(B, T, H, C // H), dim=-1, p=2.0, eps=1e-12).view(B, T, C)
    k = k0 * torch.addcmul(1 - k_a, a, k_a)  # k (1 + (a - 1) k_a), one pass over [B, T, C] fewer
    return k, -kk, kk * a


def wkv_output_reference(y, r, k, v, g, ln_x: nn.GroupNorm, r_k: torch.Tensor) -> torch.Tensor:
    B, T, C = r.shape
    H = ln_x.num_groups
    y = ln_x(y.reshape(B * T, C)).view(B, T, C)
    bonus = (r.view(B, T, H, -1) * k.view(B, T, H, -1) * r_k.view(H, -1)).sum(dim=-1, keepdim=True)
    y = y + (bonus * v.view(B, T, H, -1)).reshape(B, T, C)
    return y * g


def bias_sigmoid_reference(p: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(bias + p)


def value_residual_reference(v: torch.Tensor, v_first: torch.Tensor, p: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
    gate = torch.sigmoid(v0 + p)
    if v.dtype == v_first.dtype == gate.dtype:  # v + (v_first - v) gate in one pass
        return torch.lerp(v, v_first, gate)
    return torch.addcmul(v, v_first - v, gate)  # mixed dtypes under autocast: addcmul promotes


# ---- fused CPU ops ---------------------------------------------------------------------------------------

_EMPTY = torch.empty(0)  # an absent prev or gradient (zeros) for the extension; never written


def _ext():
    return cpu._ext("timemix")


class _TokenMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, prev, mix):
        """x [B, T, C] and prev [B, C] (or None) in one dtype, fp32 or bf16; mix [M, C] fp32."""
        ctx.set_materialize_grads(False)
        x, mix = x.detach().contiguous(), mix.detach().contiguous()
        prev = _EMPTY if prev is None else prev.detach().contiguous()
        # x (a layer norm's output, [B, T, C]) is read back only for mix's gradient: with mix frozen (state
        # tuning, LoRA) it is not kept, two [B, T, C] buffers fewer per layer
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, prev, mix)
        ctx.has_prev, ctx.dtype = prev.numel() > 0, x.dtype
        return tuple(_ext().token_mix_forward(x, prev, mix))

    @staticmethod
    def backward(ctx, *g):
        x, prev, mix = ctx.saved_tensors
        x = _EMPTY if x is None else x
        need = ctx.needs_input_grad
        grads = [_EMPTY if t is None else t.contiguous() for t in g]
        gx, gprev, gmix = _ext().token_mix_backward(grads, x, prev, mix, need[0], need[1] and ctx.has_prev, need[2])
        return (gx if need[0] else None, gprev.to(ctx.dtype) if need[1] and ctx.has_prev else None,
                gmix if need[2] else None)


class _KeyPrep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k0, a, k_k, k_a, H):
        """k0, a [B, T, C] in one dtype, fp32 or bf16 (the outputs'); k_k, k_a [C] fp32."""
        ctx.set_materialize_grads(False)
        shape = k0.shape
        ins = [t.detach().reshape(-1, shape[-1]).contiguous() for t in (k0, a)] + [k_k.detach(), k_a.detach()]
        ctx.save_for_backward(*ins)
        ctx.H, ctx.shape = H, shape
        return tuple(t.view(shape) for t in _ext().key_prep_forward(*ins, H))

    @staticmethod
    def backward(ctx, gk, gnkk, gkka):
        k0, a, k_k, k_a = ctx.saved_tensors
        need = ctx.needs_input_grad
        gs = [_EMPTY if t is None else t.reshape(k0.shape).contiguous() for t in (gk, gnkk, gkka)]
        gk0, ga, pk = _ext().key_prep_backward(*gs, k0, a, k_k, k_a, ctx.H, need[2] or need[3])
        return (gk0.view(ctx.shape) if need[0] else None, ga.view(ctx.shape) if need[1] else None,
                pk[0] if need[2] else None, pk[1] if need[3] else None, None)


class _WkvOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, r, k, v, g, gn_w, gn_b, r_k, H, eps, out_fp32):
        """y, r, k, v, g [B, T, C] in one dtype, fp32 or bf16; gn_w, gn_b, r_k [C] fp32; out_fp32: the output
        in fp32 (bf16 rows promoted by fp32 parameters), else in the rows' dtype."""
        shape = r.shape
        yrkvg = [t.detach().reshape(-1, shape[-1]).contiguous() for t in (y, r, k, v, g)]
        params = [t.detach() for t in (gn_w, gn_b, r_k)]
        o, stats = _ext().wkv_output_forward(yrkvg, *params, H, eps, out_fp32)
        ctx.save_for_backward(*yrkvg, stats, *params)
        ctx.H, ctx.eps, ctx.shape = H, eps, shape
        return o.view(shape)

    @staticmethod
    def backward(ctx, go):
        *yrkvg, stats, gn_w, gn_b, r_k = ctx.saved_tensors
        need = ctx.needs_input_grad
        *gin, ps = _ext().wkv_output_backward(go.reshape(yrkvg[0].shape).contiguous(), yrkvg, stats, gn_w, gn_b,
                                             r_k, ctx.H, ctx.eps, any(need[5:8]))
        grads = [t.view(ctx.shape) if need[i] else None for i, t in enumerate(gin)]
        return (*grads, *(ps[i] if need[5 + i] else None for i in range(3)), None, None, None)


class _BiasSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, bias):
        """p [..., C] fp32 or bf16 (the output's dtype); bias [C] fp32."""
        shape = p.shape
        s = _ext().bias_sigmoid_forward(p.detach().reshape(-1, shape[-1]).contiguous(), bias.detach())
        ctx.save_for_backward(s)  # the output, as torch's sigmoid keeps (key_prep keeps it too)
        return s.view(shape)

    @staticmethod
    def backward(ctx, go):
        (s,) = ctx.saved_tensors
        need = ctx.needs_input_grad
        gp, gbias = _ext().bias_sigmoid_backward(go.reshape(s.shape).to(s.dtype).contiguous(), s, need[1])
        return gp.view(go.shape) if need[0] else None, gbias if need[1] else None


class _ValueResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, v_first, p, v0):
        """v, v_first, p [..., C] in one dtype, fp32 or bf16; v0 [C] fp32."""
        shape = p.shape
        rows = [t.detach().reshape(-1, shape[-1]).contiguous() for t in (v, v_first, p)]
        ctx.save_for_backward(*rows, v0.detach())
        ctx.shape = shape
        return _ext().value_residual_forward(*rows, v0.detach()).view(shape)

    @staticmethod
    def backward(ctx, go):
        v, v_first, p, v0 = ctx.saved_tensors
        need = ctx.needs_input_grad
        gv, gvf, gp, gv0 = _ext().value_residual_backward(go.reshape(p.shape).to(p.dtype).contiguous(), v, v_first,
                                                          p, v0, need[0], need[1], need[3])
        return (gv.view(ctx.shape) if need[0] else None, gvf.view(ctx.shape) if need[1] else None,
                gp.view(ctx.shape) if need[2] else None, gv0 if need[3] else None)


# ---- entry points --------------------------------------------------------------------------------------

def token_mix(x: torch.Tensor, prev: torch.Tensor | None, mix: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x [B, T, C], prev [B, C] or None (zeros), mix [M, C] -> M tensors [B, T, C]: x + (x_prev - x) * mix[m]."""
    if fused_available(x, prev, mix):  # the reference's outputs are in x's dtype, prev cast to it
        return _TokenMix.apply(x, None if prev is None else prev.to(x.dtype), mix.reshape(mix.shape[0], -1).float())
    return token_mix_reference(x, prev, mix)


def key_prep(k0: torch.Tensor, a: torch.Tensor, k_k: torch.Tensor, k_a: torch.Tensor, H: int):
    """k0, a [B, T, C]; k_k, k_a broadcast over [B, T, C] (C values) -> (k, -kk, kk a), each [B, T, C]."""
    if fused_available(k0, a, k_k, k_a) and k0.shape == a.shape:
        dt = _result_dtype(k0, a, k_k, k_a)
        return _KeyPrep.apply(k0.to(dt), a.to(dt), *_params(k_k, k_a), H)
    return key_prep_reference(k0, a, k_k, k_a, H)


def wkv_output(y, r, k, v, g, ln_x: nn.GroupNorm, r_k: torch.Tensor) -> torch.Tensor:
    """y (the WKV's output), r, k, v, g [B, T, C]; ln_x a GroupNorm over the heads; r_k [H, N] -> [B, T, C]."""
    # ZeRO-3: ln_x's weights are whole only inside its own call, which the reference makes
    fused = ln_x.affine and fused_available(y, r, k, v, g, ln_x.weight, ln_x.bias, r_k) and not partitioned(
        ln_x.weight, ln_x.bias)
    if fused and all(t.shape == r.shape for t in (y, k, v, g)):
        rows, params = (y, r, k, v, g), (ln_x.weight, ln_x.bias, r_k)
        dt, out = _result_dtype(*rows), _result_dtype(*rows, *params)
        return _WkvOutput.apply(*(t.to(dt) for t in rows), *_params(*params), ln_x.num_groups, ln_x.eps,
                                out != dt)
    return wkv_output_reference(y, r, k, v, g, ln_x, r_k)


def bias_sigmoid(p: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """p [..., C], bias broadcast over it (C values) -> sigmoid(bias + p), in the dtype torch's ops would give."""
    if fused_available(p, bias) and bias.numel() == p.shape[-1]:
        return _BiasSigmoid.apply(p.to(_result_dtype(p, bias)), *_params(bias))
    return bias_sigmoid_reference(p, bias)


def value_residual(v: torch.Tensor, v_first: torch.Tensor, p: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
    """v, v_first, p [..., C] of one shape, v0 broadcast over them (C values) -> v + (v_first - v) sigmoid(v0 + p):
    RWKV-7's value residual, the value of layers >= 1 mixed toward layer 0's."""
    if fused_available(v, v_first, p, v0) and v.shape == v_first.shape == p.shape and v0.numel() == p.shape[-1]:
        dt = _result_dtype(v, v_first, p, v0)
        return _ValueResidual.apply(v.to(dt), v_first.to(dt), p.to(dt), *_params(v0))
    return value_residual_reference(v, v_first, p, v0)
