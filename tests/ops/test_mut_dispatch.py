"""What mutation testing of ops/dispatch.py, ops/verify.py and ops/__init__.py found untested (issue 23: every
speed path rests on which WKV kernel a call gets, and on the first-use check that lets it have one).

Expectations come from outside the code under test: the backends this machine has (the CPU extension builds
here; no GPU), the reference op, hand-made wrong kernels, fp64 recurrences and the exact warning text."""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch

from peft_rwkv7.ops import cpu, dispatch, verify, wkv7_reference

CPU = torch.device("cpu")


@pytest.fixture
def fresh(monkeypatch):
    """An empty per-process verdict cache for this test (the real one is restored afterwards)."""
    monkeypatch.setattr(dispatch, "_VERDICTS", {})


def _warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if "failed its check" in str(w.message)]


def off_by_a_percent(r, w, k, v, a, b, state=None):
    y, s = wkv7_reference(r, w, k, v, a, b, state)
    return y + 0.01 * y.detach(), s  # y 1% off, the gradients right


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
    fn, caught = _warnings(lambda: dispatch.resolve("auto", CPU))
    assert fn is cpu.wkv7_cpu and caught == []
    assert set(dispatch._VERDICTS) == {("cpu", 64, torch.float32, "cpu")}


def test_a_bf16_verdict_is_a_bf16_check(fresh):
    v = dispatch.verdict("cpu", cpu.wkv7_cpu, 16, torch.bfloat16, CPU)
    assert v.ok and v.tol == 3e-2
    assert v.max_err > 1e-4  # bf16's rounding of y and the gradients shows: the check ran in bf16, not fp32


def test_the_warning_names_the_dtype_without_torch_and_is_a_runtime_warning(fresh):
    _, caught = _warnings(lambda: dispatch.verdict("cpu", off_by_a_percent, 16, torch.float32, CPU))
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    msg = str(caught[0].message)
    assert msg.startswith("wkv7: the cpu kernel failed its check against the reference for head size 16, float32 "
                          "on cpu (max rel. error 1.0e-02 (y) > 1e-04); using the next backend instead"), msg
    assert "torch." not in msg
    # cached: the second call neither checks nor warns again
    assert _warnings(lambda: dispatch.verdict("cpu", off_by_a_percent, 16, torch.float32, CPU))[1] == []


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
