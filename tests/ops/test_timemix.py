"""ops/timemix.py: the fused CPU forms of TimeMix's element-wise chains against the torch reference they replace,
run in fp64 (the oracle: torch's own autograd of the model's formulas), in values and in every gradient, and a
training step of the model through them against the same step through the reference (issue 23: loss to
1e-6 relative, gradients 1e-5). Each op does a handful of fp32 roundings per element, so fp32 against fp64
agrees to ~1e-6 of the largest value; 1e-5 leaves room and still catches any wrong term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_rwkv7.ops import cpu, timemix
from peft_rwkv7.ops.timemix import key_prep, key_prep_reference, token_mix, token_mix_reference, wkv_output_reference
from tests.conftest import graph_nodes

pytestmark = pytest.mark.skipif(not cpu.is_available(torch.device("cpu")), reason="the CPU extension is not built")

B, T, C, H = 2, 37, 128, 2  # T not a multiple of the kernels' 32-row blocks; two sequences


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} vs {rel} x {scale:.3g}"


def _leaves(ts, dtype, grad=True):
    return [None if t is None else t.to(dtype).detach().clone().requires_grad_(grad) for t in ts]


def _run(fn, inputs, grads_out, dtype, *extra):
    xs = _leaves(inputs, dtype)
    outs = fn(*xs, *extra)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(list(outs), [g.to(dtype) for g in grads_out])
    return [o.detach() for o in outs], [None if x is None else x.grad for x in xs]


@pytest.mark.parametrize("with_prev", [True, False])
@pytest.mark.parametrize("T_", [1, T])
def test_token_mix_equals_the_reference(with_prev, T_):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T_, C, generator=g, dtype=torch.float64)
    prev = torch.randn(B, C, generator=g, dtype=torch.float64) if with_prev else None
    mix = torch.rand(6, C, generator=g, dtype=torch.float64)
    gos = [torch.randn(B, T_, C, generator=g, dtype=torch.float64) for _ in range(6)]
    want, wgrads = _run(token_mix_reference, [x, prev, mix], gos, torch.float64)
    got, ggrads = _run(token_mix, [x, prev, mix], gos, torch.float32)
    for i, (o, w) in enumerate(zip(got, want)):
        _close(o, w, f"out {i}")
    for name, gg, wg in zip(("x", "prev", "mix"), ggrads, wgrads):
        if wg is not None:
            _close(gg, wg, f"d{name}")


def test_token_mix_sums_the_gradients_of_the_outputs_it_got():
    """Outputs that reach no loss get None gradients: the others' sums are unchanged; nothing is asked for
    what does not require grad."""
    g = torch.Generator().manual_seed(1)
    x, mix = torch.randn(1, 40, 16, generator=g), torch.rand(3, 16, generator=g)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    outs_a, outs_b = token_mix(xa, None, mix), token_mix_reference(xb, None, mix)
    (outs_a[0].sum() + 2 * outs_a[2].sum()).backward()
    (outs_b[0].sum() + 2 * outs_b[2].sum()).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("train_mix", [False, True], ids=["mix-frozen", "mix-trained"])
def test_token_mix_keeps_x_only_for_the_mix_gradient(train_mix):
    """With mix frozen (state tuning, LoRA) the op keeps no [B, T, C] tensor for its backward, and x's and
    prev's gradients still equal the fp64 reference's; with mix trained it keeps x and mix's gradient is right."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    prev = torch.randn(B, C, generator=g, dtype=torch.float64)
    mix = torch.rand(6, C, generator=g, dtype=torch.float64)
    gos = [torch.randn(B, T, C, generator=g, dtype=torch.float64) for _ in range(6)]
    want, wgrads = _run(token_mix_reference, [x, prev, mix], gos, torch.float64)
    xs = [t.float().requires_grad_(grad) for t, grad in ((x, True), (prev, True), (mix, train_mix))]
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        outs = token_mix(*xs)
    assert (max(kept) >= B * T * C) == train_mix, kept
    torch.autograd.backward(list(outs), [t.float() for t in gos])
    _close(xs[0].grad, wgrads[0], "dx")
    _close(xs[1].grad, wgrads[1], "dprev")
    if train_mix:
        _close(xs[2].grad, wgrads[2], "dmix")
    else:
        assert xs[2].grad is None


def _key_inputs(g, zero_head=False):
    k0 = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    if zero_head:
        k0[0, 3, : C // H] = 0  # |k0 k_k| = 0 on one head: F.normalize's eps clamp
    a = torch.rand(B, T, C, generator=g, dtype=torch.float64)
    k_k = torch.randn(1, 1, C, generator=g, dtype=torch.float64)
    k_a = torch.rand(1, 1, C, generator=g, dtype=torch.float64)
    return [k0, a, k_k, k_a]


def test_key_prep_equals_the_reference():
    g = torch.Generator().manual_seed(2)
    inputs = _key_inputs(g)
    gos = [torch.randn(B, T, C, generator=g, dtype=torch.float64) for _ in range(3)]
    want, wgrads = _run(key_prep_reference, inputs, gos, torch.float64, H)
    got, ggrads = _run(key_prep, inputs, gos, torch.float32, H)
    for name, o, w in zip(("k", "-kk", "kk a"), got, want):
        _close(o, w, name)
    for name, gg, wg in zip(("k0", "a", "k_k", "k_a"), ggrads, wgrads):
        _close(gg, wg, f"d{name}")


@pytest.mark.parametrize("used", [(0,), (1,), (2,), (0, 2), (1, 2)])
@pytest.mark.parametrize("train_params", [True, False])
def test_key_prep_with_outputs_that_reach_no_loss(used, train_params):
    """Only the outputs in `used` reach the loss (the others get None gradients: the kernel's general path;
    the model's case, all three, is the test above), with k_k and k_a trained or frozen (no partial sums)."""
    g = torch.Generator().manual_seed(4)
    inputs = _key_inputs(g)
    gos = [torch.randn(B, T, C, generator=g, dtype=torch.float64) for _ in range(3)]
    results = []
    for fn, dtype in ((key_prep_reference, torch.float64), (key_prep, torch.float32)):
        xs = _leaves(inputs[:2], dtype) + _leaves(inputs[2:], dtype, grad=train_params)
        outs = fn(*xs, H)
        torch.autograd.backward([outs[i] for i in used], [gos[i].to(dtype) for i in used])
        results.append([x.grad for x in xs])
    want, got = results
    for i, (name, gg, wg) in enumerate(zip(("k0", "a", "k_k", "k_a"), got, want)):
        if i >= 2 and not train_params:
            assert gg is None and wg is None, f"d{name} given for a frozen input"
        elif wg is None:  # no used output depends on it: autograd gives None, the fused op zeros
            assert gg is not None and not gg.any(), f"d{name} nonzero with outputs {used} used"
        else:
            _close(gg, wg, f"d{name} with outputs {used} used")


def test_key_prep_clamps_a_zero_norm_like_normalize():
    """A head whose k0 k_k is all zero: kk = 0 and the gradient through the clamped norm is g / eps, as torch's."""
    g = torch.Generator().manual_seed(3)
    inputs = _key_inputs(g, zero_head=True)
    gos = [torch.randn(B, T, C, generator=g, dtype=torch.float64) for _ in range(3)]
    want, wgrads = _run(key_prep_reference, inputs, gos, torch.float64, H)
    got, ggrads = _run(key_prep, inputs, gos, torch.float32, H)
    assert torch.equal(got[1][0, 3, : C // H], torch.zeros(C // H))
    head, rest = (0, 3, slice(0, C // H)), (slice(None), slice(4, None))
    _close(ggrads[0][head], wgrads[0][head], "dk0 on the zero head")
    _close(ggrads[0][rest], wgrads[0][rest], "dk0 elsewhere")


def _out_inputs(g):
    ys = [torch.randn(B, T, C, generator=g, dtype=torch.float64) for _ in range(5)]
    ln = nn.GroupNorm(H, C, eps=64e-5).double()
    nn.init.normal_(ln.weight, generator=g)
    nn.init.normal_(ln.bias, generator=g)
    return ys, ln, torch.randn(H, C // H, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("train_params", [True, False])
def test_wkv_output_equals_the_reference(train_params):
    g = torch.Generator().manual_seed(4)
    ys, ln64, r_k64 = _out_inputs(g)
    go = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    results = []
    for dtype in (torch.float64, torch.float32):
        ln = nn.GroupNorm(H, C, eps=64e-5).to(dtype)
        ln.load_state_dict(ln64.state_dict())
        ln.requires_grad_(train_params)
        r_k = r_k64.to(dtype).detach().clone().requires_grad_(train_params)
        xs = _leaves(ys, dtype)
        fn = wkv_output_reference if dtype == torch.float64 else timemix.wkv_output
        o = fn(*xs, ln, r_k)
        assert dtype == torch.float64 or o.grad_fn.name().endswith("_WkvOutputBackward")
        o.backward(go.to(dtype))
        results.append([o.detach(), *(x.grad for x in xs), ln.weight.grad, ln.bias.grad, r_k.grad])
    names = ["out", "dy", "dr", "dk", "dv", "dg", "dln_x.weight", "dln_x.bias", "dr_k"]
    for name, got, want in zip(names, results[1], results[0]):
        if not train_params and name in names[6:]:
            assert got is None and want is None
            continue
        _close(got, want, name)


def test_parameter_gradients_do_not_depend_on_the_thread_count():
    """Sums over rows run in fixed 32-row blocks added in order: one thread and two give the same bits."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 300, 64, generator=g)
    mix = torch.rand(6, 64, generator=g)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xx, mm = x.clone().requires_grad_(), mix.clone().requires_grad_()
            outs = token_mix(xx, None, mm)
            torch.autograd.backward(list(outs), [torch.full_like(o, 0.3) * o for o in outs])
            results.append((xx.grad, mm.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


BF16_U = 2.0**-8  # one bf16 rounding, relative (8 significant bits: half an ulp is 2^-8 of the value at most)


def _within_one_bf16_rounding(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """got (bf16) against want (fp64 of the same bf16 inputs): one rounding to bf16 of an fp32 result, so
    2^-8 relative per element, plus the fp32 work before it (~1e-6 of the largest value; 1e-5 allowed)."""
    assert got.dtype == torch.bfloat16, what
    err = (got.double() - want).abs()
    bound = BF16_U * want.abs() + 1e-5 * want.abs().max()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: {worst:.3g} past one bf16 rounding"


def _bf16_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    return g, (lambda *shape: torch.randn(*shape, generator=g).bfloat16().double())


@pytest.mark.parametrize("op", ["token_mix", "key_prep", "wkv_output"])
def test_bf16_inputs_are_computed_in_fp32_and_rounded_once(op):
    """A bf16 model (or bf16 autocast's activations): the fused op widens its inputs, computes in fp32 and rounds
    each output to bf16 once; outputs and every gradient within one bf16 rounding of fp64 on the same bf16
    values, in the inputs' dtypes. The graph holds the fused op (not the reference's chain)."""
    g, rnd = _bf16_case({"token_mix": 10, "key_prep": 11, "wkv_output": 12}[op])
    if op == "token_mix":
        ins, fn, ref, extra = [rnd(B, T, C), rnd(B, C), rnd(6, C).abs() / 4], token_mix, token_mix_reference, ()
        node = "_TokenMixBackward"
    elif op == "key_prep":
        sig = (lambda t: t.sigmoid().bfloat16().double())  # bf16 values, so fp64 sees what bf16 does
        ins = [rnd(B, T, C), sig(rnd(B, T, C)), rnd(1, 1, C), sig(rnd(1, 1, C))]
        fn, ref, extra, node = key_prep, key_prep_reference, (H,), "_KeyPrepBackward"
    else:
        ln = nn.GroupNorm(H, C, eps=64e-5)
        with torch.no_grad():
            ln.weight.copy_(rnd(C)), ln.bias.copy_(rnd(C))
        ins = [rnd(B, T, C) for _ in range(5)] + [rnd(H, C // H)]
        node = "_WkvOutputBackward"

        def fn(y, r, k, v, g_, r_k):
            return timemix.wkv_output(y, r, k, v, g_, ln16, r_k)

        def ref(y, r, k, v, g_, r_k):
            return wkv_output_reference(y, r, k, v, g_, ln64, r_k)

        import copy

        ln16, ln64 = copy.deepcopy(ln).bfloat16(), copy.deepcopy(ln).double()
        ln16.requires_grad_(False), ln64.requires_grad_(False)
        extra = ()
    outs64 = ref(*_leaves(ins, torch.float64), *extra)
    outs64 = outs64 if isinstance(outs64, tuple) else (outs64,)
    gos = [torch.randn(o.shape, generator=g).bfloat16().double() for o in outs64]
    want, wgrads = _run(ref, ins, gos, torch.float64, *extra)
    xs = _leaves(ins, torch.bfloat16)
    outs = fn(*xs, *extra)
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert node in graph_nodes(outs[0])
    torch.autograd.backward(list(outs), [gg.bfloat16() for gg in gos])
    for i, (o, w) in enumerate(zip(outs, want)):
        _within_one_bf16_rounding(o.detach(), w, f"{op} out {i}")
    for i, (x, w) in enumerate(zip(xs, wgrads)):
        _within_one_bf16_rounding(x.grad, w, f"{op} grad {i}")


def _bf16_model_case(seed: int):
    """The three ops as the model calls them under bf16 autocast (rows bf16, ln_x's weights fp32): (inputs, run)
    where run(inputs) -> key_prep's 3, wkv_output's 1 and token_mix's 6 outputs. No input feeds two ops (a
    gradient summed by autograd in bf16 would round twice)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(B, T, C, generator=g).bfloat16() for _ in range(8)]
    rows[1] = rows[1].sigmoid()
    params = [torch.randn(1, 1, C, generator=g).bfloat16(), torch.rand(1, 1, C, generator=g).bfloat16(),
              torch.randn(H, C // H, generator=g).bfloat16(), torch.rand(6, C, generator=g).bfloat16() / 4]
    ln = nn.GroupNorm(H, C, eps=64e-5)
    nn.init.normal_(ln.weight, generator=g)
    nn.init.normal_(ln.bias, generator=g)
    ln.requires_grad_(False)

    def run(ins):
        k0, a, y, r, k, v, gg, x, k_k, k_a, r_k, mix = ins
        return (*key_prep(k0, a, k_k, k_a, H), timemix.wkv_output(y, r, k, v, gg, ln, r_k), *token_mix(x, None, mix))

    return rows + params, run


def test_bf16_rows_are_read_and_written_in_place():
    """The model's bf16 case: no [B, T, C] tensor is widened or rounded on the way (each such copy was a pass
    over memory: ~1000 a 0.1B step, 0.07 s of 0.53 s on a CPU with AMX), and what the ops keep for backward is
    bf16 (ctx 4096 LoRA bf16: +630 MiB peak when fp32 copies were kept)."""
    ins, run = _bf16_model_case(14)
    xs = [t.detach().clone().requires_grad_() for t in ins]
    kept = []
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((t.dtype, t.numel())) or t, lambda t: t):
            outs = run(xs)
        with record_function("backward"):
            torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
    large = [dt for dt, n in kept if n >= B * T * C]
    assert large and set(large) == {torch.bfloat16}, kept
    copies = [e for e in prof.events() if e.name in ("aten::copy_", "aten::_to_copy")
              and any(len(s) and torch.Size(s).numel() >= B * T * C for s in e.input_shapes if isinstance(s, list))]
    assert not copies, [(e.name, e.input_shapes) for e in copies]


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at |x| (8 significant bits), for x in bf16's normal range."""
    return 2.0 ** (torch.floor(torch.log2(x.double().abs().clamp_min(2.0**-126))) - 7)


def test_bf16_rows_are_the_fp32_ops_results_rounded_once():
    """bf16 rows read in place: the results of widening them, the fp32 op (checked against fp64 above) and one
    rounding of each output and gradient to bf16 (torch's cast), every output and input gradient. token_mix sums
    nothing across a row: the same bits. key_prep and wkv_output sum across each head (a norm, a dot product,
    group_norm's moments), where the compiler may pick another vector width for bf16 loads (the AVX2 clone
    does), so their fp32 sums may differ in the last bits and a rounding to bf16 go the other way: at most one
    bf16 step apart, and the fp32 output within fp32 rounding of the sums."""
    ins, run = _bf16_model_case(15)
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        xs = [t.to(dtype if t.dim() == 3 and t.shape[1] == T else t.dtype).detach().clone().requires_grad_()
              for t in ins]
        outs = run(xs)
        gos = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).bfloat16() for i, o in enumerate(outs)]
        torch.autograd.backward(list(outs), [go.to(o.dtype) for go, o in zip(gos, outs)])
        results.append(([o.detach() for o in outs], [x.grad for x in xs]))
    (outs16, grads16), (outs32, grads32) = results
    assert [o.dtype for o in outs16] == [torch.bfloat16] * 3 + [torch.float32] + [torch.bfloat16] * 6
    exact = {"out": range(4, 10), "grad": (7, 11)}  # token_mix's outputs; x's and mix's gradients
    pairs = [("out", i, a, b) for i, (a, b) in enumerate(zip(outs16, outs32))]
    pairs += [("grad", i, a, b) for i, (a, b) in enumerate(zip(grads16, grads32))]
    for kind, i, a, b in pairs:
        assert a.dtype == (ins[i].dtype if kind == "grad" else a.dtype), f"{kind} {i}: {a.dtype}"
        if i in exact[kind]:
            assert torch.equal(a, b.to(a.dtype)), f"{kind} {i}"
        elif a.dtype == torch.float32:
            _close(a, b.double(), f"{kind} {i}", rel=1e-6)
        else:
            want = b.to(a.dtype)
            assert ((a.double() - want.double()).abs() <= _bf16_ulp(want)).all(), f"{kind} {i}"


def test_mixed_fp32_and_bf16_inputs_give_fp32_as_torch_would():
    """Under bf16 autocast x (a layer norm's output) is fp32 and the frozen mix bf16: torch's ops promote, so
    the outputs stay fp32 (not rounded to bf16), equal to the reference on the same values to fp32 rounding."""
    g = torch.Generator().manual_seed(13)
    x, mix = torch.randn(1, 8, 16, generator=g), torch.rand(2, 16, generator=g).bfloat16()
    assert timemix.fused_available(x, mix)
    for got, want in zip(token_mix(x, None, mix), token_mix_reference(x.double(), None, mix.double())):
        assert got.dtype == torch.float32
        _close(got, want, "mixed token_mix")
    k0, a = torch.randn(1, 8, 16, generator=g).bfloat16(), torch.rand(1, 8, 16, generator=g)
    k_k, k_a = torch.randn(1, 1, 16).bfloat16(), torch.rand(1, 1, 16).bfloat16()
    want = key_prep_reference(*(t.double() for t in (k0, a, k_k, k_a)), 2)
    for got, w in zip(key_prep(k0, a, k_k, k_a, 2), want):
        assert got.dtype == torch.float32
        _close(got, w, "mixed key_prep")
    assert not timemix.fused_available(torch.randn(2, dtype=torch.float16), torch.randn(3))


def test_a_training_step_through_the_fused_ops_equals_the_reference(monkeypatch):
    """The whole model (state tuning's trained initial state and every parameter): the loss to 1e-6 relative,
    every gradient to 1e-5 of its largest value, fused against the torch reference. The fused run's graph holds
    every fused op (the model takes them), the reference run none of timemix's."""
    from tests.conftest import make_model

    fused_ops = {"_TokenMixBackward", "_KeyPrepBackward", "_WkvOutputBackward", "_BiasSigmoidBackward",
                 "_ValueResidualBackward", "_ReluSquareCpuBackward"}
    results, seen = [], []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(timemix, "fused_available", lambda *t: False)
        model = make_model(seed=7, n_layer=3, n_embd=64, head_size=16, vocab_size=97)
        state = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(8), requires_grad=True)
        idx = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(9))
        init = [s._replace(wkv=state[i]) for i, s in enumerate(model.initial_state())]
        logits = model(idx[:, :-1], init)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        seen.append(graph_nodes(loss) & fused_ops)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), state.grad.clone(), grads))
    assert seen == [fused_ops, {"_ReluSquareCpuBackward"}]  # relu^2 dispatches on its own (ops/pointwise.py)
    (lf, sf, gf), (lr, sr, gr) = results
    assert abs(lf - lr) <= 1e-6 * abs(lr)
    assert gf.keys() == gr.keys() and len(gr) > 20
    _close(sf, sr.double(), "initial state")
    for name in gr:
        _close(gf[name], gr[name].double(), name)
