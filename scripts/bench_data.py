"""Benchmark `data build` (build_binidx) against a single-process pure-Python trie baseline.

    python scripts/bench_data.py [--mb 50] [--baseline-mb 2] [--workers N] [--keep DIR]

Generates a jsonl of about --mb MB (English-like words, CJK, emoji, code with tabs, CRLF), builds
it with `build_binidx` (pyrwkv-tokenizer on all cores) and times the `rwkv` package's pure-Python
TRIE_TOKENIZER doing the same job (json.loads + encode + end-of-text per line) on the first
--baseline-mb MB in one process; that rate is extrapolated per MB. Prints both rates and the ratio.
Also checks that the binidx tokens of the baseline subset equal the trie's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from peft_rwkv7.data import MMapIndexedDataset, build_binidx
from peft_rwkv7.data.build import default_workers

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which "
         "but have an they you were her she there been one all we their has would when if so no will "
         "model token state learning rate gradient adapter training data sequence language time").split()
CJK = (0x4E00, 0x9FA5)  # CJK Unified Ideographs
EMOJI = "😀😂🥲👍🏽🎉🚀🔥💡🧠❤️‍🔥👩‍💻🇯🇵"
CODE = 'def f(x):\n\tif x > 0:\n\t\treturn {"a": [1, 2, 3]}\r\n\treturn None  # comment\n'


def make_doc(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(5, 60)):
        r = rng.random()
        if r < 0.70:
            parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + ".")
        elif r < 0.85:
            parts.append("".join(chr(rng.randint(*CJK)) for _ in range(rng.randint(10, 80))) + "。")
        elif r < 0.93:
            parts.append(CODE * rng.randint(1, 3))
        elif r < 0.97:
            parts.append("".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 6))))
        else:
            parts.append("e\u0301 n\u0303 a\u0308 \r\n\r\n")
    return " ".join(parts)


def write_corpus(path: Path, mb: float, seed: int = 0) -> int:
    rng = random.Random(seed)
    target, n = int(mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while n < target:
            line = json.dumps({"text": make_doc(rng)}, ensure_ascii=False) + "\n"
            f.write(line)
            n += len(line.encode("utf-8"))
    return n


def trie_baseline(path: Path, mb: float) -> tuple[float, list[int], int]:
    """Pure-Python trie, one process: (MB/s, tokens with 0 after each doc, bytes read)."""
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    trie = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    limit, used, out = int(mb * 1e6), 0, []
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        for raw in f:
            if used >= limit:
                break
            used += len(raw)
            out += trie.encode(json.loads(raw)["text"])
            out.append(0)
    return used / 1e6 / (time.perf_counter() - t0), out, used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0)
    ap.add_argument("--baseline-mb", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--keep", type=str, default=None, help="folder to keep the corpus and binidx in")
    args = ap.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench_data_"))
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.jsonl"
    nbytes = write_corpus(corpus, args.mb)
    workers = args.workers or default_workers()
    print(f"corpus: {corpus} {nbytes / 1e6:.1f} MB; workers={workers} (of {os.cpu_count()} CPUs)")

    stats = build_binidx(corpus, folder / "corpus", "world", workers=workers, progress=False)
    fast = stats["bytes"] / 1e6 / stats["seconds"]
    print(f"build_binidx: {stats['docs']} docs, {stats['tokens']} tokens in {stats['seconds']:.2f} s "
          f"= {fast:.1f} MB/s")

    slow, trie_tokens, used = trie_baseline(corpus, args.baseline_mb)
    print(f"pure-Python trie, 1 process, first {used / 1e6:.1f} MB (extrapolated per MB): {slow:.2f} MB/s")
    ds = MMapIndexedDataset(folder / "corpus")
    same = np.array_equal(np.asarray(ds.tokens[: len(trie_tokens)]), np.asarray(trie_tokens))
    print(f"binidx tokens == trie tokens on that subset: {same}")
    print(f"speed-up: {fast / slow:.1f}x")
    if not args.keep:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
