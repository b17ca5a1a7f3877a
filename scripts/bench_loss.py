"""The head + cross-entropy of a 0.1B-shape model (C 768, V 65536), plain (all logits materialised) against
the fused chunked op (ops.linear_ce), forward + backward for h (frozen head, as state tuning and LoRA
train), measured in the same run: time and peak memory of the loss alone.

    python scripts/bench_loss.py [--ctx 512 4096] [--dtype fp32 bf16]

Each case runs in its own process: peak memory is the process's peak RSS during the first loss over its
RSS just before (inputs and weights already allocated), i.e. what the loss itself adds.
Prints the CPU's ISA flags beside the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import isa_flags  # noqa: E402

from peft_rwkv7.ops.linear_ce import linear_cross_entropy  # noqa: E402


def plain(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, reduction="none")


def fused(h, w, y):
    return linear_cross_entropy(h, w, y)


def _status_kib(field: str) -> int:
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith(field)).split()[1])


def _reset_peak() -> None:
    """VmHWM := the current RSS (Linux: writing 5 to /proc/self/clear_refs); where that is refused the peak
    keeps earlier allocations and the figure is an upper bound."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child(fn_name: str, T: int, dt: str) -> None:
    """One case in a fresh process: the loss's peak memory (VmHWM over the RSS before it) then its time."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(65536, 768, generator=g) * 0.02).to(torch.bfloat16 if dt == "bf16" else torch.float32)
    h = torch.randn(T, 768, generator=g).requires_grad_()
    y = torch.randint(0, 65536, (T,), generator=g)
    fn = {"plain": plain, "fused": fused}[fn_name]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dt == "bf16" else torch.autocast("cpu", enabled=False)
    _reset_peak()  # making w above (randn, then scaled) peaked at twice its size: not the loss's
    base = _status_kib("VmRSS:")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with ctx:
            loss = fn(h, w, y).sum()
        loss.backward()
        times.append(time.perf_counter() - t0)
        h.grad = None
        if len(times) == 1:
            peak = (_status_kib("VmHWM:") - base) / 1024
    print(json.dumps({"s": min(times[1:]), "mib": peak}))


def run(fn_name, T, dt):
    out = subprocess.run([sys.executable, __file__, "--child", fn_name, str(T), dt], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{fn_name} ctx {T} {dt} failed: {out.stderr.strip().splitlines()[-1:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["s"], r["mib"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args.child[2])
    print(f"CPU: {isa_flags()}; threads {torch.get_num_threads()}")
    print(f"{'ctx':>6}{'dtype':>6}{'plain s':>9}{'fused s':>9}{'speed-up':>9}{'plain MiB':>11}{'fused MiB':>11}")
    for dt in args.dtype:
        for T in args.ctx:
            tp, mp = run("plain", T, dt)
            tf, mf = run("fused", T, dt)
            print(f"{T:>6}{dt:>6}{tp:>9.3f}{tf:>9.3f}{tp / tf:>8.2f}x{mp:>11.0f}{mf:>11.0f}")


if __name__ == "__main__":
    main()
