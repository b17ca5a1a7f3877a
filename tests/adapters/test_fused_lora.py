"""adapters/fused_lora.py: the LoRA sum in one GEMM against peft's own LoRA forward (the oracle: peft's
`result + lora_B(lora_A(x)) * scaling`, run on the same module) and against an fp64 formula.

fp32 bound: the fused and plain results are both the same two products (x W^T, (x A^T) B^T) summed once;
they differ by where the scaling and the final add round, at most a few ulps of the terms' magnitudes,
so 8 * 2^-24 of (|x| |W|^T + s |x A^T| |B|^T) per element bounds both against fp64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft.tuners.lora import Linear as PeftLoraLinear

from peft_rwkv7.adapters import MethodConfig, attach, disable_adapter, fused_lora
from peft_rwkv7.adapters.fused_lora import FusedLoraLinear
from peft_rwkv7.ops import cpu
from peft_rwkv7.ops.thin_check import ThinCheck
from tests.conftest import make_model, spy_extension

U = 2.0**-24


def _adapted(r: int = 4, **method):
    model = make_model(seed=0, n_layer=1, n_embd=64, head_size=16)
    adapted = attach(model, MethodConfig(kind="lora", r=r, alpha=2 * r, **method))
    lin = model.blocks[0].ffn.key
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B is zero at init: give the low-rank term a size
        for p in (lin.lora_A["default"].weight, lin.lora_B["default"].weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return adapted, lin


def _run(lin, cls, x, gy, amp=False):
    lin.__class__ = cls
    try:
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = lin(xx)
        (y.float() * gy).sum().backward()
        a, b = lin.lora_A["default"].weight, lin.lora_B["default"].weight
        out = [y.detach().float(), xx.grad, a.grad.clone(), b.grad.clone()]
        a.grad = b.grad = None
        return out
    finally:
        lin.__class__ = FusedLoraLinear


def test_the_models_linears_get_the_fused_layer():
    adapted, lin = _adapted()
    model = adapted.model if hasattr(adapted, "model") else adapted
    assert type(lin) is FusedLoraLinear and isinstance(lin, PeftLoraLinear)
    assert all(type(model.blocks[0].att.get_submodule(n)) is FusedLoraLinear
               for n in ("receptance", "key", "value", "output"))


def _spy_kernel(monkeypatch) -> list[str]:
    """The thin kernel's own calls (ops.cpu's wrappers run either way)."""
    return spy_extension(monkeypatch, "thin_nt", "thin_tn")


ROUTES = {"kernel": (True, True), "nt": (True, False), "tn": (False, True), "blas": (False, False)}


@pytest.mark.parametrize("r, route", [(4, "kernel"), (16, "kernel"), (16, "nt"), (16, "tn"), (16, "blas")])
def test_fused_equals_peft_and_the_fp64_formula(r, route, monkeypatch):
    """In fp32 the thin products of 256 rows and more run in the CPU extension's kernel (ops.cpu.thin_nt/tn) as the
    layer's check routes them (here injected: each kind of product alone, both, neither); r 4 (not a kernel rank):
    torch's products."""
    _, lin = _adapted(r)
    nt, tn = ROUTES[route]
    lin.thin_check = ThinCheck(nt=frozenset({r} if nt else ()), tn=frozenset({r} if tn else ()))
    g = torch.Generator().manual_seed(2)
    x, gy = torch.randn(2, 130, 64, generator=g), torch.randn(2, 130, lin.out_features, generator=g)  # 260 rows
    calls = _spy_kernel(monkeypatch)
    fused = _run(lin, FusedLoraLinear, x, gy)
    takes = cpu.thin_takes(x.reshape(-1, 64), r)  # r 16, 260 rows, fp32: where the extension is built
    assert sorted(calls) == ["thin_nt"] * (2 * (takes and nt)) + ["thin_tn"] * (2 * (takes and tn)), calls
    plain = _run(lin, PeftLoraLinear, x, gy)
    w = lin.base_layer.weight.double()
    a, b = lin.lora_A["default"].weight.double(), lin.lora_B["default"].weight.double()
    s = lin.scaling["default"]
    x64 = x.double()
    y64 = x64 @ w.t() + s * (x64 @ a.t()) @ b.t()
    mag = x64.abs() @ w.abs().t() + s * (x64.abs() @ a.abs().t()) @ b.abs().t()
    for got in (fused[0], plain[0]):
        assert ((got.double() - y64).abs() <= 8 * U * mag + 1e-30).all()
    # gradients: the same products in both; peft's scales the [tokens, out] gradient before the thin GEMMs,
    # the fused one after them: a few ulps of each product
    for name, f, p in zip(("dx", "dA", "dB"), fused[1:], plain[1:]):
        assert (f - p).abs().max() <= 64 * U * p.abs().max(), name
    # and they are the gradients of the formula: dx = gy W + s (gy B) A, dA = s (gy B)^T x, dB = s gy^T (x A^T),
    # summed over tokens
    g64, x2 = gy.double().reshape(-1, gy.shape[-1]), x64.reshape(-1, x64.shape[-1])
    dx64 = (g64 @ w + s * (g64 @ b) @ a).reshape(x.shape)
    da64 = s * (g64 @ b).t() @ x2
    db64 = s * (g64.t() @ (x2 @ a.t()))
    for name, got, want in zip(("dx", "dA", "dB"), fused[1:], (dx64, da64, db64)):
        assert (got.double() - want).abs().max() <= 64 * U * want.abs().max(), name


def test_fused_equals_peft_under_bf16_autocast():
    _, lin = _adapted()
    g = torch.Generator().manual_seed(3)
    x, gy = torch.randn(3, 5, 64, generator=g), torch.randn(3, 5, lin.out_features, generator=g)
    fused, plain = _run(lin, FusedLoraLinear, x, gy, amp=True), _run(lin, PeftLoraLinear, x, gy, amp=True)
    # bf16 products both; peft rounds the low-rank term to bf16 before adding, the fused GEMM once after
    ub = 2.0**-8
    for name, f, p in zip(("y", "dx", "dA", "dB"), fused, plain):
        assert (f - p).abs().max() <= 4 * ub * p.abs().max(), name


@pytest.mark.parametrize("case", ["dropout", "disabled", "dora"])
def test_every_other_case_is_peft_s_own_forward(case):
    """Dropout, a disabled adapter, DoRA: the fused layer returns exactly what peft's forward returns."""
    method = {"dropout": dict(dropout=0.3), "dora": dict(use_dora=True)}.get(case, {})
    adapted, lin = _adapted(**method)
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(4))

    def out(cls):
        lin.__class__ = cls
        torch.manual_seed(0)  # the same dropout mask
        if case == "disabled":
            with disable_adapter(adapted):
                return lin(x)
        return lin(x)

    plain, fused = out(PeftLoraLinear), out(FusedLoraLinear)
    assert torch.equal(fused, plain)
    if case == "disabled":
        assert torch.equal(fused, lin.base_layer(x))


def test_under_autocast_x_is_not_cast_to_the_adapters_dtype_and_back(monkeypatch):
    """Under bf16 autocast with fp32 factors (trained tensors stay fp32), peft's cast of x to A's dtype is undone
    by autocast's cast back to bf16: an exact round trip, so the layer skips it. The same bits as with the cast
    (outputs and every gradient), and no [tokens, in] copy of a bf16 x in forward or backward. This is the path
    under autocast where _LoraMatmul does not run (e.g. a trained base weight): the node is switched off here."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(FusedLoraLinear, "_node_dtype", lambda *a: None)
    _, lin = _adapted()
    g = torch.Generator().manual_seed(5)
    x, gy = torch.randn(3, 50, 64, generator=g).bfloat16(), torch.randn(3, 50, lin.out_features, generator=g)
    lin.base_layer.weight.data = lin.base_layer.weight.data.bfloat16()  # frozen weights stored bf16

    def casts_of_x(prof):  # copies with a dtype change of x's size (not _run's clone)
        return [e.input_shapes for e in prof.events() if e.name == "aten::copy_"
                and e.input_dtypes[0] != e.input_dtypes[1] and e.input_shapes[0][-1:] == [64]
                and e.input_shapes[0][0] * (e.input_shapes[0][1] if len(e.input_shapes[0]) > 2 else 1) >= 150]

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        skipped = _run(lin, FusedLoraLinear, x, gy, amp=True)
    assert not casts_of_x(prof), casts_of_x(prof)
    # the layer as before: autocast not seen by the layer (F.linear still runs under it), so x is cast to A's
    # dtype first
    with monkeypatch.context() as m:
        m.setattr(torch, "is_autocast_enabled", lambda *a: False)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            cast = _run(lin, FusedLoraLinear, x, gy, amp=True)
    assert len(casts_of_x(prof)) >= 4  # x to fp32 and back, forward and backward
    assert cast[0].dtype == torch.float32  # _run's .float(): the layer's output was bf16 both times
    for name, a, b in zip(("y", "dx", "dA", "dB"), skipped, cast):
        assert torch.equal(a, b), name


def test_under_autocast_the_layer_is_one_node_that_sums_x_gradients_in_place():
    """Under bf16 autocast (frozen weight bf16, factors fp32) the layer is _LoraMatmul in bf16: x's two
    gradients are summed inside its GEMM (no [tokens, in] add in the backward, which autograd makes for peft's
    layer), A's and B's gradients come back fp32, and the values are peft's within bf16 (the test above)."""
    from torch.profiler import ProfilerActivity, profile

    _, lin = _adapted()
    lin.base_layer.weight.data = lin.base_layer.weight.data.bfloat16()
    g = torch.Generator().manual_seed(6)
    x, gy = torch.randn(4, 60, 64, generator=g).bfloat16(), torch.randn(4, 60, lin.out_features, generator=g)

    def x_sums(prof):  # adds of two [tokens, in] tensors: autograd summing x's gradients
        return [e.name for e in prof.events() if e.name in ("aten::add", "aten::add_")
                and len(e.input_shapes) > 1 and e.input_shapes[0] == e.input_shapes[1]
                and e.input_shapes[0] in ([240, 64], [4, 60, 64])]

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fused = _run(lin, FusedLoraLinear, x, gy, amp=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as peft_prof:
        plain = _run(lin, PeftLoraLinear, x, gy, amp=True)
    assert not x_sums(prof) and x_sums(peft_prof)  # peft's makes the sum the node saves
    assert [t.dtype for t in fused[2:]] == [torch.float32] * 2
    xx = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(xx)
    assert y.grad_fn.next_functions[0][0].name() == "_LoraMatmulBackward" and y.dtype == torch.bfloat16
    for name, f, p in zip(("y", "dx", "dA", "dB"), fused, plain):
        assert (f - p).abs().max() <= 4 * 2.0**-8 * p.abs().max(), name


@pytest.mark.parametrize("r, route", [(4, "kernel"), (16, "kernel"), (16, "nt"), (16, "tn"), (16, "blas")])
def test_a_no_grad_forward_gives_the_training_forwards_bits(r, route, monkeypatch):
    """DPO's reference pass and evaluation run without grad (the plain path), training through the node: the same
    products in the same kernels (the CPU kernel's x A^T where the check routes r 16's nt products to it), so the same
    bits. DPO's first step relies on it: its policy and reference are one network there, and its margin is exactly
    0."""
    adapted, _ = _adapted(r)
    lin = (adapted.model if hasattr(adapted, "model") else adapted).blocks[0].ffn.value  # 256 inputs: sums long
    nt, tn = ROUTES[route]
    lin.thin_check = ThinCheck(nt=frozenset({r} if nt else ()), tn=frozenset({r} if tn else ()))
    calls = _spy_kernel(monkeypatch)
    with torch.no_grad():  # enough to be summed in another order by another kernel
        lin.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(5))
    x = torch.randn(3, 100, 256, generator=torch.Generator().manual_seed(4))  # 300 rows: the kernel's at r 16
    trained = lin(x.clone().requires_grad_())
    node = trained.grad_fn.next_functions[0][0]  # under the view back to [..., out]
    assert "LoraMatmul" in type(node).__name__, node
    with torch.no_grad():
        assert torch.equal(lin(x), trained.detach())
    assert calls == ["thin_nt"] * (2 * (r == 16 and nt)), calls  # the training forward's and the no-grad one's


@pytest.mark.parametrize("chunks", [1, 3])
def test_the_sum_ignores_what_its_fresh_result_held(chunks, monkeypatch):
    """The thin product is written first with beta 0 into a fresh tensor, whose memory may hold anything (the
    allocator's reused blocks): here NaN. The base GEMM then adds onto it, in row chunks or whole."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(30, 64, generator=g), torch.randn(64, 48, generator=g)
    u, v = torch.randn(30, 4, generator=g), torch.randn(4, 48, generator=g)
    x64, w64, u64, v64 = x.double(), w.double(), u.double(), v.double()
    want = x64 @ w64 + 2.5 * u64 @ v64
    mag = x64.abs() @ w64.abs() + 2.5 * u64.abs() @ v64.abs()
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "new_empty", lambda self, *size, **k: torch.full(size, float("nan")))
        got = fused_lora._sum_products(x, w, u, v, 2.5, chunks)
    assert ((got.double() - want).abs() <= 8 * U * mag).all()
    with warnings.catch_warnings():  # the fresh result has the product's shape: no out= resized (torch warns)
        warnings.simplefilter("error")
        got = fused_lora._sum_products(x, w, u, v, 2.5, chunks)
    assert ((got.double() - want).abs() <= 8 * U * mag).all()


def test_one_row_without_a_gradient_takes_the_base_layers_own_forward():
    """Generation's single rows keep the Linear's matvec (model/rwkv7.Linear); two rows and more take the node's
    forward."""
    _, lin = _adapted()
    rows = []
    lin.base_layer.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        one, two, five = lin(x[:1]), lin(x[:2]), lin(x)
    assert rows == [1]
    w = lin.base_layer.weight.double()
    a, b = lin.lora_A["default"].weight.double(), lin.lora_B["default"].weight.double()
    s = lin.scaling["default"]
    want = x.double() @ w.t() + s * (x.double() @ a.t()) @ b.t()
    mag = x.double().abs() @ w.abs().t() + s * (x.double().abs() @ a.abs().t()) @ b.abs().t()
    for got, ref, m in ((one, want[:1], mag[:1]), (two, want[:2], mag[:2]), (five, want, mag)):
        assert ((got.double() - ref).abs() <= 8 * U * m).all()


def test_under_autocast_a_no_grad_forward_gives_the_training_forwards_bits(monkeypatch):
    """Under bf16 autocast the node computes x A^T in bf16 (BLAS: the kernel is fp32 only), so the no-grad path keeps
    F.linear's bf16 product for an fp32 activation as well, even where the check routes fp32 rank 16 to the kernel."""
    adapted, _ = _adapted(16)
    lin = (adapted.model if hasattr(adapted, "model") else adapted).blocks[0].ffn.value
    lin.base_layer.weight.data = lin.base_layer.weight.data.bfloat16()  # frozen weights stored bf16
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(5))
    lin.thin_check = ThinCheck(nt=frozenset({16}), tn=frozenset({16}))
    x = torch.randn(3, 100, 256, generator=torch.Generator().manual_seed(4))  # fp32, 300 rows
    calls = _spy_kernel(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = lin(x.clone().requires_grad_())
        assert "LoraMatmul" in type(trained.grad_fn.next_functions[0][0]).__name__
        with torch.no_grad():
            assert torch.equal(lin(x), trained.detach())
    assert calls == []


def test_a_layer_reads_this_cpus_check_once_at_its_first_call_that_could_take_the_kernel(monkeypatch):
    """Unrouted, a layer asks ops/thin_check.cpu_thin_check (cached per machine) at its first call that the kernel could
    take (fp32, a kernel rank, 256 rows or more), never for one that it could not (generation's single row), and keeps
    the answer; route_thin sets one check on every layer instead."""
    from peft_rwkv7.adapters import fused_lora

    asked = []
    check = ThinCheck(nt=frozenset({16}), tn=frozenset())
    monkeypatch.setattr(fused_lora, "cpu_thin_check", lambda: asked.append(1) or check)
    adapted, lin = _adapted(16)
    calls = _spy_kernel(monkeypatch)
    with torch.no_grad():
        lin(torch.randn(1, 64))
        assert not asked and lin.thin_check is None
        lin(torch.randn(300, 64))
        lin(torch.randn(300, 64))
    assert len(asked) == 1 and lin.thin_check is check and calls == ["thin_nt"] * 2
    other = ThinCheck()
    assert fused_lora.route_thin(adapted, other) == 6  # r, k, v, o and the FFN's key and value
    assert lin.thin_check is other
    with torch.no_grad():
        lin(torch.randn(300, 64))
    assert len(asked) == 1 and calls == ["thin_nt"] * 2
