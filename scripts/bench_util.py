"""Shared by the benchmark scripts: the CPU's name and ISA flags, the 0.1B-shape model with a method
attached, the matmul weights a step multiplies by, and the GEMM rate measured at those shapes."""

from __future__ import annotations

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


def child_error(stderr: str) -> str:
    """The line of a failed child's stderr that says what went wrong: a Python exception's last line, or for a
    C++ abort (terminate, c10's asserts) its `what():` line, not the last line of the native backtrace."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    what = [ln for ln in lines if ln.startswith("what():") or "terminate called" in ln]
    if what:
        return " ".join(what)[:300]
    plain = [ln for ln in lines if not ln.startswith(("frame #", "<omitting", "Exception raised from"))]
    return (plain or lines or ["no output"])[-1][:300]


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


def big_weights(model) -> dict:
    """{(out, in): (one weight of that shape, how many the model has, whether it is the head)} for the model's
    big matmul weights (each side >= 256): the GEMMs a bound is timed on."""
    found: dict = {}
    for name, p in model.named_parameters():
        name = name.replace(".base_layer", "")  # peft's wrapped Linear keeps the base weight there
        if name.endswith(LINEARS) and "lora_" not in name and min(p.shape) >= 256:
            w, count, head = found.get(tuple(p.shape), (p, 0, False))
            found[tuple(p.shape)] = (w, count + 1, head or name.endswith("head.weight"))
    return found


HEAD_CHUNK_ELEMENTS = 1 << 25  # the fused loss's logits per chunk (ops/linear_ce.CHUNK_ELEMENTS): 512 rows at V 65536
HEAD_VOCAB_BLOCK = 2048  # its online path's columns per block (ops/linear_ce.VOCAB_BLOCK): CPU fp32, frozen head


class GemmPass:
    """The step's big GEMMs run once each, in a row, as a step runs them (forward x W^T and input gradient
    g W, with weight_grads also g^T x; each shape as often as the model has it; the vocabulary-wide head in
    the fused loss's chunks of rows, and in fp32 with a frozen head in its online path's blocks of
    HEAD_VOCAB_BLOCK vocabulary columns): `seconds()` times one pass, about as long as the step's own GEMMs, so a
    pass right after a step sees the machine as the step did (a short best-of-few GEMM catches a VM's fast
    moments that a whole step does not).

    It holds no memory of its own between passes: the weights are the model's (one per shape), and the
    inputs are made before each pass's clock starts, in the memory the step has just freed (train/memory.py
    keeps it), so a benchmark's peak RSS is the training's (at ctx 4096 whole-ctx head buffers and a copy of
    each weight had added ~2.5 GB to it)."""

    def __init__(self, model, rows: int, dtype: torch.dtype, weight_grads: bool = False) -> None:
        self.weight_grads, self.dtype = weight_grads, dtype
        self.work = []  # (weight, rows per GEMM, GEMMs per pass, output columns per GEMM)
        self.flop = 0
        online = dtype == torch.float32 and not weight_grads  # the fused loss's online path (ops/linear_ce.py)
        for (o, i), (w, count, head) in big_weights(model).items():
            chunk = min(rows, max(1, HEAD_CHUNK_ELEMENTS // o)) if head else rows  # the fused loss's chunks
            n_chunks = -(-rows // chunk)
            cols = min(o, HEAD_VOCAB_BLOCK) if head and online else o
            self.work.append((w.detach(), chunk, count * n_chunks, cols))
            self.flop += (6 if weight_grads else 4) * chunk * n_chunks * o * i * count
        self.seconds()  # warm-up

    def seconds(self) -> float:
        size = max(r * max(w.shape) for w, r, _, _ in self.work)
        buf = torch.full((size,), 0.01, dtype=self.dtype)  # inputs only: x and the output gradient share it
        work = []
        for w, r, n, cols in self.work:
            w = w.to(self.dtype)
            x = buf[: r * w.shape[1]].view(r, -1)
            blocks = [(blk, buf[: r * blk.shape[0]].view(r, -1)) for blk in w.split(cols)]
            work.append((x, blocks, n))
        t0 = time.perf_counter()
        for x, blocks, count in work:
            for _ in range(count):
                for w, gy in blocks:
                    torch.nn.functional.linear(x, w)
                    gy @ w
                    if self.weight_grads:
                        gy.t() @ x
        return time.perf_counter() - t0
