"""What `data.group_by_length` saves on real instruction-like data: training steps over the first micro-batches
of an epoch of pad-sampled documents, in the plain order and grouped by length, on the 0.1B shape.

    python scripts/bench_grouping.py [--data ../shared/data/lambada_test.jsonl] [--method state] [--micro-bsz 8]
                                     [--ctx 512] [--steps 8]

One process: the two orders' steps alternate (plain batch i, grouped batch i, ...), so the VM's drift falls on
both. Each step runs as the trainer runs it (train/losses.sequence_loss cuts a batch after its last scored
position). The two orders hold different samples, so compare the rate of useful work: scored tokens per second
(and the positions each ran). Prints the CPU's ISA flags.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(HERE))

import torch  # noqa: E402
from bench_util import SHAPE, isa_flags, method_config  # noqa: E402

from peft_rwkv7.adapters import attach, trainable_parameters  # noqa: E402
from peft_rwkv7.data import DataConfig, make_dataset  # noqa: E402
from peft_rwkv7.data.tokenizer import load_tokenizer  # noqa: E402
from peft_rwkv7.model import RWKV7Config, new_model  # noqa: E402
from peft_rwkv7.train.losses import scored_end, sequence_loss  # noqa: E402
from peft_rwkv7.train.memory import keep_freed_memory  # noqa: E402
from peft_rwkv7.train.optim import build_optimizer  # noqa: E402
from peft_rwkv7.train.recipe import TrainConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/lambada_test.jsonl"))
    ap.add_argument("--method", default="state", choices=["state", "lora", "pissa", "full"])
    ap.add_argument("--micro-bsz", dest="micro_bsz", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    keep_freed_memory()
    tok = load_tokenizer("world")
    orders = {}
    for grouped in (False, True):
        cfg = DataConfig(path=args.data, ctx_len=args.ctx, sampling="pad", group_by_length=grouped, eval_split=0)
        orders["grouped" if grouped else "plain"] = make_dataset(cfg, tok, seed=0, vocab_size=SHAPE["vocab_size"],
                                                                 progress=False)
    torch.manual_seed(0)
    model = new_model(RWKV7Config.new(SHAPE["n_layer"], SHAPE["n_embd"], SHAPE["vocab_size"], SHAPE["head_size"]))
    model = attach(model, method_config(args.method))
    named = trainable_parameters(model)
    for _, p in named:
        p.data = p.data.float()
    opt = build_optimizer(named, TrainConfig(lr=1e-5), torch.device("cpu"))

    def step(x, y) -> float:
        t0 = time.perf_counter()
        sequence_loss(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(*orders["plain"].batch(10_000, 0, args.micro_bsz, 1))  # warm-up: kernel load, allocator
    stats = {k: [0.0, 0, 0] for k in orders}  # seconds, positions run, scored tokens
    for i in range(args.steps):
        for name, data in orders.items():
            x, y = data.batch(i, 0, args.micro_bsz, 1)
            stats[name][0] += step(x, y)
            stats[name][1] += scored_end(y) * x.shape[0]
            stats[name][2] += int((y != -100).sum())
    print(f"CPU: {isa_flags()}; {torch.get_num_threads()} threads")
    print(f"{args.data}: pad sampling, ctx {args.ctx}, micro-batches of {args.micro_bsz}; 0.1B shape, {args.method}, "
          f"fp32; the first {args.steps} steps of an epoch in each order, alternating")
    print("| order | s | positions run | scored tokens | run / scored | scored tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (secs, run, scored) in stats.items():
        print(f"| {name} | {secs:.1f} | {run} | {scored} | {run / scored:.2f} | {scored / secs:.0f} |")
    speed = (stats["grouped"][2] / stats["grouped"][0]) / (stats["plain"][2] / stats["plain"][0])
    print(f"grouped / plain, scored tokens per second: {speed:.2f}x")


if __name__ == "__main__":
    main()
