"""Long-context evaluation costs: peak memory of `eval --ctx-curve` against context length, and the
speed of lm-eval loglikelihood requests with and without reuse of a shared context's RNN state.

    python scripts/bench_longctx.py memory [--ctx 4096 32768] [--layers 12 --embd 768]
    python scripts/bench_longctx.py reuse [--docs 40 --choices 4] [--model data/demo/rwkv7-demo.pth]

memory: each context length runs in its own process (ru_maxrss is that run's alone) on the 0.1B shape
(12 x 768, vocab 65536, head size 64) with random weights in fp32, one document of that many random
tokens, the default chunk length. Prints the peak RSS during the evaluation (sampled every 5 ms), the
RSS before it (model loaded) and the growth above that, with ratios to the first length's.
reuse: LAMBADA-like requests from ../shared/data/lambada_test.jsonl: per document the context (text up
to the last space) with `--choices` continuations (its own last word and the last words of the next
documents, as a multiple-choice task asks), and the plain LAMBADA case (one continuation per context).
Prints requests/s with reuse_state on and off, interleaved best of `--repeat`, and the ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAMBADA = ROOT.parent / "shared/data/lambada_test.jsonl"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_child(ctx: int, layers: int, embd: int) -> None:
    import psutil

    from peft_rwkv7.infer.longctx import ctx_curve
    from peft_rwkv7.model.config import RWKV7Config
    from peft_rwkv7.model.io import new_model

    model = new_model(RWKV7Config.new(layers, embd, 65536, 64)).eval()
    doc = torch.randint(1, 65536, (ctx,), generator=torch.Generator().manual_seed(0)).tolist()
    gc.collect()
    proc = psutil.Process()
    loaded = proc.memory_info().rss / 2**20
    peak, done = [loaded], threading.Event()

    def sample() -> None:  # ru_maxrss would report model construction's own peak, not the evaluation's
        while not done.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss / 2**20)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    res = ctx_curve(model, [doc], max_ctx=ctx, progress=False)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    print(json.dumps({"ctx": ctx, "peak_rss_mb": peak[0], "loaded_rss_mb": loaded, "process_max_rss_mb": rss_mb(),
                      "loss": res["loss"], "tokens": res["tokens"], "seconds": seconds}))


def memory(args) -> None:
    rows = []
    for ctx in args.ctx:
        out = subprocess.run([sys.executable, __file__, "memory-child", str(ctx), str(args.layers), str(args.embd)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print(f"\n{'ctx':>7} {'peak RSS MB':>12} {'x first':>8} {'growth MB':>14} {'x first':>8} {'s':>7}")
    for r in rows:
        above, above0 = r["peak_rss_mb"] - r["loaded_rss_mb"], base["peak_rss_mb"] - base["loaded_rss_mb"]
        print(f"{r['ctx']:>7} {r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] / base['peak_rss_mb']:>8.3f} "
              f"{above:>14.0f} {above / max(above0, 1e-9):>8.3f} {r['seconds']:>7.1f}")


class _Req:
    def __init__(self, *args: str):
        self.args = args


def lambada_requests(n: int, choices: int) -> list[_Req]:
    texts = [json.loads(line)["text"] for line in LAMBADA.read_text().splitlines()[: n + choices]]
    split = [(t[: t.rfind(" ")], t[t.rfind(" "):]) for t in texts]
    return [_Req(split[i][0], split[(i + j) % len(split)][1]) for i in range(n) for j in range(choices)]


def reuse(args) -> None:
    from peft_rwkv7 import load_tokenizer
    from peft_rwkv7.integrations.lm_eval import RWKVPeftLM
    from peft_rwkv7.model.config import RWKV7Config
    from peft_rwkv7.model.io import load_model, new_model

    if not LAMBADA.exists():
        sys.exit(f"{LAMBADA}: not found (the LAMBADA test jsonl)")
    if args.model:
        model, label = load_model(args.model, dtype=torch.float32).eval(), args.model
    else:
        model, label = new_model(RWKV7Config.new(args.layers, args.embd, 65536, 64)).eval(), "0.1B shape, random"
    tok = load_tokenizer("world")
    lms = {on: RWKVPeftLM(model, tokenizer=tok, reuse_state=on) for on in (True, False)}
    print(f"model: {label}; {args.docs} LAMBADA contexts")
    for choices in sorted({1, args.choices}):
        reqs = lambada_requests(args.docs, choices)
        lms[True].loglikelihood(reqs[:choices], disable_tqdm=True)  # warm-up (kernel check, allocator)
        best = {True: float("inf"), False: float("inf")}
        results = {}
        for _ in range(args.repeat):
            for on in (True, False):
                t0 = time.perf_counter()
                results[on] = lms[on].loglikelihood(reqs, disable_tqdm=True)
                best[on] = min(best[on], time.perf_counter() - t0)
        diff = max(abs(a[0] - b[0]) for a, b in zip(results[True], results[False]))
        same = all(a[1] == b[1] for a, b in zip(results[True], results[False]))
        print(f"{choices} continuation(s) per context, {len(reqs)} requests: reuse {len(reqs) / best[True]:.1f} req/s, "
              f"no reuse {len(reqs) / best[False]:.1f} req/s, ratio {best[False] / best[True]:.2f}x "
              f"(log-probs max |diff| {diff:.1e}, greedy flags {'equal' if same else 'DIFFER'})")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "memory-child":
        memory_child(*map(int, sys.argv[2:5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--ctx", type=int, nargs="+", default=[4096, 32768])
    r = sub.add_parser("reuse")
    r.add_argument("--docs", type=int, default=40)
    r.add_argument("--choices", type=int, default=4)
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("--model", default=None, help="a model file (default: the 0.1B shape with random weights)")
    for p in (m, r):
        p.add_argument("--layers", type=int, default=12)
        p.add_argument("--embd", type=int, default=768)
    args = ap.parse_args()
    memory(args) if args.what == "memory" else reuse(args)


if __name__ == "__main__":
    main()
