"""Shared by the benchmark scripts: the CPU's name and ISA flags, the 0.1B-shape model with a method
attached, the matmul weights a step multiplies by, and the GEMM rate measured at those shapes."""

from __future__ import annotations

import collections
import time

import torch

SHAPE = dict(n_layer=12, n_embd=768, vocab_size=65536, head_size=64)  # RWKV-7 World 0.1B
LINEARS = ("receptance.weight", "key.weight", "value.weight", "output.weight", "head.weight")
LOW_RANK = ("w1", "w2", "a1", "a2", "g1", "g2", "v1", "v2")


def isa_flags() -> str:
    """'model name; the flags that decide GEMM speed; torch's CPU capability'."""
    try:
        info = open("/proc/cpuinfo").read().splitlines()
        flags = next(ln for ln in info if ln.startswith("flags")).split()
        model = next(ln for ln in info if ln.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return f"torch cpu capability {torch.backends.cpu.get_cpu_capability()}"
    keep = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model}; {' '.join(keep)}; torch {torch.backends.cpu.get_cpu_capability()}"


def method_config(method: str):
    from peft_rwkv7.adapters import MethodConfig

    return {"state": MethodConfig(kind="state"), "lora": MethodConfig(kind="lora", r=16, alpha=32),
            "pissa": MethodConfig(kind="pissa", r=16, alpha=32, svd_niter=2), "full": MethodConfig(kind="full")}[method]


def matmul_weights(model) -> int:
    """Elements of the weights the step multiplies activations by (projections, head, the time-mix low-rank
    maps); not the embedding (a lookup) nor adapter factors."""
    n = 0
    for name, p in model.named_parameters():
        name = name.replace(".base_layer", "")  # peft's wrapped Linear keeps the base weight there
        if "lora_" in name:
            continue
        if name.endswith(LINEARS) or name.split(".")[-1] in LOW_RANK:
            n += p.numel()
    return n


def gemm_rate(model, rows: int, dtype: torch.dtype, weight_grads: bool = False, reps: int = 2) -> float:
    """FLOP/s of the step's big GEMMs (forward x W^T and input gradient g W; with weight_grads also g^T x)
    at this model's weight shapes (each >= 256 on both sides), `rows` rows, best of `reps`, measured now."""
    shapes: collections.Counter = collections.Counter()
    for name, p in model.named_parameters():
        name = name.replace(".base_layer", "")
        if name.endswith(LINEARS) and "lora_" not in name and min(p.shape) >= 256:
            shapes[tuple(p.shape)] += 1
    flop = secs = 0.0
    g = torch.Generator().manual_seed(0)
    for (o, i), count in shapes.items():
        w = torch.randn(o, i, generator=g).to(dtype)
        x, gy = torch.randn(rows, i, generator=g).to(dtype), torch.randn(rows, o, generator=g).to(dtype)
        best = float("inf")
        for _ in range(reps + 1):  # the first call warms up
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            gy @ w
            if weight_grads:
                gy.t() @ x
            best = min(best, time.perf_counter() - t0)
        flop += (6 if weight_grads else 4) * rows * o * i * count
        secs += best * count
    return flop / secs
