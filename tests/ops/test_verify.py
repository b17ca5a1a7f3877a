"""`wkv_backend: auto` checks a fused kernel against the reference once before handing it out.

Wrong kernels are made from the reference: a perturbed output, a wrong gradient, a lost state
gradient, a crash. They go in through `verify.check` directly and, for the fallback, in place of the
real CPU kernel (or as GPU candidates through `dispatch.first_verified`, which auto uses on GPUs).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from peft_rwkv7.ops import cpu, dispatch, verify, wkv7, wkv7_reference
from tests.ops.conftest import assert_close, wkv_inputs, wkv_rounding_level, wkv_rtol

CPU = torch.device("cpu")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times 1.01: a kernel whose forward is right and whose dw is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


def perturbed_output(r, w, k, v, a, b, state=None):
    y, s = wkv7_reference(r, w, k, v, a, b, state)
    return y + 0.01 * y.detach(), s  # 1% off in y only: the gradients stay right


def wrong_dw(r, w, k, v, a, b, state=None):
    return wkv7_reference(r, _ScaleGrad.apply(w), k, v, a, b, state)


def drops_state_grad(r, w, k, v, a, b, state=None):
    return wkv7_reference(r, w, k, v, a, b, None if state is None else state.detach())


def crashes(r, w, k, v, a, b, state=None):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _recorded(fn):
    """fn's result and the messages of the kernel-check warnings it gave (RuntimeWarnings, as dispatch gives them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning shows: only the cache may keep a repeat away
        result = fn()
    return result, [str(w.message) for w in caught
                    if "failed its check" in str(w.message) and issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size", [16, 64])
def test_real_cpu_kernel_passes(head_size, dtype):
    assert cpu.is_available(CPU)
    v = verify.check(cpu.wkv7_cpu, head_size, dtype, CPU)
    assert v.ok, v.describe()
    # a real margin, not a near miss: at rounding level (conftest), which sits below the gate
    assert v.max_err <= wkv_rounding_level(verify.PROBLEM["T"], head_size, dtype) < v.tol


@pytest.mark.parametrize(
    "fn, worst",
    [(perturbed_output, "y"), (wrong_dw, "dw"), (drops_state_grad, "dstate"), (crashes, "")],
)
def test_wrong_kernels_fail(fn, worst):
    v = verify.check(fn, 16, torch.float32, CPU)
    assert not v.ok
    assert v.worst == worst
    if fn is crashes:
        assert v.error.startswith("RuntimeError: CUDA error") and "raised" in v.describe()
    else:
        assert v.max_err > v.tol
    if fn is drops_state_grad:
        assert math.isinf(v.max_err)


def test_check_leaves_rng_grad_mode_autocast_and_threads_alone():
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert verify.check(wkv7_reference, 16, torch.float32, CPU).ok
        assert not torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
    with torch.inference_mode():
        assert verify.check(wkv7_reference, 16, torch.float32, CPU).ok
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads


def test_auto_falls_back_from_a_wrong_cpu_kernel_with_one_warning(fresh, monkeypatch):
    monkeypatch.setattr(cpu, "wkv7_cpu", wrong_dw)
    inputs, state = wkv_inputs(1, 9, 2, 16, with_state=True)

    def run_twice():
        return [wkv7(*inputs, state=state, backend="auto") for _ in range(2)]

    outs, messages = _recorded(run_twice)
    assert len(messages) == 1, messages
    msg = messages[0]
    assert "cpu kernel" in msg and "head size 16" in msg and "float32" in msg and "(dw)" in msg
    assert "1.0e-02" in msg  # the max error: dw is 1% off
    y_ref, s_ref = wkv7_reference(*inputs, state=state)
    for y, s in outs:
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
    assert dispatch.resolve("auto", CPU, 16, torch.float32) is wkv7_reference
    # Another head size is another check (and another warning); the first verdict stays cached.
    assert _recorded(lambda: dispatch.resolve("auto", CPU, 32, torch.float32))[1] != []
    assert set(dispatch._VERDICTS) == {("cpu", 16, torch.float32, "cpu"), ("cpu", 32, torch.float32, "cpu")}


def test_auto_keeps_a_passing_kernel(fresh):
    fn, messages = _recorded(lambda: dispatch.resolve("auto", CPU, 24, torch.bfloat16))
    assert fn is cpu.wkv7_cpu and messages == []
    assert dispatch._VERDICTS[("cpu", 24, torch.bfloat16, "cpu")].ok


def test_gpu_order_falls_through_to_the_next_verified_backend(fresh):
    fn, messages = _recorded(lambda: dispatch.first_verified(
        [("cuda", perturbed_output), ("triton", wkv7_reference)], 32, torch.float32, CPU))
    assert fn is wkv7_reference and len(messages) == 1 and "the cuda kernel" in messages[0]
    fn, messages = _recorded(lambda: dispatch.first_verified(
        [("cuda", crashes), ("triton", perturbed_output)], 64, torch.float32, CPU))
    assert fn is wkv7_reference  # both fail: the reference
    assert len(messages) == 2 and "raised RuntimeError" in messages[0] and "the triton kernel" in messages[1]


def test_unsupported_head_size_falls_back_without_raising(fresh, monkeypatch):
    # CUDA compiles head sizes 16/32/64/128 only: 48 goes to Triton unchecked-for-cuda and unwarned.
    fn, messages = _recorded(lambda: dispatch.first_verified(
        [("cuda", crashes), ("triton", cpu.wkv7_cpu)], 48, torch.float32, CPU))
    assert fn is cpu.wkv7_cpu and messages == []
    assert ("cuda", 48, torch.float32, "cpu") not in dispatch._VERDICTS
    # The same through wkv7(backend="auto") on CPU, with the CPU kernel limited to a few head sizes.
    monkeypatch.setattr(cpu, "HEAD_SIZES", (16, 32), raising=False)
    inputs, _ = wkv_inputs(1, 5, 1, 24)
    y, _ = wkv7(*(x.requires_grad_() for x in inputs), backend="auto")
    assert type(y.grad_fn).__name__ != "_Wkv7CpuBackward"
    assert dispatch.resolve("auto", CPU, 16, torch.float32) is cpu.wkv7_cpu


def test_explicit_backends_are_not_checked_and_still_raise(fresh, monkeypatch):
    monkeypatch.setattr(cpu, "wkv7_cpu", perturbed_output)
    assert dispatch.resolve("cpu", CPU, 16, torch.float32) is perturbed_output  # as asked
    assert dispatch._VERDICTS == {}
    with pytest.raises(RuntimeError, match="'cuda' is not available for cpu tensors"):
        dispatch.resolve("cuda", CPU, 16, torch.float32)
    with pytest.raises(ValueError, match="unknown backend"):
        wkv7(*wkv_inputs(1, 2, 1, 16)[0], backend="fast")


def test_first_use_check_inside_an_activation_checkpoint(fresh):
    # The first `auto` call of a run can come inside a checkpointed layer (train.chunk_len, grad_cp):
    # the check's own graph must not count as tensors the layer saved, or the backward's
    # recomputation (which finds the verdict cached) raises CheckpointError.
    inputs, state = wkv_inputs(1, 9, 2, 16, with_state=True)
    leaves = [x.clone().requires_grad_() for x in inputs]

    def layer(*xs):
        y, s = wkv7(*xs, state=state, backend="auto")
        return y.sum() + s.sum()

    out = torch.utils.checkpoint.checkpoint(layer, *leaves, use_reentrant=False)
    out.backward()
    ref = [x.clone().requires_grad_() for x in inputs]
    y, s = wkv7_reference(*ref, state=state)
    (y.sum() + s.sum()).backward()
    for got, want in zip(leaves, ref):
        assert_close(got.grad, want.grad, wkv_rtol(9, 16, torch.float32), "grad")
