"""Training throughput and memory on CPU: state tuning and LoRA on the 0.1B shape (random weights),
with the fused CPU WKV kernel and with the pure-PyTorch reference op, measured in the same run.

    python scripts/bench_train.py [--ctx 512 --steps 3 --layers 12 --embd 768]

Each (method, backend) runs in its own process so peak RSS is its own. Prints tokens/s, peak RSS
and the fused/reference speed ratio per method.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from peft_rwkv7.adapters import MethodConfig, attach, trainable_parameters
    from peft_rwkv7.model import RWKV7Config, new_model
    from peft_rwkv7.train.loop import param_groups, sequence_loss

    torch.manual_seed(0)
    cfg = RWKV7Config.new(args.layers, args.embd, 65536, head_size=64)
    model = new_model(cfg, wkv_backend=args.backend)
    method = MethodConfig(kind="state") if args.method == "state" else MethodConfig(kind="lora", r=16, alpha=32)
    adapted = attach(model, method)
    named = trainable_parameters(adapted)
    opt = torch.optim.AdamW(param_groups(named, 0.0), lr=1e-4)
    idx = torch.randint(0, 65536, (1, args.ctx + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    times = []
    for _ in range(args.steps + 1):  # the first step warms up (kernel load, allocator)
        t0 = time.perf_counter()
        sequence_loss(adapted, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_s = min(times[1:])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"tokens_per_s": args.ctx / step_s, "step_s": step_s, "peak_rss_mib": rss,
                      "trainable": sum(p.numel() for _, p in named)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="state")
    ap.add_argument("--backend", default="cpu")
    args = ap.parse_args()
    if args.child:
        return child(args)
    rows = {}
    for method in ("state", "lora"):
        for backend in ("cpu", "reference"):
            cmd = [sys.executable, __file__, "--child", "--method", method, "--backend", backend,
                   "--ctx", str(args.ctx), "--steps", str(args.steps), "--layers", str(args.layers),
                   "--embd", str(args.embd)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{method}/{backend} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            rows[method, backend] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"0.1B shape (L{args.layers} C{args.embd} V65536), ctx {args.ctx}, batch 1, fp32, CPU")
    print(f"{'method':8}{'backend':>11}{'trainable':>12}{'tok/s':>9}{'step s':>9}{'peak RSS MiB':>14}")
    for (method, backend), r in rows.items():
        print(f"{method:8}{backend:>11}{r['trainable']:>12,}{r['tokens_per_s']:>9.1f}{r['step_s']:>9.2f}"
              f"{r['peak_rss_mib']:>14.0f}")
    for method in ("state", "lora"):
        if (method, "cpu") in rows and (method, "reference") in rows:
            ratio = rows[method, "cpu"]["tokens_per_s"] / rows[method, "reference"]["tokens_per_s"]
            print(f"{method}: fused CPU kernel {ratio:.2f}x the reference op")


if __name__ == "__main__":
    main()
