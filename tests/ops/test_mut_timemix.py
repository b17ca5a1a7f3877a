"""What mutation testing of ops/timemix.py found untested (scripts/mutation.sh timemix, docs/mutation.md): which
tensors send each op to its torch reference (any one of them in a dtype the fused ops do not take, ZeRO-3's
partitioned GroupNorm), the dtype each fused op computes in when one input alone is fp32 among bf16 ones, the
reference path's own `prev`, and gradients asked of some inputs only (one parameter trained, one row frozen).
The oracle is the module's torch reference of the model's formulas, run in fp64 (as tests/ops/test_timemix.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_rwkv7.ops import cpu, timemix
from tests.conftest import graph_nodes
from tests.ops.test_timemix import _close

pytestmark = pytest.mark.skipif(not cpu.is_available(torch.device("cpu")), reason="the CPU extension is not built")

B, T, C, H = 2, 9, 32, 2
F64, F32, BF = torch.float64, torch.float32, torch.bfloat16


def _rnd(seed: int, *shape) -> torch.Tensor:
    """fp64 values that bf16 holds exactly, so that fp64 sees what a bf16 input holds."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16().double()


def _exact(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().double()


def _ln(dtype=F32) -> nn.GroupNorm:
    ln = nn.GroupNorm(H, C, eps=64e-5)
    with torch.no_grad():
        ln.weight.copy_(_rnd(50, C))
        ln.bias.copy_(_rnd(51, C))
    return ln.to(dtype)


# op name -> (fused entry, reference, the fused node, fp64 inputs, a call taking the inputs)
def _ops():
    rows = [_rnd(i, B, T, C) for i in range(5)]
    return {
        "token_mix": (timemix.token_mix, timemix.token_mix_reference, "_TokenMixBackward",
                      [rows[0], _rnd(10, B, C), _rnd(11, 3, C).abs()], lambda f, ins: f(*ins)),
        "key_prep": (timemix.key_prep, timemix.key_prep_reference, "_KeyPrepBackward",
                     [rows[0], _exact(rows[1].sigmoid()), _rnd(12, 1, 1, C), _exact(_rnd(13, 1, 1, C).sigmoid())],
                     lambda f, ins: f(*ins, H)),
        # ln_x in y's dtype: torch's GroupNorm takes no other
        "wkv_output_rows": (timemix.wkv_output, timemix.wkv_output_reference, "_WkvOutputBackward",
                            rows + [_rnd(14, H, C // H)], lambda f, ins: f(*ins[:5], _ln(ins[0].dtype), ins[5])),
        "bias_sigmoid": (timemix.bias_sigmoid, timemix.bias_sigmoid_reference, "_BiasSigmoidBackward",
                         [rows[0], _rnd(15, 1, 1, C)], lambda f, ins: f(*ins)),
        "value_residual": (timemix.value_residual, timemix.value_residual_reference, "_ValueResidualBackward",
                           rows[:3] + [_rnd(16, 1, 1, C)], lambda f, ins: f(*ins)),
    }


def _outs(o) -> tuple:
    return o if isinstance(o, tuple) else (o,)


CASES = [(op, i) for op, n in (("token_mix", 3), ("key_prep", 4), ("wkv_output_rows", 6), ("bias_sigmoid", 2),
                               ("value_residual", 4)) for i in range(n)]


@pytest.mark.parametrize("op, i", CASES)
def test_one_fp64_input_sends_the_op_to_its_reference(op, i):
    """Input i in fp64 (the fused ops take fp32 and bf16 only), the others fp32: the reference runs (no fused node),
    with torch's promotion, and its values are the fp64 formula's."""
    fn, ref, node, ins, call = _ops()[op]
    xs = [t.to(F64 if j == i else F32).requires_grad_() for j, t in enumerate(ins)]
    got = _outs(call(fn, xs))
    want = _outs(call(ref, ins))
    for o in got:
        assert node not in graph_nodes(o)
    for o, w in zip(got, want):
        _close(o, w, f"{op} with input {i} fp64", rel=1e-6)


@pytest.mark.parametrize("op, i", CASES)
def test_one_fp32_input_among_bf16_ones_gives_fp32_as_torch_would(op, i):
    """Input i fp32 and every other bf16 (an fp32 activation beside bf16 weights, or the reverse): torch's ops promote
    to fp32, so the fused op computes in fp32 and returns fp32 (token_mix: in x's dtype, prev and mix cast to it, as
    the reference), within fp32 rounding of the fp64 formula."""
    fn, ref, node, ins, call = _ops()[op]
    xs = [t.to(F32 if j == i else BF).requires_grad_() for j, t in enumerate(ins)]
    got, want = _outs(call(fn, xs)), _outs(call(ref, ins))
    fp32 = i == 0 if op == "token_mix" else True  # token_mix: x's dtype; the others: every input's promotion
    for o, w in zip(got, want):
        assert node in graph_nodes(o)
        assert o.dtype == (F32 if fp32 else BF), (op, i, o.dtype)
        if fp32:
            _close(o, w, f"{op} with input {i} fp32")


def test_a_bf16_activation_with_an_fp32_previous_token_is_mixed_in_bf16():
    """token_mix with x bf16 and prev fp32 (a state kept in fp32): prev is cast to x's dtype as the reference does,
    and the outputs are bf16, within one bf16 rounding of the formula on those values."""
    x, prev, mix = _rnd(1, B, T, C), _rnd(2, B, C), _rnd(3, 3, C).abs()
    got = timemix.token_mix(x.to(BF), prev.float(), mix.float())
    for o, w in zip(got, timemix.token_mix_reference(x, prev, mix)):
        assert o.dtype == BF
        err = (o.double() - w).abs()
        assert (err <= 2.0**-8 * w.abs() + 1e-6).all()


@pytest.mark.parametrize("t", [1, 2, T])  # one token (an RNN step: no concatenation), two, several
def test_the_reference_path_mixes_in_the_previous_token_it_was_given(t):
    """fp64 takes the reference: its first token mixes with `prev`, the rest with the token before, by hand."""
    x, prev, mix = _rnd(1, B, t, C), _rnd(2, B, C), _rnd(3, 2, C).abs()
    before = torch.cat([prev[:, None], x[:, :-1]], dim=1)
    for m, out in enumerate(timemix.token_mix(x, prev, mix)):
        assert torch.allclose(out, x + (before - x) * mix[m], rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("t", [1, T])
def test_the_torch_reference_mixes_a_bf16_activation_in_bf16(t):
    """The reference itself (a GPU's path) with x bf16 and prev and mix fp32 (a state and parameters kept in fp32):
    both cast to x's dtype first, so the outputs are bf16, within bf16's roundings of the formula on the cast
    values (dx rounded once, then x + dx m once)."""
    x = _rnd(1, B, t, C)
    prev = torch.randn(B, C, generator=torch.Generator().manual_seed(2), dtype=F64)  # not bf16-exact
    mix = torch.rand(2, C, generator=torch.Generator().manual_seed(3), dtype=F64)
    before = torch.cat([_exact(prev)[:, None], x[:, :-1]], dim=1)
    for m, out in enumerate(timemix.token_mix_reference(x.to(BF), prev.float(), mix.float())):
        assert out.dtype == BF
        mb = _exact(mix[m])
        want = x + (before - x) * mb
        assert ((out.double() - want).abs() <= 2.0**-8 * (want.abs() + (before - x).abs() * mb)).all()


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_a_groupnorm_zero3_partitions_takes_the_reference(which):
    """ZeRO-3's ln_x weight or bias (a `ds_id`) is whole only inside ln_x's own call: the reference makes it."""
    ins = [_rnd(i, B, T, C).float() for i in range(5)]
    r_k = _rnd(14, H, C // H).float()
    ln = _ln()
    assert "_WkvOutputBackward" in graph_nodes(timemix.wkv_output(*(t.requires_grad_() for t in ins), ln, r_k))
    getattr(ln, which).ds_id = 1
    out = timemix.wkv_output(*ins, ln, r_k)
    assert "_WkvOutputBackward" not in graph_nodes(out)
    _close(out, timemix.wkv_output_reference(*(t.double() for t in ins), _ln(F64), r_k.double()), "partitioned")


def _grads(fn, ins: list[torch.Tensor], wants: list[bool], dtype, extra=()):
    xs = [t.to(dtype).detach().clone().requires_grad_(w) for t, w in zip(ins, wants)]
    outs = _outs(fn(*xs, *extra))
    live = [(o, _rnd(90 + k, *o.shape).to(o.dtype)) for k, o in enumerate(outs) if o.requires_grad]
    torch.autograd.backward([o for o, _ in live], [g for _, g in live])  # (the reference's k needs no k_k)
    return [x.grad for x in xs]


@pytest.mark.parametrize("op", ["token_mix", "key_prep"])
def test_each_input_alone_wanting_a_gradient_gets_the_references(op):
    """One input wants a gradient, the others none (a frozen row, one parameter trained): that gradient is the fp64
    reference's and no other is set."""
    fn, ref, node, ins, call = _ops()[op]
    extra = (H,) if op == "key_prep" else ()
    for i in range(len(ins)):
        wants = [j == i for j in range(len(ins))]
        got, want = _grads(fn, ins, wants, F32, extra), _grads(ref, ins, wants, F64, extra)
        for j, (g, w) in enumerate(zip(got, want)):
            if j == i:
                _close(g, w, f"{op}: input {i}'s gradient alone")
            else:
                assert g is None


@pytest.mark.parametrize("param", ["weight", "bias", "r_k"])
def test_one_wkv_output_parameter_trained_alone_gets_the_references_gradient(param):
    """Full fine-tuning of one parameter of the WKV output (ln_x's weight or bias, or r_k) with the others frozen."""
    rows = [_rnd(i, B, T, C) for i in range(5)]
    r_k64 = _rnd(14, H, C // H)
    got = {}
    for dtype in (F32, F64):
        ln = _ln(dtype).requires_grad_(False)
        r_k = r_k64.to(dtype).clone().requires_grad_(param == "r_k")
        if param != "r_k":
            getattr(ln, param).requires_grad_(True)
        fn = timemix.wkv_output if dtype == F32 else timemix.wkv_output_reference
        out = fn(*(t.to(dtype).requires_grad_() for t in rows), ln, r_k)
        assert dtype == F64 or "_WkvOutputBackward" in graph_nodes(out)
        out.backward(_rnd(99, *out.shape).to(dtype))
        got[dtype] = {"weight": ln.weight.grad, "bias": ln.bias.grad, "r_k": r_k.grad}
    for name in ("weight", "bias", "r_k"):
        if name == param:
            _close(got[F32][name], got[F64][name], f"d{name}")
        else:
            assert got[F32][name] is None


def test_a_one_element_previous_token_gets_its_gradient():
    """One sequence of one channel: `prev` holds a single element, which still counts as given (its gradient is the
    reference's), as an empty one would not."""
    x, prev, mix = _rnd(1, 1, T, 1), _rnd(2, 1, 1), _rnd(3, 2, 1).abs()
    got = _grads(timemix.token_mix, [x, prev, mix], [True, True, False], F32)
    want = _grads(timemix.token_mix_reference, [x, prev, mix], [True, True, False], F64)
    for name, g, w in zip(("x", "prev"), got, want):
        _close(g, w, f"d{name}")
