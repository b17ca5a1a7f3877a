"""Shared by the benchmark scripts: the CPU's name and ISA flags, the 0.1B-shape model with a method
attached, the matmul weights a step multiplies by, and the GEMM rate measured at those shapes."""

from __future__ import annotations

import os
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


# --isa avx2 (bench_train.py, profile_train.py): the math libraries' documented instruction caps that make them run
# AVX2 code, set before torch loads (ops/precision.py keys its checks' cache on the same names)
AVX2_CAPS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def avx2_only() -> None:
    """This process runs the AVX2 code an AVX2-only CPU runs: the CPU kernels built without their AVX-512 clones
    (-DPEFT_RWKV7_NO_AVX512, a build of its own in the kernel cache), before the first op builds or loads them.
    The libraries' caps (AVX2_CAPS) must have been in the environment when torch loaded."""
    from peft_rwkv7.ops import cpu

    missing = [k for k, v in AVX2_CAPS.items() if os.environ.get(k) != v]
    assert not missing and torch.backends.cpu.get_cpu_capability() == "AVX2", f"AVX2 caps not in force: {missing}"
    flag_sets = cpu._build_flags()
    cpu._build_flags = lambda: [{**f, "extra_cflags": [*f["extra_cflags"], "-DPEFT_RWKV7_NO_AVX512"]}
                                for f in flag_sets]


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
    """state, lora (rank 16), pissa, full; lora<r> (e.g. lora64): LoRA at rank r, alpha 2r."""
    from peft_rwkv7.adapters import MethodConfig

    if method.startswith("lora") and method[4:].isdigit():
        return MethodConfig(kind="lora", r=int(method[4:]), alpha=2 * int(method[4:]))
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


def factor_weights(model) -> int:
    """Elements of the trained adapter factors the step multiplies activations by (LoRA's and PiSSA's A and B)."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name and p.requires_grad)


def step_flop(model, tokens: int, full: bool) -> tuple[int, int]:
    """A step's matmul FLOP over `tokens` positions, (by issue 23's rule, by the frozen weights alone). The rule: 4
    FLOP per frozen matmul weight per token (forward and input gradient), 6 per trained one (its own gradient
    too): every weight in full fine-tuning, the adapter factors otherwise -- LoRA r16's six thin products per
    adapted matrix, 6 r (in + out) FLOP a token, 2.8% over the 0.1B model's frozen count. The second count
    leaves the factors out: the stricter bound `bench_train.py` reported alone in rounds 1-34."""
    frozen = (6 if full else 4) * matmul_weights(model) * tokens
    return frozen + 6 * factor_weights(model) * tokens, frozen


def big_weights(model) -> list:
    """[(weight, whether it is the head)] for each of the model's big matmul weights (each side >= 256), in the
    model's order: the GEMMs a bound is timed on."""
    found = []
    for name, p in model.named_parameters():
        name = name.replace(".base_layer", "")  # peft's wrapped Linear keeps the base weight there
        if name.endswith(LINEARS) and "lora_" not in name and min(p.shape) >= 256:
            found.append((p, name.endswith("head.weight")))
    return found


HEAD_CHUNK_ELEMENTS = 1 << 25  # the fused loss's logits per chunk (ops/linear_ce.CHUNK_ELEMENTS): 512 rows at V 65536
HEAD_VOCAB_BLOCK = 2048  # its online path's columns per block (ops/linear_ce.VOCAB_BLOCK): CPU fp32, frozen head


class GemmPass:
    """The step's big GEMMs run once each, in a row, as a step runs them: forward x W^T and input gradient
    g W (with weight_grads also g^T x) for each of the model's own weights, the forward's layer by layer, then
    the fused loss's head, then the backward's from the last layer down. The vocabulary-wide head runs in the
    fused loss's chunks of rows, and in fp32 with a frozen head in its online path's blocks of
    HEAD_VOCAB_BLOCK vocabulary columns. `seconds()` times one pass, about as long as the step's own GEMMs, so
    a pass right after a step sees the machine as the step did (a short best-of-few GEMM catches a VM's fast
    moments that a whole step does not).

    A layer's GEMMs multiply by that layer's weights, read from memory as a step reads them. Until round 16
    one weight per shape stood for all of its layers, called over and over while it stayed in the core's
    L2: a rate no step can get. On an AMX Xeon, bf16 ran at 2000-2130 GFLOP/s that way and 1840-1880 with
    each layer's own weights; fp32 2-4% faster that way (state tuning's pass 310-314 against 305-309, full
    fine-tuning's with the weight gradients 287-291 against 267-284, after a first pass).

    It holds no memory of its own between passes: the weights are the model's, and the inputs are made
    before each pass's clock starts, in the memory the step has just freed (train/memory.py keeps it), so a
    benchmark's peak RSS is the training's (at ctx 4096 whole-ctx head buffers and a copy of each weight had
    added ~2.5 GB to it)."""

    def __init__(self, model, rows: int, dtype: torch.dtype, weight_grads: bool = False,
                 row_chunks: bool = False) -> None:
        self.weight_grads, self.dtype = weight_grads, dtype
        self.row_chunks = row_chunks  # the layers' products in ops.rowsplit's row chunks, as the model makes them
        self.work = []  # (weight, rows per GEMM, GEMMs per pass, output columns per GEMM, whether the head)
        self.flop = 0
        online = dtype == torch.float32 and not weight_grads  # the fused loss's online path (ops/linear_ce.py)
        for w, head in big_weights(model):
            o, i = w.shape
            chunk = min(rows, max(1, HEAD_CHUNK_ELEMENTS // o)) if head else rows  # the fused loss's chunks
            n_chunks = -(-rows // chunk)
            cols = min(o, HEAD_VOCAB_BLOCK) if head and online else o
            self.work.append((w.detach(), chunk, n_chunks, cols, head))
            self.flop += (6 if weight_grads else 4) * chunk * n_chunks * o * i
        self.seconds()  # warm-up

    def seconds(self) -> float:
        size = max(r * max(w.shape) for w, r, *_ in self.work)
        buf = torch.full((size,), 0.01, dtype=self.dtype)  # inputs only: x and the output gradient share it
        layers, head = [], []
        for w, r, n, cols, is_head in self.work:
            w = w.to(self.dtype)
            x = buf[: r * w.shape[1]].view(r, -1)
            blocks = [(blk, buf[: r * blk.shape[0]].view(r, -1)) for blk in w.split(cols)]
            (head if is_head else layers).append((x, blocks, n))
        if self.row_chunks:  # (a checkout before ops/rowsplit.py never asks for them)
            from peft_rwkv7.ops.rowsplit import mm_rows, row_chunks
        else:
            def mm_rows(a, b, n):
                return a @ b

            def row_chunks(rows, w):
                return 1
        t0 = time.perf_counter()
        for x, blocks, _ in layers:  # forward, layer by layer
            for w, _ in blocks:
                mm_rows(x, w.t(), row_chunks(x.shape[0], w))
        for x, blocks, count in head:  # the fused loss: logits and dnll/dh block by block, in its forward
            for _ in range(count):
                for w, gy in blocks:
                    torch.nn.functional.linear(x, w)
                    gy @ w
                    if self.weight_grads:
                        gy.t() @ x
        for x, blocks, _ in reversed(layers):  # backward, the last layer first
            for w, gy in blocks:
                mm_rows(gy, w, row_chunks(gy.shape[0], w))
                if self.weight_grads:
                    gy.t() @ x
        return time.perf_counter() - t0
