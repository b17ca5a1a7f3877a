"""One small correctness check of a WKV7 kernel against the reference op, on the device it will run on.

`check(fn, head_size, dtype, device)` runs `fn` and `wkv7_reference` on the same random problem
(B=2, T=37, H=2, N=head_size: several batches and heads, T past two 16-step chunks (CUDA, Triton) and
one 32-step chunk (CPU), and not a multiple of either) with a trainable initial state and random
upstream gradients on y and the final state, and compares y, the final state and the gradients of r,
w, k, v, a, b and the initial state. `dispatch` runs it once per (backend, head size, dtype, device
type) before "auto" hands a fused kernel to anyone; `rwkv-peft doctor` runs it for every backend that builds.

The check leaves the caller's state alone: its own random generator (the global RNG streams of a
training run are untouched), autograd on / autocast off whatever the caller had, and torch's CPU thread
count restored after the reference's single-threaded run. It costs ~0.1 s per (head size, dtype) for
N <= 64 on two CPU cores (the reference's 37-step loop is most of it), a few ms for the kernel itself.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .reference import wkv7_reference

__all__ = ["Verdict", "check", "tolerance", "PROBLEM"]

WkvFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
PROBLEM = {"B": 2, "T": 37, "H": 2}  # head size and dtype come from the call that needs the kernel
NAMES = ("y", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate")
# Error measure per tensor: max |kernel - reference| / max |reference|. fp32: both sides accumulate
# in fp32 and differ only in the order of operations (~1e-6 here), so 1e-4 leaves room for chunked
# algorithms and still catches any real mistake (those are O(1)). Half precision: y and the input
# gradients are rounded to the input dtype (bf16 step 2^-8, fp16 2^-11), and the kernels take dy in
# that dtype too.
_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2}
_FP32_TOLERANCE = 1e-4


def tolerance(dtype: torch.dtype) -> float:
    return _TOLERANCE.get(dtype, _FP32_TOLERANCE)


@dataclass(frozen=True)
class Verdict:
    """Outcome of one check. max_err: the largest relative error over all compared tensors (inf for a
    missing gradient or non-finite values); worst: which tensor it was; error: the exception, if any."""

    ok: bool
    max_err: float
    worst: str
    tol: float
    seconds: float
    error: str = ""

    def describe(self) -> str:
        if self.error:
            return f"raised {self.error}"
        return f"max rel. error {self.max_err:.1e} ({self.worst}) {'<=' if self.ok else '>'} {self.tol:.0e}"


def _problem(head_size: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Inputs as an RWKV-7 layer makes them (docs/rwkv7.md), a random initial state and upstream gradients."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, T, H, N = PROBLEM["B"], PROBLEM["T"], PROBLEM["H"], head_size

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    shape = (B, T, H, N)
    w = -F.softplus(-(randn(*shape) - 0.5)) - 0.5  # per-step decay exp(-exp(w)) in (0.545, 1)
    kk = F.normalize(randn(*shape), dim=-1, eps=1e-12)
    a_gate = torch.sigmoid(randn(*shape))
    k = randn(*shape) * 0.5 * (1 + (a_gate - 1) * torch.rand(*shape, generator=g, device=device))
    inputs = [x.to(dtype) for x in (randn(*shape) * 0.5, w, k, randn(*shape), -kk, kk * a_gate)]
    state = randn(B, H, N, N) * 0.5
    return inputs, state, randn(*shape), randn(B, H, N, N)


def _run(fn: WkvFn, inputs, state, dy, ds) -> list[torch.Tensor | None]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    s0 = state.detach().clone().requires_grad_()
    y, s = fn(*leaves, s0)
    ((y.float() * dy).sum() + (s.float() * ds).sum()).backward()
    return [y.detach(), s.detach()] + [x.grad for x in leaves] + [s0.grad]


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """The reference's ~600 tiny CPU ops on one thread: as fast as on several on an idle machine, and 3-30x
    faster on a busy one, where each op's thread hand-off waits for a core. The kernel keeps its threads."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _rel_err(got: torch.Tensor | None, want: torch.Tensor) -> float:
    if got is None or got.shape != want.shape:
        return math.inf
    got, want = got.detach().float(), want.detach().float()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def check(
    fn: WkvFn, head_size: int, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> Verdict:
    """Compare `fn` (wkv7's signature) with the reference on one small problem; never raises."""
    device = torch.device(device)
    tol = tolerance(dtype)
    t0 = time.perf_counter()
    try:
        # Its own autograd graph, isolated from the caller's: identity saved-tensor hooks hide an enclosing
        # activation checkpoint's, which would otherwise count this first-use check's saved tensors in the
        # layer's forward and then miss them in the recomputation (CheckpointError).
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(_same, _same):
            inputs, state, dy, ds = _problem(head_size, dtype, device, seed)
            got = _run(fn, inputs, state, dy, ds)
            # The reference computes in fp32 from the same (rounded) inputs the kernel saw.
            with _one_cpu_thread(device):
                want = _run(wkv7_reference, [x.float() for x in inputs], state, dy, ds)
            errs = [_rel_err(g, w) for g, w in zip(got, want)]
    except Exception as e:  # a kernel that crashes fails its check; the caller decides what follows
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return Verdict(False, math.inf, "", tol, time.perf_counter() - t0, f"{type(e).__name__}: {text}"[:200])
    worst = max(range(len(errs)), key=lambda i: errs[i])
    return Verdict(errs[worst] <= tol, errs[worst], NAMES[worst], tol, time.perf_counter() - t0)
