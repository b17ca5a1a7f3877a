"""What mutation testing of ops/dispatch.py, ops/verify.py and ops/__init__.py found untested (issue 23: every
speed path rests on which WKV kernel a call gets, and on the first-use check that lets it have one).

Expectations come from outside the code under test: the backends this machine has (the CPU extension builds
here; no GPU), the reference op, hand-made wrong kernels, fp64 recurrences and the exact warning text."""

from __future__ import annotations

import math
import time

import pytest
import torch

from peft_rwkv7.ops import cpu, dispatch, verify, wkv7_reference
from tests.ops.test_verify import _recorded, perturbed_output

CPU = torch.device("cpu")


# --- dispatch -----------------------------------------------------------------------------------------------


def test_backends_this_machine_has():
    assert cpu.is_available(CPU)  # the CPU extension builds on every machine the tests run on
    got = dispatch.available(CPU)
    assert got[0] == "reference" and "cpu" in got
    assert "cuda" not in got or torch.cuda.is_available()
    assert dispatch.available(torch.device("meta")) == ["reference"]  # no backend serves meta tensors


def test_a_module_that_does_not_import_is_no_backend(monkeypatch):
    monkeypatch.setitem(dispatch._MODULES, "cpu", ("no_such_backend_module", "wkv7_cpu"))
    assert dispatch.load("cpu") == (None, None)
    assert dispatch.available(CPU) == ["reference"]
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available for cpu tensors"):
        dispatch.resolve("cpu", CPU, 16, torch.float32)


def test_supports_a_backend_without_a_module_or_a_list():
    assert dispatch.supports("reference", 48)  # not a fused module: no list of head sizes to refuse it
    assert dispatch.supports("cpu", 24)  # the CPU kernel pads any head size


def test_auto_on_a_device_without_an_order_is_the_reference(fresh):
    assert dispatch.resolve("auto", torch.device("meta"), 16, torch.float32) is wkv7_reference
    assert dispatch._VERDICTS == {}


def test_auto_skips_a_module_that_imports_but_cannot_run_here(fresh, monkeypatch):
    monkeypatch.setattr(cpu, "is_available", lambda device: False)
    assert dispatch.resolve("auto", CPU, 16, torch.float32) is wkv7_reference
    assert dispatch._VERDICTS == {}  # not even checked


def test_auto_without_a_head_size_or_dtype_checks_the_models_own(fresh):
    fn, messages = _recorded(lambda: dispatch.resolve("auto", CPU))
    assert fn is cpu.wkv7_cpu and messages == []
    assert set(dispatch._VERDICTS) == {("cpu", 64, torch.float32, "cpu")}


def test_a_bf16_verdict_is_a_bf16_check(fresh):
    v = dispatch.verdict("cpu", cpu.wkv7_cpu, 16, torch.bfloat16, CPU)
    assert v.ok and v.tol == 3e-2
    assert v.max_err > 1e-4  # bf16's rounding of y and the gradients shows: the check ran in bf16, not fp32


def test_the_warning_names_the_dtype_without_torch_and_is_a_runtime_warning(fresh):
    _, messages = _recorded(lambda: dispatch.verdict("cpu", perturbed_output, 16, torch.float32, CPU))
    assert len(messages) == 1  # a RuntimeWarning (_recorded counts no other kind)
    msg = messages[0]
    assert msg.startswith("wkv7: the cpu kernel failed its check against the reference for head size 16, float32 "
                          "on cpu (max rel. error 1.0e-02 (y) > 1e-04); using the next backend instead"), msg
    assert "torch." not in msg
    # cached: the second call neither checks nor warns again
    assert _recorded(lambda: dispatch.verdict("cpu", perturbed_output, 16, torch.float32, CPU))[1] == []


# --- verify: the first-use check ----------------------------------------------------------------------------


def test_the_reference_runs_on_one_thread_and_the_kernel_on_the_callers(monkeypatch):
    seen = {}

    def kernel(*args):
        seen["kernel"] = torch.get_num_threads()
        return wkv7_reference(*args)

    def reference(*args):
        seen["reference"] = torch.get_num_threads()
        return wkv7_reference(*args)

    monkeypatch.setattr(verify, "wkv7_reference", reference)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # a test process may run on one thread (mutation runs do): the case needs two
        assert verify.check(kernel, 16, torch.float32, CPU).ok
        assert seen == {"kernel": 2, "reference": 1} and torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert verify.check(kernel, 16, torch.float32, CPU).ok
        assert seen == {"kernel": 1, "reference": 1} and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        with verify._one_cpu_thread(torch.device("meta")):  # another device's reference keeps the CPU's threads
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_the_problem_is_a_layers():
    """docs/rwkv7.md's inputs: a = -kk, b = kk * a_gate with kk unit rows and a_gate in (0, 1), decays
    exp(-exp(w)) in (0.545, 1), k shrunk by a factor in [a_gate, 1], r and the state at scale 0.5."""
    for n in (1, 16):  # at head size 1 most |x| < 1: a larger eps than 1e-12 would leave those rows short of 1
        (r, w, k, v, a, b), state, dy, ds = verify._problem(n, torch.float32, CPU, 0)
        shape = (verify.PROBLEM["B"], verify.PROBLEM["T"], verify.PROBLEM["H"], n)
        assert all(x.shape == shape for x in (r, w, k, v, a, b, dy))
        assert state.shape == ds.shape == (shape[0], shape[2], n, n)
        assert torch.allclose((-a).norm(dim=-1), torch.ones(()), atol=1e-6)
        gate = b / (-a)
        assert bool(((gate > 0) & (gate < 1)).all())
        decay = torch.exp(-torch.exp(w))
        assert bool(((decay > 0.545) & (decay < 1)).all())
    (r, w, k, v, a, b), state, dy, ds = verify._problem(64, torch.float32, CPU, 0)  # ~9,500 values each
    assert 0.45 < r.std() < 0.55 and 0.45 < state.std() < 0.55 and 0.9 < v.std() < 1.1 and 0.9 < ds.std() < 1.1
    # k = z/2 (1 + (a_gate - 1) u), z ~ N(0, 1), u ~ U(0, 1), a_gate = sigmoid(N(0, 1)): rms 0.5 sqrt(E[f^2])
    gate = torch.sigmoid(torch.randn(200_000, generator=torch.Generator().manual_seed(1)))
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(2))
    want = 0.5 * (1 + (gate - 1) * u).pow(2).mean().sqrt()
    assert abs(k.pow(2).mean().sqrt() - want) < 0.04


def test_a_bf16_check_hands_the_kernel_bf16():
    seen = []

    def kernel(*args):
        seen.append({x.dtype for x in args[:6]})
        return wkv7_reference(*args)

    assert verify.check(kernel, 16, torch.bfloat16, CPU).ok
    assert seen == [{torch.bfloat16}]


def test_rel_err_is_relative_also_below_one():
    want = torch.full((4,), 1e-3)
    assert verify._rel_err(want * 1.01, want) == pytest.approx(0.01, rel=1e-3)
    assert math.isinf(verify._rel_err(None, want)) and math.isinf(verify._rel_err(want[:2], want))
    assert math.isinf(verify._rel_err(torch.tensor([1.0, math.nan, 0, 0]), want))


def test_an_error_at_the_tolerance_passes(monkeypatch):
    monkeypatch.setattr(verify, "_rel_err", lambda got, want: verify.tolerance(torch.float32))
    v = verify.check(wkv7_reference, 16, torch.float32, CPU)
    assert v.ok and v.max_err == 1e-4 and v.describe() == "max rel. error 1.0e-04 (y) <= 1e-04"


def test_a_verdict_times_the_check():
    t0 = time.perf_counter()
    good = verify.check(wkv7_reference, 16, torch.float32, CPU)
    bad = verify.check(crashes_with(RuntimeError("boom")), 16, torch.float32, CPU)
    elapsed = time.perf_counter() - t0
    assert 0 < good.seconds <= elapsed and 0 <= bad.seconds <= elapsed


def crashes_with(error):
    def kernel(*args):
        raise error
    return kernel


def test_a_crash_is_a_failed_verdict_with_its_first_line():
    v = verify.check(crashes_with(RuntimeError()), 16, torch.float32, CPU)  # an exception without a message
    assert v.ok is False and math.isinf(v.max_err) and v.tol == 1e-4 and v.worst == ""
    assert v.error == "RuntimeError: " and v.describe() == "raised RuntimeError: "
    v = verify.check(crashes_with(ValueError("  first line\nsecond")), 16, torch.bfloat16, CPU)
    assert v.error == "ValueError: first line" and v.tol == 3e-2
    v = verify.check(crashes_with(ValueError("x" * 500)), 16, torch.float32, CPU)
    assert v.error == ("ValueError: " + "x" * 500)[:200]


def test_describe_says_which_side_of_the_tolerance():
    assert verify.Verdict(True, 2e-6, "dk", 1e-4, 0.1).describe() == "max rel. error 2.0e-06 (dk) <= 1e-04"
    assert verify.Verdict(False, 5e-2, "y", 3e-2, 0.1).describe() == "max rel. error 5.0e-02 (y) > 3e-02"


# --- ops/__init__.py: wkv7's entry, the one-row products, the one-token step ----------------------------------


def _inputs(T=3, N=16, dtype=torch.float32):
    from tests.ops.conftest import wkv_inputs

    return wkv_inputs(1, T, 2, N, dtype=dtype, seed=3)[0]


def test_wkv7_refuses_wrong_shapes_in_one_line():
    from peft_rwkv7.ops import wkv7

    r, w, k, v, a, b = _inputs()
    with pytest.raises(ValueError) as e:
        wkv7(r[0], w[0], k[0], v[0], a[0], b[0])
    assert str(e.value) == "wkv7: inputs must be [B, T, H, N], got r of shape (3, 2, 16)"
    with pytest.raises(ValueError) as e:
        wkv7(r, w, k[:, :2], v, a, b)
    assert str(e.value) == "wkv7: k has shape (1, 2, 2, 16), expected (1, 3, 2, 16) like r"
    with pytest.raises(ValueError) as e:
        wkv7(r, w, k, v, a, b, state=torch.zeros(1, 2, 16, 8))
    assert str(e.value) == "wkv7: state has shape (1, 2, 16, 8), expected (1, 2, 16, 16)"
    with pytest.raises(ValueError) as e:
        wkv7(r, w, k, v, a, b, backend="fast")
    assert str(e.value) == "wkv7: unknown backend 'fast'; expected one of auto, reference, cpu, cuda, triton"
    wkv7(r, w, k, v, a, b, state=torch.zeros(1, 2, 16, 16), backend="reference")  # the right shapes run


@pytest.mark.parametrize("dtypes, want", [
    ((torch.bfloat16,) * 6, torch.bfloat16),
    ((torch.bfloat16,) * 5 + (torch.float32,), torch.float32),  # b alone fp32: the kernels compute in fp32
    ((torch.float32,) + (torch.bfloat16,) * 5, torch.float32),
], ids=["bf16", "b-fp32", "r-fp32"])
def test_wkv7_asks_for_the_kernel_of_its_inputs_dtype_and_head_size(monkeypatch, dtypes, want):
    import peft_rwkv7.ops as ops

    asked = []

    def resolve(backend, device, head_size, dtype):
        asked.append((backend, device, head_size, dtype))
        return wkv7_reference

    monkeypatch.setattr(ops, "_resolve", resolve)
    xs = [x.to(d) for x, d in zip(_inputs(N=8), dtypes)]
    ops.wkv7(*xs, backend="cpu")
    assert asked == [("cpu", CPU, 8, want)]


def test_the_decay_from_z_goes_to_a_kernel_that_takes_it_and_is_made_for_one_that_does_not(monkeypatch):
    import torch.nn.functional as F

    import peft_rwkv7.ops as ops

    r, z, k, v, a, b = _inputs()
    got = {}

    def takes_z(r, w, k, v, a, b, state, decay_offset=None):
        got["takes"] = (w, decay_offset)
        return r, state

    takes_z.takes_decay_logit = True

    def takes_w(r, w, k, v, a, b, state):
        got["made"] = w
        return r, state

    for fn in (takes_z, takes_w):
        monkeypatch.setattr(ops, "_resolve", lambda *args, fn=fn: fn)
        ops.wkv7(r, z, k, v, a, b, decay_offset=0.5)
    assert got["takes"][0] is z and got["takes"][1] == 0.5
    assert torch.equal(got["made"], F.logsigmoid(z) - 0.5)
    monkeypatch.setattr(ops, "_resolve", lambda *args: takes_w)
    ops.wkv7(r, z, k, v, a, b)  # no offset: w is the log-log decay itself
    assert got["made"] is z


def test_partitioned_and_available_backends():
    from peft_rwkv7.ops import available_backends, partitioned

    plain, zero3 = torch.zeros(2), torch.zeros(2)
    zero3.ds_id = 7
    assert partitioned(zero3) and partitioned(plain, zero3) and not partitioned(plain) and not partitioned()
    assert available_backends("cpu") == available_backends(CPU) == dispatch.available(CPU)
    assert available_backends() == dispatch.available(CPU)


def test_one_row_products_take_the_kernel_only_where_it_can(monkeypatch):
    import peft_rwkv7.ops as ops

    calls = []
    real_mv, real_vm = cpu.matvec, cpu.vecmat
    monkeypatch.setattr(cpu, "matvec", lambda w, x: calls.append(("matvec", x.dtype)) or real_mv(w, x))
    monkeypatch.setattr(cpu, "vecmat", lambda x, w: calls.append(("vecmat", x.dtype)) or real_vm(x, w))
    w_out_in, w_in_out, x = torch.randn(5, 4), torch.randn(4, 5), torch.randn(1, 4)
    with torch.no_grad():
        assert ops.linear(x, w_out_in).shape == (1, 5) and ops.matmul(x, w_in_out).shape == (1, 5)
        ops.linear(x.bfloat16(), w_out_in.bfloat16())
        ops.matmul(x.bfloat16(), w_in_out.bfloat16())  # vecmat is fp32 only: torch's product
        ops.linear(x.half(), w_out_in.half())  # neither kernel takes fp16
        ops.matmul(torch.randn(1, 5), w_in_out.t())  # [in, out] is read as x @ weight: 5 inputs here
    assert calls == [("matvec", torch.float32), ("vecmat", torch.float32), ("matvec", torch.bfloat16)]
    calls.clear()
    w_grad = w_out_in.clone().requires_grad_()
    ops.linear(x, w_grad)  # autograd wants the weight's gradient: torch's product
    ops.linear(x.requires_grad_(), w_out_in)
    with torch.no_grad():
        ops.linear(x, w_grad)  # no graph is made: the kernel may take it
    assert calls == [("matvec", torch.float32)]
    calls.clear()
    monkeypatch.setattr(cpu, "is_available", lambda device: False)
    with torch.no_grad():
        ops.linear(x, w_out_in)
        ops.matmul(x, w_in_out)
    assert calls == []


def test_row_chunks_take_the_chunked_product_unless_the_weight_is_partitioned(monkeypatch):
    import peft_rwkv7.ops as ops
    import peft_rwkv7.ops.rowsplit as rowsplit

    seen = []
    monkeypatch.setattr(rowsplit, "chunked_linear", lambda x, w: seen.append(w) or torch.full((x.shape[0], 3), 9.0))
    x, w = torch.randn(4, 2), torch.randn(3, 2)
    assert torch.equal(ops.linear(x, w, row_chunks=True), torch.full((4, 3), 9.0))
    assert torch.equal(ops.linear(x, w), x @ w.t()) and len(seen) == 1  # without row_chunks: not asked
    w.ds_id = 1
    assert torch.equal(ops.linear(x, w, row_chunks=True), x @ w.t()) and len(seen) == 1
    monkeypatch.setattr(rowsplit, "chunked_linear", lambda x, w: None)  # outside its zone: torch's product
    assert torch.equal(ops.linear(x, torch.ones(3, 2), row_chunks=True), x @ torch.ones(2, 3))


@pytest.mark.parametrize("kernel", [True, False], ids=["extension", "without"])
def test_the_one_token_step_gives_y_in_rs_dtype(monkeypatch, kernel):
    from peft_rwkv7.ops import wkv7_step, wkv7_step_reference

    if not kernel:
        monkeypatch.setattr(cpu, "is_available", lambda device: False)
    calls = []
    real = cpu.wkv7_step_cpu
    monkeypatch.setattr(cpu, "wkv7_step_cpu", lambda *a: calls.append(1) or real(*a))
    r, w, k, v, a, b = (x[:, 0] for x in _inputs(T=1, dtype=torch.bfloat16))
    state = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y, s = wkv7_step(r, w, k, v, a, b, state)
        y_ref, s_ref = wkv7_step_reference(*(x.float() for x in (r, w, k, v, a, b)), state)
    assert calls == ([1] if kernel else [])
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert torch.allclose(y.float(), y_ref, rtol=1e-2, atol=1e-2) and torch.allclose(s, s_ref, atol=1e-5)


def test_wkv7_hands_auto_its_head_size_dtype_and_state(monkeypatch):
    import peft_rwkv7.ops as ops

    asked, states = [], []

    def resolve(backend, device, head_size, dtype):
        asked.append((backend, device, head_size, dtype))
        return lambda *args: states.append(args[6]) or (args[0], args[6])

    monkeypatch.setattr(dispatch, "resolve", resolve)
    xs = _inputs(N=8, dtype=torch.bfloat16)
    state = torch.zeros(1, 2, 8, 8)
    ops.wkv7(*xs, state=state)  # backend: auto by default
    assert asked == [("auto", CPU, 8, torch.bfloat16)] and states[0] is state


def test_linear_with_a_weight_that_does_not_fit_is_torchs_error():
    import torch.nn.functional as F

    import peft_rwkv7.ops as ops

    x, w = torch.randn(1, 4), torch.randn(5, 3)
    with pytest.raises(RuntimeError) as want:
        F.linear(x, w)
    with torch.no_grad(), pytest.raises(RuntimeError) as got:
        ops.linear(x, w)
    assert str(got.value) == str(want.value)
