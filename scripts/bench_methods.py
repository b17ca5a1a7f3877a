"""Trainable parameters, peak memory and training-step time of every PEFT method on CPU.

    python scripts/bench_methods.py [--layers 12 --embd 768 --vocab 65536 --T 512 --steps 2]
    python scripts/bench_methods.py --only lora,lora-nf4

Random weights in the 0.1B World shape by default, one sequence of T tokens, fp32. Each method
runs in its own process so peak RSS (ru_maxrss) is that method's alone; a step is forward +
backward + AdamW, timed after one warm-up step (best of --steps). "end RSS" is the resident
memory after the last step (weights, optimizer state, cached buffers); "quantized" is the weight
memory of the quantized projections (float -> bitsandbytes). The model is built in fp32 before
it is quantized, so peak RSS includes the float projections once.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import psutil
import torch

METHODS = {
    "full": dict(kind="full"),
    "lora": dict(kind="lora"),
    "pissa": dict(kind="pissa"),
    "disha-bone": dict(kind="disha", r=64),
    "disha-bat": dict(kind="disha", disha_mode="bat", r=64),
    "state": dict(kind="state"),
    "state+lora": dict(kind="lora", state=True),
    "lora-nf4": dict(kind="lora", quant="nf4"),
    "lora-int8": dict(kind="lora", quant="int8"),
    "pissa-nf4": dict(kind="pissa", quant="nf4"),
}


def run_one(args, method: dict) -> dict:
    """Build, attach, train a few steps; returns the measurements as a dict."""
    import torch.nn.functional as F

    from peft_rwkv7.adapters import MethodConfig, attach, count_trainable, trainable_parameters
    from peft_rwkv7.model import RWKV7, RWKV7Config

    torch.manual_seed(0)
    cfg = RWKV7Config.new(args.layers, args.embd, args.vocab, head_size=64)
    model = RWKV7(cfg, wkv_backend=args.backend)  # PyTorch's default init: random, nothing zero
    t0 = time.perf_counter()
    adapted = attach(model, MethodConfig(**method))
    attach_s = time.perf_counter() - t0
    params = [p for _, p in trainable_parameters(adapted)]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, args.vocab, (1, args.T + 1), generator=torch.Generator().manual_seed(0))
    adapted.train()
    times = []
    for _ in range(1 + args.steps):
        t = time.perf_counter()
        logits = adapted(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return {
        "trainable": count_trainable(adapted),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "end_rss_mb": psutil.Process().memory_info().rss / 2**20,
        "step_s": min(times[1:]),
        "attach_s": attach_s,
        "quant_mb": [b / 2**20 for b in adapted.quant_bytes],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--backend", default="auto", help="wkv7 backend")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one method's JSON
    args = ap.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(args, json.loads(args.one))), flush=True)
        return

    names = [n for n in args.only.split(",") if n] or list(METHODS)
    common = ["--layers", str(args.layers), "--embd", str(args.embd), "--vocab", str(args.vocab),
              "--T", str(args.T), "--steps", str(args.steps), "--backend", args.backend]  # fmt: skip
    print(f"L{args.layers} C{args.embd} V{args.vocab}, T={args.T}, fp32, wkv backend {args.backend}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    header = (
        f"{'method':<12} {'trainable':>12} {'peak RSS MB':>12} {'end RSS MB':>11} {'step s':>8} {'attach s':>9}"
        "  quantized MB"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        proc = subprocess.run(
            [sys.executable, __file__, *common, "--one", json.dumps(METHODS[name])], capture_output=True, text=True
        )
        line = next((s for s in proc.stdout.splitlines() if s.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{name:<12} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(line[len("RESULT ") :])
        q = "" if not r["quant_mb"][0] else f"{r['quant_mb'][0]:.1f} -> {r['quant_mb'][1]:.1f}"
        cols = f"{r['trainable']:>12,} {r['peak_rss_mb']:>12.0f} {r['end_rss_mb']:>11.0f} {r['step_s']:>8.2f}"
        cols += f" {r['attach_s']:>9.2f}"
        print(f"{name:<12} {cols}  {q}", flush=True)


if __name__ == "__main__":
    main()
