"""Triton WKV7 backend vs the reference op, forward and backward (incl. the state gradient).

Triton's interpreter must be switched on before triton is first imported, so the comparisons run
in a subprocess (this file run as a module with TRITON_INTERPRET=1): it computes relative errors
per case and prints them as JSON; the tests here check them. The interpreter runs one program at
a time and slowly: the fast cases cover odd T (1, 15, 16, 17, 40), B and H > 1, both head sizes,
several value blocks, bf16 inputs and decays near 0; the full grid is marked slow.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from tests.fp_oracle import UBF16
from tests.ops.conftest import wkv_rtol

REPO = Path(__file__).resolve().parents[2]
NAMES = ("y", "state_out", "dr", "dw", "dk", "dv", "da", "db", "dstate")
FP32_OUT = ("state_out", "dstate")  # fp32 whatever the input dtype


def case_rtol(case, name: str) -> float:
    """Both sides compute in fp32 from the same inputs and upstream gradients (wkv_rtol's fp32 count; the
    chunked form's exponents are sums of log decays rounded gamma_L |sum| relative, which multiplies
    exp(-|sum|) and x exp(-x) <= 1/e, so decays near 0 add nothing). With bf16 inputs y and the input
    gradients are converted once to bf16 at the store, the fp32 reference not: one bf16 ulp (2^-7), as
    Triton's interpreter truncates there (checked: it equals truncation, not round-to-nearest)."""
    _, T, _, N, dtype = case[:5]
    fp32 = wkv_rtol(T, N, torch.float32)
    return fp32 if dtype == "float32" or name in FP32_OUT else 2 * UBF16 + fp32

# (B, T, H, N, dtype, value_block, with_state, grad_on_state, extreme_decay)
FAST_CASES = [
    (2, 17, 1, 16, "float32", None, True, True, False),
    (1, 40, 2, 32, "float32", 16, True, True, False),
    (1, 1, 3, 16, "float32", None, True, True, False),
    (1, 15, 1, 32, "float32", 32, False, True, False),
    (2, 16, 1, 16, "float32", None, True, False, False),
    (1, 20, 1, 24, "float32", None, True, True, True),
    (1, 17, 2, 16, "bfloat16", None, True, True, False),
]
SLOW_CASES = [
    (B, T, 3 if B == 1 else 1, N, "float32", None, True, True, False)
    for B, T, N in itertools.product((1, 2), (1, 15, 16, 17, 40), (16, 32))
]


def _case_errors(case: list) -> dict[str, float]:
    """Relative max errors (max |kernel - reference| / max |reference|) of outputs and gradients."""
    from peft_rwkv7.ops.reference import wkv7_reference
    from peft_rwkv7.ops.triton_wkv import wkv7_triton
    from tests.ops.conftest import wkv_inputs

    B, T, H, N, dtype, value_block, with_state, grad_on_state, extreme = case
    xs, state = wkv_inputs(B, T, H, N, dtype=getattr(torch, dtype), seed=T * 31 + N, with_state=with_state)
    if extreme:  # per-step decays down to exp(-e^4) ~ 1e-24: products over a chunk underflow
        g = torch.Generator().manual_seed(1)
        xs[1] = (torch.randn(B, T, H, N, generator=g) * 2 + 1).clamp(max=4).to(xs[1].dtype)
    ours = [x.clone().requires_grad_() for x in xs]
    ref = [x.detach().float().requires_grad_() for x in xs]
    s_ours = s_ref = None
    if state is not None:
        s_ours, s_ref = state.clone().requires_grad_(), state.clone().requires_grad_()
    y, s = wkv7_triton(*ours, state=s_ours, value_block=value_block)
    y_ref, s_out_ref = wkv7_reference(*ref, state=s_ref)
    g = torch.Generator().manual_seed(2)
    gy = torch.randn(y_ref.shape, generator=g).to(y.dtype).float()  # what autograd hands a bf16 y, both sides
    gs = torch.randn(s_out_ref.shape, generator=g) if grad_on_state else torch.zeros_like(s_out_ref)
    loss = (y.float() * gy).sum() + ((s * gs).sum() if grad_on_state else 0)
    loss.backward()
    ((y_ref * gy).sum() + (s_out_ref * gs).sum()).backward()
    pairs = [(y, y_ref), (s, s_out_ref)] + [(o.grad, r.grad) for o, r in zip(ours, ref)]
    if state is not None:
        pairs.append((s_ours.grad, s_ref.grad))
    errs = {}
    for name, (got, want) in zip(NAMES, pairs):
        got, want = got.float(), want.float()
        finite = bool(torch.isfinite(got).all())
        errs[name] = (got - want).abs().max().item() / want.abs().max().clamp_min(1e-6).item() if finite else 1e9
    errs["dtype_ok"] = y.dtype == xs[0].dtype and all(o.grad.dtype == o.dtype for o in ours)
    return errs


def _run_interpreted(cases: list[tuple], timeout: float) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.ops.test_triton_backend", json.dumps(cases)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(cases: list[tuple], results: list[dict]) -> None:
    failures = []
    for case, res in zip(cases, results):
        assert res.pop("dtype_ok"), f"{case}: output/gradient dtypes differ from the inputs"
        bad = {k: f"{v:.1e} > {case_rtol(case, k):.1e}" for k, v in res.items() if v > case_rtol(case, k)}
        if bad:
            failures.append(f"{case}: {bad}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow  # 15-30 s on a 2-core machine: CI runs it
def test_triton_matches_reference_fast():
    results = _run_interpreted(FAST_CASES, timeout=300)
    assert len(results) == len(FAST_CASES)
    _check(FAST_CASES, results)


@pytest.mark.slow
def test_triton_matches_reference_grid():
    results = _run_interpreted(SLOW_CASES, timeout=1200)
    _check(SLOW_CASES, results)


def test_cpu_availability_follows_the_interpreter():
    # A fresh process without the interpreter must not claim CPU tensors (so "auto" never routes
    # CPU work to Triton); with the interpreter it must.
    code = "import torch; from peft_rwkv7.ops import triton_wkv; print(triton_wkv.is_available(torch.device('cpu')))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for interpret, expected in (("0", "False"), ("1", "True")):
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env={**env, "TRITON_INTERPRET": interpret},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == [expected], (interpret, proc.stdout)


def _compile_for(arch: int, N: int, dtype: str) -> None:
    """Ahead-of-time compile of both kernels to a cubin for sm_<arch> (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from peft_rwkv7.ops.triton_bwd import wkv7_bwd_kernel
    from peft_rwkv7.ops.triton_fwd import wkv7_fwd_kernel
    from peft_rwkv7.ops.triton_wkv import CHUNK_LEN, _blocks

    BK, BV, _ = _blocks(N, None)
    blocks = dict(N=N, BK=BK, BV=BV, L=CHUNK_LEN)
    io = ("r_ptr", "w_ptr", "k_ptr", "v_ptr", "a_ptr", "b_ptr", "y_ptr", "dy_ptr", "dv_ptr")
    for kernel, flags, warps in (
        (wkv7_fwd_kernel, dict(HAS_S0=True, SAVE_CKPT=True), 4),
        (wkv7_bwd_kernel, dict(HAS_DS_OUT=True, WANT_DS0=True), 8),
    ):
        consts = {**blocks, **flags}
        names = kernel.arg_names
        signature = {
            n: "constexpr" if n in consts else f"*{dtype}" if n in io else "*fp32" if n.endswith("_ptr") else "i32"
            for n in names
        }
        src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        assert compiled.asm.get("cubin"), f"{kernel.__name__}: no cubin for sm_{arch}"


SLOW_TARGETS = [(80, 64, "bf16"), (90, 128, "fp32"), (90, 32, "fp32"), (80, 16, "fp32")]
GPU_TARGETS = [(90, 64, "bf16")] + [pytest.param(*t, marks=pytest.mark.slow) for t in SLOW_TARGETS]


@pytest.mark.parametrize("arch,N,dtype", GPU_TARGETS)
def test_kernels_compile_for_gpu(arch, N, dtype):
    # The interpreter cannot catch what only the GPU compiler rejects (layouts, dot shapes, scans).
    pytest.importorskip("triton.backends.nvidia")
    from triton.runtime.interpreter import InterpretedFunction

    from peft_rwkv7.ops.triton_fwd import wkv7_fwd_kernel

    if isinstance(wkv7_fwd_kernel, InterpretedFunction):
        pytest.skip("this process runs Triton's interpreter")
    _compile_for(arch, N, dtype)


if __name__ == "__main__":  # the interpreter-side half of the tests above
    torch.set_num_threads(1)
    print(json.dumps([_case_errors(c) for c in json.loads(sys.argv[1])]))
