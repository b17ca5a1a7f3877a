"""ops/timemix.py's two gates (cuda/gate_cpu.cpp): bias_sigmoid (TimeMix's a) and value_residual (layers >= 1's
v) against torch's autograd of the model's formulas in fp64 (the oracle), in values and in every gradient, fp32
and bf16 rows, every combination of gradients asked for. Each is a handful of fp32 roundings and one exp of ~2 ulp
per element, so fp32 against fp64 agrees to ~1e-6 relative; 1e-5 leaves room and still catches any wrong term."""

from __future__ import annotations

import itertools

import pytest
import torch

from peft_rwkv7.ops import cpu, timemix
from peft_rwkv7.ops.timemix import bias_sigmoid, bias_sigmoid_reference, value_residual, value_residual_reference
from tests.conftest import graph_nodes

pytestmark = pytest.mark.skipif(not cpu.is_available(torch.device("cpu")), reason="the CPU extension is not built")

B, T, C = 2, 37, 96  # T: not a multiple of the 32-row blocks; two sequences
OPS = {"bias_sigmoid": (bias_sigmoid, bias_sigmoid_reference, "_BiasSigmoidBackward"),
       "value_residual": (value_residual, value_residual_reference, "_ValueResidualBackward")}


def _inputs(op: str, seed: int, scale: float = 2.0) -> list[torch.Tensor]:
    """fp64 values that bf16 holds exactly (so fp64 sees what bf16 does): rows [B, T, C], then the bias [1, 1, C]."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (scale * torch.randn(*shape, generator=g)).bfloat16().double()

    n_rows = 1 if op == "bias_sigmoid" else 3
    return [rnd(B, T, C) for _ in range(n_rows)] + [rnd(1, 1, C)]


def _run(fn, ins, go, dtypes, want):
    """fn on leaves of `dtypes` (requires_grad where `want`), backward of go; -> (output, gradients)."""
    xs = [x.to(dt).detach().clone().requires_grad_(w) for x, dt, w in zip(ins, dtypes, want)]
    out = fn(*xs)
    out.backward(go.to(out.dtype))
    return out.detach(), [x.grad for x in xs], out


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    """Per element: rel of the value plus rel of the largest value (the fp32 work of one element)."""
    err = (got.double() - want).abs()
    bound = rel * (want.abs() + want.abs().max())
    assert (err <= bound).all(), f"{what}: worst excess {(err - bound).max().item():.3g}"


def _wants(op: str):
    """Every combination of inputs asking for a gradient (at least one)."""
    n = 2 if op == "bias_sigmoid" else 4
    return [w for w in itertools.product((True, False), repeat=n) if any(w)]


@pytest.mark.parametrize("op", sorted(OPS))
def test_fp32_equals_fp64_in_values_and_every_gradient_asked_for(op):
    fn, ref, node = OPS[op]
    ins = _inputs(op, 1)
    go = torch.randn(B, T, C, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for want in _wants(op):
        w_out, w_grads, _ = _run(ref, ins, go, [torch.float64] * len(ins), want)
        out, grads, live = _run(fn, ins, go, [torch.float32] * len(ins), want)
        assert out.dtype == torch.float32 and node in graph_nodes(live)
        _close(out, w_out, f"{op} out")
        for i, (g, wg) in enumerate(zip(grads, w_grads)):
            assert (g is None) == (wg is None), f"{op} {want}: grad {i}"
            if wg is not None:
                _close(g, wg, f"{op} {want}: grad {i}")


def test_the_value_residuals_gradient_keeps_its_precision_in_the_tails():
    """s (1 - s) from exp(-|x|): where sigmoid rounds to 1 (x > ~17 in fp32, ~37 even in fp64) the formula 1 - s
    gives 0; here every element's gradients are within 1e-5 of the exact ones (from fp64's sigmoid(x) and
    sigmoid(-x)), relative to that element."""
    x = torch.linspace(-80.0, 80.0, 2 * 3 * 64, dtype=torch.float64).view(2, 3, 64)
    v, vf = torch.full_like(x, 0.5), torch.full_like(x, -1.5)
    ins = [v, vf, x, torch.zeros(1, 1, 64, dtype=torch.float64)]
    out, grads, _ = _run(value_residual, ins, torch.ones_like(x), [torch.float32] * 4, (True,) * 4)
    s, s_neg = torch.sigmoid(x), torch.sigmoid(-x)
    dp = (vf - v) * s * s_neg
    exact = [(out, v + (vf - v) * s, "out"), (grads[0], s_neg, "dv"), (grads[1], s, "dv_first"), (grads[2], dp, "dp"),
             (grads[3], dp.sum((0, 1), keepdim=True), "dv0")]
    for got, want, what in exact:
        err = (got.double() - want).abs()
        assert (err <= 1e-5 * want.abs() + 1e-37).all(), f"{what}: {(err / want.abs()).max().item():.3g} relative"


@pytest.mark.parametrize("op", sorted(OPS))
def test_nan_stays_nan(op):
    fn, _, _ = OPS[op]
    ins = [t.float() for t in _inputs(op, 3)]
    p = ins[-2]
    p[0, 5, 7] = float("nan")
    out = fn(*ins)
    assert out[0, 5, 7].isnan() and out.isnan().sum() == 1


BF16_U = 2.0**-8  # one rounding to bf16, relative


@pytest.mark.parametrize("op", sorted(OPS))
def test_bf16_rows_are_computed_in_fp32_and_rounded_once(op):
    """The model under bf16 autocast with frozen (bf16) biases: the output and every row gradient in bf16, each
    within one bf16 rounding of fp64 on the same values; and the same bits as the fp32 op's results on those
    values rounded to bf16 (nothing is summed across a row, so no vector width changes a result).
    bias_sigmoid's gradient comes from its bf16 output s, as torch's sigmoid's does (go ((1 - s) s)): its oracle
    is that formula on the bf16 s, in fp64 and in torch's fp32 ops."""
    fn, ref, node = OPS[op]
    ins = _inputs(op, 4)
    go = torch.randn(B, T, C, generator=torch.Generator().manual_seed(5)).bfloat16().double()
    want = (True,) * len(ins)
    w_out, w_grads, _ = _run(ref, ins, go, [torch.float64] * len(ins), want)
    out, grads, live = _run(fn, ins, go, [torch.bfloat16] * len(ins), want)
    assert node in graph_nodes(live)
    f_out, f_grads, _ = _run(fn, ins, go, [torch.float32] * len(ins), want)
    if op == "bias_sigmoid":
        s = out.double()
        w_grads = [go * ((1 - s) * s), (go * ((1 - s) * s)).sum((0, 1), keepdim=True)]
        f_grads[0] = go.float() * ((1 - out.float()) * out.float())
    row_grad = w_grads[-2]  # p's: the bias's gradient sums it
    for got, w, f, what in [(out, w_out, f_out, "out"), *zip(grads, w_grads, f_grads, range(len(ins)))]:
        assert got.dtype == torch.bfloat16, what
        if got.shape == (B, T, C):
            assert torch.equal(got, f.bfloat16()), f"{op} {what}: not the fp32 result rounded once"
            bound = BF16_U * w.abs() + 1e-5 * w.abs().max()
        else:  # the bias's gradient: a sum over rows of the row gradients (each rounded to bf16, as torch's sum of
            # its bf16 gradient), then one rounding
            bound = BF16_U * w.abs() + BF16_U * row_grad.abs().sum((0, 1), keepdim=True)
        assert ((got.double() - w).abs() <= bound).all(), f"{op} {what}"


@pytest.mark.parametrize("op", sorted(OPS))
def test_bf16_rows_with_an_fp32_bias_give_fp32_as_torch_would(op):
    """Full fine-tuning under bf16 autocast: the bias is an fp32 parameter, so torch's ops promote and the output
    is fp32, equal to fp64 on the same values to fp32 rounding; the bias's gradient in fp32."""
    fn, ref, _ = OPS[op]
    ins = _inputs(op, 6)
    dtypes = [torch.bfloat16] * (len(ins) - 1) + [torch.float32]
    go = torch.randn(B, T, C, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out, grads, _ = _run(fn, ins, go, dtypes, (True,) * len(ins))
    w_out, w_grads, _ = _run(ref, ins, go.float().double(), [torch.float64] * len(ins), (True,) * len(ins))
    assert out.dtype == torch.float32 and grads[-1].dtype == torch.float32
    _close(out, w_out, f"{op} out")
    _close(grads[-1], w_grads[-1], f"{op} bias grad")


@pytest.mark.parametrize("op", sorted(OPS))
def test_the_bias_gradient_does_not_depend_on_the_thread_count(op):
    fn, _, _ = OPS[op]
    ins = _inputs(op, 8)
    ins = [torch.cat([t] * 5, dim=1) if t.shape[1] == T else t for t in ins]  # 185 rows per sequence
    go = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(9))
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_run(fn, ins, go, [torch.float32] * len(ins), (True,) * len(ins))[1][-1])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_the_model_takes_both_gates_and_equals_the_reference_step(monkeypatch):
    """A layer-1 TimeMix (both gates) in a model whose every parameter trains: loss and gradients of the fused
    run against the reference's (the timemix ops switched off) to 1e-6 relative and 1e-5 of each largest."""
    from tests.conftest import make_model

    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(timemix, "fused_available", lambda *t: False)
        model = make_model(seed=3, n_layer=2, n_embd=64, head_size=16, vocab_size=61)
        g = torch.Generator().manual_seed(5)
        for blk in model.blocks:  # non-zero biases, so a bias that were dropped would show
            torch.nn.init.normal_(blk.att.a0, std=0.5, generator=g)
            if blk.att.has_v:
                torch.nn.init.normal_(blk.att.v0, std=0.5, generator=g)
        idx = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(4))
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        nodes = graph_nodes(loss)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((loss.item(), nodes, grads))
    (lf, nf, gf), (lr, nr, gr) = runs
    assert {"_BiasSigmoidBackward", "_ValueResidualBackward"} <= nf and not {"_BiasSigmoidBackward"} & nr
    assert abs(lf - lr) <= 1e-6 * abs(lr)
    for name in ("blocks.1.att.v0", "blocks.1.att.a0", "blocks.0.att.a0", "blocks.1.att.v1",
                 "blocks.0.att.value.weight"):
        want = gr[name].double()
        assert want.abs().max() > 0, name
        assert (gf[name].double() - want).abs().max() <= 1e-5 * want.abs().max(), name
