"""Training throughput on the CPU against the machine's own GEMM bound, measured in the same run.

    python scripts/bench_train.py [--methods state lora pissa full] [--ctx 512 4096] [--precisions fp32 bf16]
                                  [--steps 2] [--src PATH] [--layout packed|sft] [--batch 1] [--isa avx2]

Methods: state, lora (rank 16), pissa, full, and lora<r> for LoRA at another rank (e.g. lora64). For each method,
context length and precision (bf16 only where ops/precision.py measures this CPU's bf16
GEMMs fast; say --precisions bf16 to force it), one process builds the 0.1B shape (L12 C768 V65536,
random weights), attaches the method, and times `--steps` optimizer steps after a warm-up step at batch
`--batch` (1: one row of ctx tokens; the recipes' default micro_bsz is 4), as train/loop.py runs them (bf16:
frozen weights stored bf16, trained tensors fp32, CPU autocast).

GEMM bound: the step's matmul FLOP -- issue 23's rule: 4 per frozen matmul weight per token (forward and input
gradient), 6 per trained one (its gradient too: every weight in full fine-tuning, the adapter factors otherwise;
bench_util.step_flop) -- over the GEMM rate measured in that process, at that precision. "% frozen-only bound"
leaves the adapter factors' FLOP out (the stricter figure rounds 1-34 reported alone; equal for state tuning
and full). The rate: right after each timed step, one pass of the step's big GEMMs (each layer's own weights, in a
step's order, batch x ctx rows; bench_util.GemmPass), about as long as the step's own GEMMs, so
step and pass see the VM at the same speed (it drifts by 10-30% within minutes, and a short best-of-few GEMM
timing catches fast moments no whole step gets). "% bound" = bound time / step time, each step against its
own pass: the (lower) median over the timed steps, their range in brackets; 100% would be a step doing nothing but
its GEMMs. GEMM GFLOP/s: the fastest pass. Peak RSS is the process's (model included).

--layout sft: 4 right-padded rows of instruction data (prompts and padding unscored, see `batch`); tokens/s
counts every position of the batch, padding included, and the bound every position through every matmul.

--src PATH runs the children against another checkout of rwkv-peft (e.g. a `git worktree` of an older
commit), so a before/after table comes from one machine in one sitting. Prints the CPU's ISA flags.

--isa avx2 runs an AVX-512 CPU the way an AVX2-only CPU runs (default precision fp32): the children get the math
libraries' own instruction caps (ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2, ATEN_CPU_CAPABILITY=avx2)
and the CPU kernels built without their AVX-512 clones (-DPEFT_RWKV7_NO_AVX512, a build of its own in the kernel
cache), so every product and kernel of a step takes its AVX2 code. The cores, caches and clock stay this CPU's:
it measures the AVX2 code paths against an AVX2 GEMM bound, not another machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child(args) -> None:
    sys.path.insert(0, str(Path(args.src).resolve()))
    sys.path.insert(1, str(HERE))
    import torch
    from bench_util import SHAPE, GemmPass, method_config, step_flop

    from peft_rwkv7.adapters import attach, trainable_parameters
    from peft_rwkv7.model import RWKV7Config, new_model
    from peft_rwkv7.train.losses import sequence_loss
    from peft_rwkv7.train.optim import build_optimizer
    from peft_rwkv7.train.recipe import TrainConfig

    if args.isa == "avx2":  # before the first op builds or loads the CPU kernels
        from bench_util import avx2_only

        avx2_only()
    bf16 = args.precision == "bf16"
    try:  # as loop.train does where the benchmarked checkout has it (train/memory.py)
        from peft_rwkv7.train.memory import keep_freed_memory
    except ImportError:
        keep_freed_memory = bool
    try:
        from peft_rwkv7.train.memory import CpuBlocks
    except ImportError:
        CpuBlocks = bool
    keep_freed_memory()
    torch.manual_seed(0)
    model = new_model(RWKV7Config.new(SHAPE["n_layer"], SHAPE["n_embd"], SHAPE["vocab_size"], SHAPE["head_size"]))
    adapted = attach(model, method_config(args.method))
    if bf16 and args.method != "full":  # frozen weights stored bf16 as train/loop.py does
        for p in adapted.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    chunks = False
    if bf16 and hasattr(model, "set_bf16_row_chunks"):  # as train/loop.py does: where the bf16 check found them faster
        from peft_rwkv7.ops.precision import cpu_bf16_check

        chunks = cpu_bf16_check().row_chunks
        model.set_bf16_row_chunks(chunks)
    named = trainable_parameters(adapted)
    for _, p in named:
        p.data = p.data.float()
    opt = build_optimizer(named, TrainConfig(lr=1e-5), torch.device("cpu"))  # the trainer's own (src's)
    CpuBlocks(True)  # after the model is built, as loop.train does (one shape every step: it stays)
    x, y = batch(torch, args.layout, args.ctx, SHAPE["vocab_size"], args.batch)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    times, passes = [], []
    full = args.method == "full"
    rows = x.numel() if args.layout == "packed" else args.ctx  # a step's products have batch x ctx rows
    gemms = GemmPass(adapted, rows, torch.bfloat16 if bf16 else torch.float32, weight_grads=full, row_chunks=chunks)

    def step() -> float:  # a function, as the trainer's: the graph is gone before the next forward (tasks.py)
        with amp():
            loss = sequence_loss(adapted, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for i in range(args.steps + 1):  # the first step warms up (kernel load, allocator)
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
        # the step's big GEMMs alone, right after it: the VM's speed drifts, each step against its own pass. Also
        # after the warm-up step, unrecorded: the first pass after a step ran at half speed (bf16 on an AMX Xeon with
        # the CPU block cache installed: 884 against 1800-1900 GFLOP/s), which inflated "% bound" to 69%
        pass_s = gemms.seconds()
        if i:
            passes.append(pass_s)
    step_s = min(times[1:])
    # bound: every position through every matmul at the big GEMMs' speed (their pass covers ctx rows), by the
    # issue's rule (the adapter factors as trained weights) and by the frozen weights alone
    pct = {}
    for key, flop in zip(("bound", "frozen"), step_flop(adapted, x.numel(), full), strict=True):
        paired = sorted(100 * flop * p / gemms.flop / t for p, t in zip(passes, times[1:], strict=True))
        pct[key] = paired[(len(paired) - 1) // 2], [paired[0], paired[-1]]  # the lower median: of two, the lower
    rate = gemms.flop / min(passes)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"tokens_per_s": x.numel() / step_s, "scored": int((y != -100).sum()), "step_s": step_s,
                      "peak_rss_mib": rss, "bound_pct": pct["bound"][0], "bound_range": pct["bound"][1],
                      "frozen_pct": pct["frozen"][0], "frozen_range": pct["frozen"][1], "gemm_gflops": rate / 1e9,
                      "loss": loss, "trainable": sum(p.numel() for _, p in named)}))


def batch(torch, layout: str, ctx: int, vocab: int, rows: int = 1):
    """(inputs, labels): `packed` is `rows` rows of ctx scored tokens (text/binidx windows); `sft` is 4 rows as
    instruction data gives them (data.sampling: pad), each right-padded to ctx: documents of 3/4, 1/2, 3/8
    and 1/4 of ctx, the first 40% of each (the prompt) and the padding labelled -100."""
    g = torch.Generator().manual_seed(0)
    if layout == "packed":
        idx = torch.randint(0, vocab, (rows, ctx + 1), generator=g)
        return idx[:, :-1], idx[:, 1:].clone()
    x = torch.randint(0, vocab, (4, ctx), generator=g)
    y = torch.full((4, ctx), -100, dtype=torch.long)
    for row, share in enumerate((3 / 4, 1 / 2, 3 / 8, 1 / 4)):
        n = int(ctx * share)
        x[row, n:] = 0
        y[row, int(0.4 * n):n] = x[row, int(0.4 * n) + 1:n + 1]  # the last one predicts 0 (World's end of text)
    return x, y


def bf16_fast() -> tuple[bool, str]:
    sys.path.insert(0, str(ROOT))
    try:
        from peft_rwkv7.ops.precision import cpu_bf16_check
    except ImportError:
        return False, "ops.precision not available"
    r = cpu_bf16_check()
    return r.fast, r.summary()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["state", "lora", "pissa", "full"])
    ap.add_argument("--ctx", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layout", default="packed", choices=["packed", "sft"],
                    help="packed: one row of ctx scored tokens; sft: 4 right-padded rows, prompts unscored (see batch)")
    ap.add_argument("--batch", type=int, default=1, help="packed layout: rows of ctx tokens per step (micro_bsz)")
    ap.add_argument("--isa", default="native", choices=["native", "avx2"],
                    help="avx2: the libraries and the CPU kernels on their AVX2 code (see above)")
    ap.add_argument("--src", default=str(ROOT), help="the rwkv-peft checkout to benchmark (default: this one)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="state", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--one-ctx", dest="one_ctx", type=int, default=512, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.ctx = args.one_ctx
        return child(args)
    sys.path.insert(0, str(HERE))
    import torch
    from bench_util import AVX2_CAPS, child_error, isa_flags

    precisions = args.precisions
    env = {**os.environ, **AVX2_CAPS} if args.isa == "avx2" else None
    fast, why = (False, "AVX2 code only: " + " ".join(f"{k}={v}" for k, v in AVX2_CAPS.items())
                 + ", the CPU kernels without their AVX-512 clones") if env else bf16_fast()
    if precisions is None:
        precisions = ["fp32", "bf16"] if fast else ["fp32"]
    print(f"CPU: {isa_flags()}; {torch.get_num_threads()} threads; {why}")
    shape = f"batch {args.batch}"
    if args.layout == "sft":
        shape = "sft layout: 4 right-padded rows, 28% of positions scored"
    print(f"source: {args.src}; 0.1B shape (L12 C768 V65536), {shape}, best of {args.steps} steps after a warm-up")
    print("| method | ctx | precision | tokens/s | step s | % GEMM bound | % frozen-only bound | GEMM GFLOP/s "
          "| peak RSS MiB |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for ctx in args.ctx:
        for method in args.methods:
            for prec in precisions:
                cmd = [sys.executable, __file__, "--child", "--method", method, "--precision", prec,
                       "--one-ctx", str(ctx), "--steps", str(args.steps), "--src", args.src, "--layout", args.layout,
                       "--batch", str(args.batch), "--isa", args.isa]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode:
                    why = child_error(out.stderr)
                    print(f"| {method} | {ctx} | {prec} | failed (exit {out.returncode}): {why} ||||||")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {method} | {ctx} | {prec} | {r['tokens_per_s']:.1f} | {r['step_s']:.2f} | "
                      f"{r['bound_pct']:.0f}% ({r['bound_range'][0]:.0f}-{r['bound_range'][1]:.0f}) | "
                      f"{r['frozen_pct']:.0f}% ({r['frozen_range'][0]:.0f}-{r['frozen_range'][1]:.0f}) | "
                      f"{r['gemm_gflops']:.0f} | {r['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
