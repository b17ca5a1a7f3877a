"""Rollout speed: the batched GRPO sampler against G sequential single-stream generations, same run.

    python scripts/bench_rollout.py [--prompts 4 --prompt-len 64 --G 8 --max-new 64 --dtype fp32 --repeat 2]

Random weights in the RWKV-7 World 0.1B shape (scripts/bench_util.SHAPE). For each of P prompts of
--prompt-len tokens: `sample_groups` with G rows (one prefill per prompt, then all P*G rows as one
batch per model.step) against G calls of `generate` per prompt (each reads the prompt and samples
alone). Both sample at temperature 1, top_p 1, with no stop, so both produce exactly P*G*max_new tokens.
Tokens/s count the generated tokens over the whole wall time (prompt reading included). The two are
interleaved and the best of --repeat runs is kept, so background load hits both alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_util import SHAPE, isa_flags  # noqa: E402

from peft_rwkv7.data import load_tokenizer  # noqa: E402
from peft_rwkv7.infer.generate import generate  # noqa: E402
from peft_rwkv7.infer.sampler import sample_groups  # noqa: E402
from peft_rwkv7.model import RWKV7Config, new_model  # noqa: E402
from tests.conftest import randomize  # noqa: E402

TEXT = (
    "Ship's log, day 7. The wind turned north-east at dawn and rose to a steady twenty knots by noon. We "
    "reefed the mainsail, set the storm jib and held a course of 040 degrees towards the islands. The crew "
    "is tired but in good spirits; the cook found the last crate of oranges under the spare sails. Tomorrow "
    "we expect to sight land if the weather holds, and the barometer has been rising since the morning watch."
)


def make_prompts(tok, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` World tokens: windows of TEXT (repeated) starting at different tokens."""
    ids = tok.encode(TEXT)
    while len(ids) < length + 7 * n:
        ids = ids + ids
    return [ids[7 * i : 7 * i + length] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4, help="P prompts")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--G", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    cfg = RWKV7Config.new(SHAPE["n_layer"], SHAPE["n_embd"], SHAPE["vocab_size"], head_size=SHAPE["head_size"])
    model = randomize(new_model(cfg)).to(device=device, dtype=dtype).eval()
    tok = load_tokenizer("world")
    # the sampler reads exactly the ids `generate` gets from encoding the prompt text
    prompts = [tok.encode(tok.decode(p)) for p in make_prompts(tok, args.prompts, args.prompt_len)]
    texts = [tok.decode(p) for p in prompts]
    gen = torch.Generator(device=device).manual_seed(0)

    def batched(max_new: int) -> tuple[float, int, float, float]:
        t0 = time.perf_counter()
        ro = sample_groups(model, prompts, args.G, max_new, 1.0, 1.0, gen, stop_token_ids=())
        return time.perf_counter() - t0, ro.tokens, ro.prefill_seconds, ro.sample_seconds

    def sequential(max_new: int) -> tuple[float, int]:
        t0, n = time.perf_counter(), 0
        for text in texts:
            for seed in range(args.G):
                for _ in generate(model, tok, text, max_new, 1.0, 1.0, seed=seed, stop_at_eot=False):
                    pass
                n += max_new  # without a stop generate samples exactly max_new tokens
        return time.perf_counter() - t0, n

    batched(2), sequential(2)  # warm-up: kernels loaded, first-call allocations made
    best_b, best_s = (float("inf"), 0, 0.0, 0.0), (float("inf"), 0)
    for _ in range(args.repeat):
        best_b = min(best_b, batched(args.max_new))
        best_s = min(best_s, sequential(args.max_new))
    (tb, nb, pre, samp), (ts, ns) = best_b, best_s
    rate_b, rate_s = nb / tb, ns / ts
    print(f"cpu: {isa_flags()}; torch threads {torch.get_num_threads()}; device {device}; {args.dtype}")
    print(f"0.1B shape L{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size}, random weights; P={args.prompts} prompts "
          f"of {len(prompts[0])} tokens, G={args.G}, max_new={args.max_new}, temperature 1, no stop; "
          f"best of {args.repeat}")
    print(f"batched sample_groups : {nb} tokens in {tb:.2f} s = {rate_b:.1f} tok/s "
          f"(prefill {pre:.2f} s, step loop {samp:.2f} s)")
    print(f"sequential generate x{args.G}: {ns} tokens in {ts:.2f} s = {rate_s:.1f} tok/s")
    print(f"ratio batched / sequential: {rate_b / rate_s:.2f}x")


if __name__ == "__main__":
    main()
