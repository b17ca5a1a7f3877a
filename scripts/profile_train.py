"""Where a training step's time goes: one 0.1B-shape step (random weights) under torch.profiler, per op
and per kind of work (GEMM, WKV kernel, elementwise, ...), with the GEMM bound measured in the same run.

    python scripts/profile_train.py [--method state|lora] [--ctx 512] [--precision fp32|bf16] [--top 25]
                                    [--isa avx2]

--isa avx2: the AVX2 code an AVX2-only CPU runs, on this one (bench_train.py's docstring says how).

GEMM bound (issue 23's rule, bench_util.step_flop): the frozen matmul weights do 4 FLOP per weight per token (2
forward, 2 for the input gradient), trained ones 6 (their gradient too: the adapter factors, every weight in
full fine-tuning); "frozen-only" leaves the adapter factors out. The step's GEMM FLOP over the GEMM rate
measured here at the model's shapes (one pass of the step's big GEMMs right after the timed step,
bench_util.GemmPass) is the step time a machine doing nothing but those GEMMs would take.
Prints the CPU's ISA flags beside the figures.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_util import AVX2_CAPS, GemmPass, avx2_only, isa_flags, method_config, step_flop  # noqa: E402

from peft_rwkv7.adapters import attach, trainable_parameters  # noqa: E402
from peft_rwkv7.model import RWKV7Config, new_model  # noqa: E402
from peft_rwkv7.train.losses import sequence_loss  # noqa: E402
from peft_rwkv7.train.memory import CpuBlocks, keep_freed_memory  # noqa: E402
from peft_rwkv7.train.optim import build_optimizer  # noqa: E402
from peft_rwkv7.train.recipe import TrainConfig  # noqa: E402

KINDS = [  # (kind, substrings of aten op names), first match wins
    ("GEMM", ("mm", "linear", "matmul", "bmm", "addmm")),
    ("WKV kernel", ("wkv",)),
    ("cross-entropy", ("logsumexp", "softmax", "nll", "gather", "index_put", "cross_entropy")),
    ("norm", ("layer_norm", "group_norm", "norm")),
    ("copy/cast", ("copy_", "to", "_to_copy", "clone", "contiguous", "cat", "fill_", "zero_", "empty")),
    ("elementwise", ("add", "mul", "sub", "div", "exp", "sigmoid", "tanh", "softplus", "relu", "pow", "addcmul",
                     "neg", "sum", "where", "clamp", "sqrt", "rsqrt", "lerp", "maximum", "threshold")),
]


def kind_of(name: str) -> str:
    base = name.split("::")[-1]
    for kind, keys in KINDS:
        if any(k == base or base.startswith(k) or base.endswith(k) for k in keys):
            return kind
    return "other"


def build(method: str, layers: int, embd: int):
    torch.manual_seed(0)
    return attach(new_model(RWKV7Config.new(layers, embd, 65536, head_size=64)), method_config(method))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="state", choices=["state", "lora", "pissa", "full"])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--isa", default="native", choices=["native", "avx2"])
    args = ap.parse_args()
    if args.isa == "avx2":
        if any(os.environ.get(k) != v for k, v in AVX2_CAPS.items()):  # the caps act only before torch loads
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_CAPS})
        avx2_only()
    bf16 = args.precision == "bf16"
    keep_freed_memory()  # as train/loop.py does
    model = build(args.method, args.layers, args.embd)
    if bf16 and args.method != "full":  # frozen tensors stored bf16, trained ones fp32, as train/loop.py does
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    chunks = False
    if bf16:  # as train/loop.py does: products in row chunks where the bf16 check found them faster
        from peft_rwkv7.ops.precision import cpu_bf16_check

        chunks = cpu_bf16_check().row_chunks
        for m in model.modules():  # the RWKV7 inside the adapted model
            if hasattr(m, "set_bf16_row_chunks"):
                m.set_bf16_row_chunks(chunks)
    named = trainable_parameters(model)
    opt = build_optimizer(named, TrainConfig(lr=1e-5), torch.device("cpu"))  # the trainer's own
    CpuBlocks(True)  # after the model is built, as train/loop.py does (one shape every step: it stays)
    idx = torch.randint(0, 65536, (1, args.ctx + 1), generator=torch.Generator().manual_seed(0))
    x, y = idx[:, :-1], idx[:, 1:]
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step():
        with amp():
            loss = sequence_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    full = args.method == "full"
    gemms = GemmPass(model, args.ctx, torch.bfloat16 if bf16 else torch.float32, weight_grads=full, row_chunks=chunks)
    step()  # warm-up: kernel load, allocator
    gemms.seconds()  # and the pass's own: its first run after a step ran at half speed (bf16, block cache on)
    t0 = time.perf_counter()
    step()
    wall = time.perf_counter() - t0
    gemm_s = gemms.seconds()  # the step's big GEMMs alone, right after it (bench_util.GemmPass)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    total = sum(r[1] for r in rows)
    by_kind = collections.Counter()
    for name, secs, _ in rows:
        by_kind[kind_of(name)] += secs
    rate = gemms.flop / gemm_s
    flop, frozen = step_flop(model, args.ctx, full)
    bound = flop / rate
    print(f"CPU: {isa_flags()}; threads {torch.get_num_threads()}"
          + ("; AVX2 code only (--isa avx2)" if args.isa == "avx2" else ""))
    print(f"{args.method}, ctx {args.ctx}, {args.precision}: step {wall:.2f} s ({args.ctx / wall:.1f} tok/s); "
          f"GEMM bound {bound:.2f} s at {rate / 1e9:.0f} GFLOP/s ({args.ctx / bound:.1f} tok/s): "
          f"{100 * bound / wall:.0f}% of the bound ({100 * frozen / rate / wall:.0f}% of the frozen-only bound)")
    print("\n| kind | self CPU s | share |\n| --- | ---: | ---: |")
    for kind, secs in by_kind.most_common():
        print(f"| {kind} | {secs:.3f} | {100 * secs / total:.1f}% |")
    print("\n| op | kind | calls | self CPU s | share |\n| --- | --- | ---: | ---: | ---: |")
    for name, secs, count in sorted(rows, key=lambda r: -r[1])[: args.top]:
        print(f"| {name} | {kind_of(name)} | {count} | {secs:.3f} | {100 * secs / total:.1f}% |")


if __name__ == "__main__":
    main()
