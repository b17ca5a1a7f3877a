"""The CUDA WKV7 kernels' own source (cuda/wkv7_cuda.cuh), compiled by the host compiler and run on the CPU
through cuda_emu.h, against the reference op: outputs, every gradient (the initial state's included, with
and without an incoming final-state gradient), fp32 and bf16, the kernels' bf16 conversions bit for bit,
and mutated copies of the kernel that these checks must reject (a missing __syncthreads, a wrong index).

The emulation runs a block's threads one at a time in a fixed order between barriers (forward, reverse or
a fixed-seed shuffle), so a race gives the same wrong answer every run. Every output buffer is NaN-filled
before each launch, so an element the kernel does not write fails the finiteness check.

What this cannot show: GPU-only behaviour (warp scheduling, float4 alignment faults, fast-math, launch
limits); scripts/gpu_check.sh covers the real device.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from peft_rwkv7.ops import cuda as wkv_cuda
from peft_rwkv7.ops import wkv7_reference
from peft_rwkv7.ops.build import load_extension
from tests.ops.conftest import assert_close, wkv_inputs, wkv_rounding_level, wkv_rtol
from tests.ops.test_cpu_backend import NAMES, compare, fwd_bwd

KERNELS = wkv_cuda.SOURCE_DIR
EMU_FILES = ("cuda_emu.h", "wkv7_cuda.cuh", "wkv7_cuda_emu_op.cpp")
# c++20: std::binary_semaphore. No strict aliasing: the kernel reads float arrays through float4.
CFLAGS = ["-O2", "-std=c++20", "-fno-strict-aliasing", "-pthread"]
FORWARD, REVERSE, SHUFFLED = 0, 1, 2
ORDER_IDS = {FORWARD: "fwd-order", REVERSE: "rev-order", SHUFFLED: "shuffled"}
CXX = os.environ.get("CXX", "c++")

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no host C++ compiler ({CXX})")


def build(folder: Path, name: str):
    return load_extension(
        name, [folder / "wkv7_cuda_emu_op.cpp"], "the CUDA kernels for CPU emulation (tests)",
        extra_cflags=CFLAGS, extra_ldflags=["-pthread"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def emu():
    # With a compiler present, a build failure is a test failure, not a skip.
    return build(KERNELS, "peft_rwkv7_wkv7_cuda_emu")


def run(ext, inputs, state, order=FORWARD, **kw) -> list[torch.Tensor]:
    """fwd_bwd (test_cpu_backend's: y, final state, every gradient) through the CUDA autograd glue."""
    ext.set_thread_order(order)
    try:
        return fwd_bwd(functools.partial(wkv_cuda.wkv7_with_extension, ext), inputs, state, **kw)
    finally:
        ext.set_thread_order(FORWARD)


def rel_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    """Max abs error over the expected tensor's max magnitude, per output (as assert_close measures it)."""
    return {
        name: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
        for name, a, b in zip(NAMES, got, want)
        if b is not None
    }


def check(ext, B, T, H, N, dtype, order=FORWARD, with_state=True, seed=None, **kw) -> None:
    inputs, state = wkv_inputs(B, T, H, N, dtype, seed=T + N if seed is None else seed, with_state=with_state)
    compare(run(ext, inputs, state, order, **kw), fwd_bwd(wkv7_reference, inputs, state, **kw))


# --- the kernel source against the reference -------------------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 100])
def test_lengths_match_reference(emu, T, dtype, with_state):
    # 15/16/17: one step short of, exactly at and one past a checkpoint chunk; 100: 7 chunks, the last partial.
    check(emu, 2, T, 3, 32, dtype, with_state=with_state, seed=T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", wkv_cuda.HEAD_SIZES)
def test_head_sizes_match_reference(emu, N, dtype):
    # N = 128 stages G through shared memory in two tiles; the others in one.
    check(emu, 2 if N < 128 else 1, 33, 2, N, dtype)


@pytest.mark.parametrize("order", [REVERSE, SHUFFLED], ids=ORDER_IDS.get)
@pytest.mark.parametrize(
    "N, T, dtype",
    [(16, 17, torch.float32), (32, 40, torch.bfloat16), (64, 33, torch.float32), (128, 18, torch.float32)],
)
def test_other_thread_orders_match_reference(emu, N, T, dtype, order):
    check(emu, 2 if N < 128 else 1, T, 2, N, dtype, order)


@pytest.mark.parametrize("use_y, use_state", [(False, True), (True, False)], ids=["state-only", "y-only"])
def test_one_output_used(emu, use_y, use_state):
    # y-only: the final-state gradient arrives as zeros (autograd materialises it); state-only: dy is zeros.
    check(emu, 2, 21, 2, 32, torch.float32, use_y=use_y, use_state=use_state, seed=7)


def test_only_the_state_trainable(emu):
    inputs, state = wkv_inputs(2, 19, 2, 32, seed=9, with_state=True)
    grads = []
    for fn in (functools.partial(wkv_cuda.wkv7_with_extension, emu), wkv7_reference):
        s0 = state.clone().requires_grad_()
        y, s = fn(*inputs, s0)
        (y.square().sum() + s.sum()).backward()
        grads.append(s0.grad)
    assert_close(grads[0], grads[1], wkv_rtol(19, 32, torch.float32), "dstate")


def test_absent_final_state_gradient_is_zero(emu):
    # Only a direct call reaches the kernel's null ds_out path (see above): it must equal zeros exactly.
    inputs, state = wkv_inputs(1, 20, 2, 32, seed=2, with_state=True)
    B, T, H, N = inputs[0].shape
    y, s_out, ckpt = torch.empty_like(inputs[0]), torch.empty(B, H, N, N), torch.empty(B, H, 2, N, N)
    emu.forward(*inputs, state, y, s_out, ckpt)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    results = []
    for ds_out in (torch.empty(0), torch.zeros(B, H, N, N)):
        out = [torch.empty_like(y) for _ in range(6)] + [torch.empty(B, H, N, N)]
        emu.backward(*inputs, dy, ds_out, ckpt, torch.empty(B, H, wkv_cuda.CHUNK_LEN, N, N), *out)
        results.append(out)
    assert all(torch.isfinite(x).all() and torch.equal(x, z) for x, z in zip(*results))


def test_inference_without_checkpoints(emu):
    # No gradient wanted: the forward runs without its checkpoint buffer (a null pointer in the kernel).
    inputs, state = wkv_inputs(2, 35, 2, 64, torch.bfloat16, seed=4, with_state=True)
    with torch.no_grad():
        got = wkv_cuda.wkv7_with_extension(emu, *inputs, state)
    compare(list(got), list(wkv7_reference(*inputs, state)))


def test_chunked_bptt_equals_whole_sequence(emu):
    inputs, state = wkv_inputs(2, 40, 3, 32, seed=11, with_state=True)

    def pieces(*args):
        *rwkvab, s = args
        ys = []
        for lo, hi in ((0, 7), (7, 23), (23, 40)):
            y, s = wkv_cuda.wkv7_with_extension(emu, *(x[:, lo:hi] for x in rwkvab), s)
            ys.append(y)
        return torch.cat(ys, dim=1), s

    compare(run(emu, inputs, state), fwd_bwd(wkv7_reference, inputs, state))
    compare(fwd_bwd(pieces, inputs, state), fwd_bwd(wkv7_reference, inputs, state))


def test_fp32_error_is_at_rounding_level(emu):
    # Same fp32 recurrence in a different summation order: at the level of rounding errors that add as a
    # random walk, an order below the worst case wkv_rtol allows.
    inputs, state = wkv_inputs(1, 40, 2, 64, seed=5, with_state=True)
    errors = rel_errors(run(emu, inputs, state), fwd_bwd(wkv7_reference, inputs, state))
    assert max(errors.values()) <= wkv_rounding_level(40, 64, torch.float32) < wkv_rtol(40, 64, torch.float32) / 8


@pytest.mark.slow
@pytest.mark.parametrize("order", [FORWARD, REVERSE], ids=ORDER_IDS.get)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", wkv_cuda.HEAD_SIZES)
@pytest.mark.parametrize("T", [1, 15, 16, 17, 100])
def test_full_grid(emu, T, N, dtype, order):
    check(emu, 2, T, 2, N, dtype, order)


# --- pieces of the emulation ------------------------------------------------------------------------------


def _as_float(bits: torch.Tensor) -> torch.Tensor:
    """uint32 patterns held in int64 -> float32 with exactly those bits."""
    return (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)


def test_bf16_conversions_are_bit_exact(emu):
    # Every bf16 pattern (upper 16 bits: signs, zeros, subnormals, the largest finite, inf, NaN) with lower
    # halves at and around the rounding tie (0x8000 over an even and an odd kept part), plus random floats.
    lows = torch.tensor([0x0000, 0x0001, 0x3FFF, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF])
    grid = ((torch.arange(1 << 16) << 16)[:, None] | lows[None, :]).flatten()
    random = torch.randint(0, 1 << 32, (1 << 20,), generator=torch.Generator().manual_seed(0))
    x = _as_float(torch.cat([grid, random]))
    got, want = emu.float_to_bf16(x), x.to(torch.bfloat16)
    nan = x.isnan()
    assert nan.any() and (x.abs() < torch.finfo(torch.float32).tiny).any() and x.isinf().any()
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), "float -> bf16 differs from torch"
    # NaN stays NaN. torch writes 0x7FC0 or 0xFFFF depending on its code path; CUDA writes 0x7FFF.
    assert (got[nan].view(torch.int16) == 0x7FFF).all()
    assert got.float().isinf().sum() > x.isinf().sum()  # rounding past the largest finite value gives inf
    # bf16 -> float is exact: every one of the 65536 patterns, NaN payloads included.
    b16 = _as_float(torch.arange(1 << 16) << 16).to(torch.bfloat16)  # exact: the low halves are zero
    assert torch.equal(emu.bf16_to_float(b16).view(torch.int32), b16.float().view(torch.int32))


def test_bindings_agree_with_the_python_glue(emu):
    assert emu.chunk_len() == wkv_cuda.CHUNK_LEN
    with pytest.raises(RuntimeError, match="head size 48"):
        wkv_cuda.wkv7_with_extension(emu, *wkv_inputs(1, 3, 1, 48)[0])


def test_emulation_sources_are_package_data():
    # The .cu includes the .cuh: a wheel without it cannot build the CUDA kernels.
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["peft_rwkv7.ops"]
    for name in EMU_FILES:
        assert (KERNELS / name).is_file(), name
        assert any(fnmatch.fnmatch(f"kernels/{name}", g) for g in globs), f"kernels/{name} not in {globs}"


# --- the checks catch broken kernels ------------------------------------------------------------------------
# Each test builds a changed copy of the kernel source in a temp folder (a build each, ~30 s; the build cache
# keys on content, so reruns load it) and requires the comparison with the reference to fail.


def mutant(tmp_path: Path, name: str, edit) -> object:
    """The emulation built from copies of EMU_FILES, with edit(file name, text) -> text applied to each."""
    for file in EMU_FILES:
        (tmp_path / file).write_text(edit(file, (KERNELS / file).read_text()))
    return build(tmp_path, f"peft_rwkv7_wkv7_cuda_emu_{name}")


def fails_checks(ext, shape, orders, label) -> None:
    B, T, H, N = shape
    inputs, state = wkv_inputs(B, T, H, N, seed=3, with_state=True)
    want = fwd_bwd(wkv7_reference, inputs, state)
    for order in orders:
        got = run(ext, inputs, state, order)
        errors = rel_errors(got, want)
        print(f"{label} ({ORDER_IDS[order]}): " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
        with pytest.raises(AssertionError):
            compare(got, want)


SYNC = "__syncthreads();"


def _barriers() -> list[tuple[str, int]]:
    """(kernel, line number) of every barrier in the kernel source, in order."""
    kernel, found = "?", []
    for n, line in enumerate((KERNELS / "wkv7_cuda.cuh").read_text().splitlines(), 1):
        if m := re.search(r"\b(forward|backward)_kernel\(", line):
            kernel = m.group(1)
        found += [(kernel, n)] * line.count(SYNC)
    return found


BARRIERS = _barriers()


@pytest.fixture(scope="module")
def knockout(tmp_path_factory):
    """Barrier k of the kernel source becomes wkv7_emu_sync(k), which skips the one chosen at runtime."""

    def edit(file: str, text: str) -> str:
        if file == "wkv7_cuda.cuh":
            parts = text.split(SYNC)
            text = parts[0] + "".join(f"wkv7_emu_sync({k});{rest}" for k, rest in enumerate(parts[1:]))
            prelude = (
                "inline int wkv7_emu_knockout = -1;\n"
                "inline void wkv7_emu_sync(int k) { if (k != wkv7_emu_knockout) __syncthreads(); }\n"
            )
            text = text.replace("namespace wkv7 {", prelude + "namespace wkv7 {", 1)
        elif file == "wkv7_cuda_emu_op.cpp":
            head = "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n"
            text = text.replace(head, head + '    m.def("knock_out", [](int k) { wkv7_emu_knockout = k; });\n')
        return text

    return mutant(tmp_path_factory.mktemp("knockout"), "knockout", edit)


@pytest.mark.slow
@pytest.mark.parametrize("k", range(len(BARRIERS)), ids=[f"{kernel}-line{n}" for kernel, n in BARRIERS])
def test_every_barrier_is_needed(knockout, k):
    # The knockout build with no barrier removed still passes; each barrier removed fails in both thread
    # orders. N = 128: the second shared-memory tile of G, and its extra barrier, exist only there.
    assert len(BARRIERS) == 8, "barriers added or removed: check that the list above is still right"
    knockout.knock_out(-1)
    check(knockout, 1, 20, 1, 128, torch.float32)
    knockout.knock_out(k)
    try:
        fails_checks(knockout, (1, 20, 1, 128), (FORWARD, REVERSE), f"no barrier at {BARRIERS[k]}")
    finally:
        knockout.knock_out(-1)


# name: (text in wkv7_cuda.cuh, its replacement, the check case (B, T, H, N)).
INDEX_MUTATIONS = {
    # S_{t-1}'s scratch slot read as S_t's (tt instead of tt - 1): dd (so dw) and da use the wrong state.
    "prev-state-slot": ("(tt > 0 ? hist + (tt - 1) * N * N : cp)", "(tt > 0 ? hist + tt * N * N : cp)", (2, 20, 2, 32)),
    # N = 128 only: the column index loses its tile offset (v and sa of rows 0-63 used for both tiles).
    "tile-offset": (
        "const int jt = 4 * j4 + u, j = p * kTile + jt;",
        "const int jt = 4 * j4 + u, j = jt;",
        (1, 20, 1, 128),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("mutation", list(INDEX_MUTATIONS))
def test_broken_index_fails_the_checks(mutation, tmp_path):
    old, new, shape = INDEX_MUTATIONS[mutation]

    def edit(file: str, text: str) -> str:
        if file == "wkv7_cuda.cuh":
            assert text.count(old) == 1, f"{mutation}: the text to mutate is not in the kernel once; update it"
            text = text.replace(old, new)
        return text

    fails_checks(mutant(tmp_path, mutation.replace("-", "_"), edit), shape, (FORWARD,), mutation)
