"""CPU speed of our RWKV-7 against the `rwkv` pip package on the same checkpoint, same run.

    python scripts/bench_model.py [--layers 12 --embd 768 --vocab 65536 --T 512 --gen 64]

Prints forward tokens/s at T (one sequence, fp32) and RNN-step generation tokens/s for both,
with the ratio ours / rwkv. Random weights in the 0.1B World shape by default.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peft_rwkv7.model import RWKV7Config, load_model, new_model, save_model  # noqa: E402
from tests.conftest import randomize  # noqa: E402


def best_of_interleaved(fns, repeat: int) -> list[float]:
    """Best time of each function, alternating them so background load hits both alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64, help="tokens generated in RNN mode")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", default="auto", help="our wkv7 backend")
    args = ap.parse_args()

    os.environ["RWKV_V7_ON"] = "1"  # the rwkv package reads this at import
    from rwkv.model import RWKV

    cfg = RWKV7Config.new(args.layers, args.embd, args.vocab, head_size=64)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.pth"
        save_model(randomize(new_model(cfg)), path, dtype=torch.bfloat16)
        ours = load_model(path, dtype=torch.float32, wkv_backend=args.backend).eval()
        theirs = RWKV(model=str(path)[:-4], strategy="cpu fp32")
    tokens = torch.randint(0, args.vocab, (args.T,), generator=torch.Generator().manual_seed(0))
    idx = tokens[None]

    with torch.no_grad():
        ours(idx[:, :8])
        theirs.forward(tokens[:8].tolist(), None)
        t_ours, t_theirs = best_of_interleaved(
            [lambda: ours(idx), lambda: theirs.forward(tokens.tolist(), None, full_output=True)], args.repeat
        )

        def gen_ours():
            state = None
            tok = tokens[:1]
            for _ in range(args.gen):
                logits, state = ours.step(tok, state)
                tok = logits.argmax(-1)

        def gen_theirs():
            state = None
            tok = int(tokens[0])
            for _ in range(args.gen):
                logits, state = theirs.forward([tok], state)
                tok = int(logits.argmax())

        g_ours, g_theirs = best_of_interleaved([gen_ours, gen_theirs], args.repeat)

    print(f"shape L{args.layers} C{args.embd} V{args.vocab}, threads {torch.get_num_threads()}, backend {args.backend}")
    print(f"{'':24}{'ours':>12}{'rwkv pkg':>12}{'ratio':>8}")
    print(f"{'forward T=' + str(args.T) + ' tok/s':24}{args.T / t_ours:12.1f}{args.T / t_theirs:12.1f}"
          f"{t_theirs / t_ours:8.2f}x")
    print(f"{'RNN step tok/s':24}{args.gen / g_ours:12.1f}{args.gen / g_theirs:12.1f}{g_theirs / g_ours:8.2f}x")


if __name__ == "__main__":
    main()
