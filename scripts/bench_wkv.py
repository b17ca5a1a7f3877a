"""Benchmark WKV7 forward+backward on CPU: the reference (a plain per-step autograd loop) vs the kernel.

    python scripts/bench_wkv.py [--T 512] [--H 12] [--N 64] [--batches 1 4] [--repeats 3] [--threads 1]

Prints, per batch size, fwd+bwd milliseconds for each backend, the speed-up over the plain loop
and the kernel's achieved GFLOP/s next to this machine's fp32 matmul GFLOP/s (torch.mm 1024^3
measured in the same run, with the same threads).

FLOPs counted (useful arithmetic of the recurrence, per step and head, O(N) terms dropped; the
backward's recomputation of the forward states is NOT counted):
  forward  9 N^2:  S*diag(d) N^2, S a 2N^2, (S a) b^T add 2N^2, v k^T add 2N^2, S r 2N^2
  backward 19 N^2: G += dy r^T 2N^2, G k 2N^2, G b 2N^2, G^T v 2N^2, sum S*G 2N^2, S^T (G b) 2N^2,
                   G^T (S a) 2N^2, G diag(d) + (G b) a^T 3N^2, S^T dy 2N^2
  total    28 N^2 * B * T * H
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from peft_rwkv7.ops import available_backends, wkv7

FLOPS_PER_STEP_HEAD = 28  # times N^2, see the module docstring


def inputs(B: int, T: int, H: int, N: int, seed: int = 0) -> list[torch.Tensor]:
    """Realistic fp32 inputs and an initial state (as tests/ops/conftest.py builds them)."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, H, N)
    r, x, k, v, n, z = (torch.randn(shape, generator=g) for _ in range(6))
    w = -F.softplus(-(x - 0.5)) - 0.5
    kk = F.normalize(n, dim=-1)
    return [r * 0.5, w, k * 0.5, v, -kk, kk * torch.sigmoid(z), torch.randn(B, H, N, N, generator=g) * 0.5]


def fwd_bwd_ms(backend: str, xs: list[torch.Tensor], repeats: int) -> float:
    """Best wall time of forward + backward (upstream gradients on y and on the final state).

    The minimum rather than the median: on a shared machine, other work only ever adds time.
    """
    times = []
    for _ in range(repeats + 1):  # the first run warms up (and builds the kernel)
        leaves = [x.clone().requires_grad_() for x in xs]
        t0 = time.perf_counter()
        y, s = wkv7(*leaves[:6], state=leaves[6], backend=backend)
        (y.sum() + s.sum()).backward()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times[1:])


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--H", type=int, default=12)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--reference-repeats", type=int, default=1, help="the plain loop is slow")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    mm = matmul_gflops()
    backends = [b for b in ("reference", "cpu") if b in available_backends("cpu")]
    print(f"WKV7 fwd+bwd, fp32, T={args.T} H={args.H} N={args.N}, {torch.get_num_threads()} threads")
    print(f"torch.mm 1024x1024 fp32: {mm:.1f} GFLOP/s")
    print("(reference = the plain per-step autograd loop, the baseline for the speed-up)")
    for B in args.batches:
        xs = inputs(B, args.T, args.H, args.N)
        flop = FLOPS_PER_STEP_HEAD * args.N**2 * B * args.T * args.H
        ms = {b: fwd_bwd_ms(b, xs, args.reference_repeats if b == "reference" else args.repeats) for b in backends}
        for b, t in ms.items():
            gflops = flop / t / 1e6
            speedup = ms["reference"] / t if "reference" in ms else float("nan")
            print(
                f"B={B:<2d} {b:<10s} {t:9.2f} ms   x{speedup:6.1f} vs plain loop   "
                f"{gflops:6.1f} GFLOP/s = {100 * gflops / mm:5.1f}% of matmul"
            )


if __name__ == "__main__":
    main()
