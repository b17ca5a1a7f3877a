"""Needle in a haystack and passkey retrieval over a grid of context lengths x needle depths
(`rwkv-peft eval --niah` / `--passkey`).

A trial's prompt is [0] + intro + haystack[:p] + needle + haystack[p:] + question, at most `ctx`
tokens long together with the answer (the haystack is whole sentences), with the needle at the
sentence boundary nearest to depth x the haystack's length (depth 0: first, depth 1: last before
the question). The answer is scored after the question by teacher forcing: `correct` when greedy
decoding reproduces the answer's tokens (each is the argmax given the true ones before it),
`logprob` = the answer's summed fp64 log-probability (nats). The prompt is read chunk by chunk
carrying the RNN state, so any context length fits in the memory of one chunk.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .longctx import DEFAULT_CHUNK, EOT, score_continuation

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass(frozen=True)
class NeedleSpec:
    """What is hidden and asked. `needle` and `question` may contain {answer}; `answer` None draws
    a random 5-digit number per trial. `question` follows the haystack verbatim (start it with a
    space or newline); the scored continuation is " " + answer."""

    needle: str = "The special magic number is {answer}."
    question: str = " What is the special magic number? The special magic number is"
    answer: str | None = None
    intro: str = ""


NIAH = NeedleSpec()
PASSKEY = NeedleSpec(
    needle="The pass key is {answer}. Remember it. {answer} is the pass key.",
    question=" What is the pass key? The pass key is",
    intro="There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.",
)

_SUBJECTS = ("The old sailor", "A young baker", "The quiet librarian", "Our neighbour", "The tall farmer",
             "A travelling painter", "The village doctor", "My cousin", "The ferry captain", "A curious child")
_VERBS = ("carried", "painted", "repaired", "found", "sold", "counted", "cleaned", "borrowed", "described", "watched")
_OBJECTS = ("a wooden chair", "the red lantern", "three baskets of apples", "an old map", "the garden gate",
            "a bundle of letters", "the copper kettle", "a small boat", "the blue curtains", "a box of candles")
_PLACES = ("near the harbour", "before breakfast", "in the market square", "after the rain", "by the river",
           "at the edge of town", "during the festival", "behind the bakery", "on a windy afternoon", "in the attic")


MAX_LENGTH = 2**22  # the longest context a grid builds (cli_checks.MAX_GRID_LENGTH: its haystack is held in memory)


def generated_haystack(n: int = 2000, seed: int = 0) -> list[str]:
    """`n` plain English sentences drawn from fixed word lists (the default NIAH haystack)."""
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
            for _ in range(n)]


def read_haystack(path: str | None, passkey: bool = False) -> list[str]:
    """Sentences of a .txt file (or the "text" fields of a .jsonl); None: the built-in haystack
    (the passkey filler for passkey, generated sentences otherwise)."""
    if path is None:
        return re.split(r"(?<=\.)\s+", PASSKEY_FILLER) if passkey else generated_haystack()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such haystack file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".jsonl":
        import json

        try:
            text = "\n\n".join(json.loads(line)["text"] for line in text.splitlines() if line.strip())
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{p}: expected one {{\"text\": ...}} object per line ({e})") from e
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    if not sentences:
        raise UserError(f"{p}: haystack file has no text")
    return sentences


def make_spec(passkey: bool, needle: str | None = None, question: str | None = None,
              answer: str | None = None) -> NeedleSpec:
    """PASSKEY or NIAH with the given fields replaced (None keeps the default)."""
    base = PASSKEY if passkey else NIAH
    for name, v in (("--needle", needle), ("--question", question), ("--answer", answer)):
        if v is not None and not v.strip():
            raise UserError(f"{name} must not be empty")
    if answer is not None and needle is not None and "{answer}" not in needle and answer not in needle:
        raise UserError(f"--needle does not contain the answer {answer!r} (nor {{answer}})")
    if answer is None and needle is not None and "{answer}" not in needle:
        raise UserError("--needle must contain {answer} (where each trial's random answer goes), or give --answer")
    return NeedleSpec(needle=needle if needle is not None else base.needle,
                      question=question if question is not None else base.question,
                      answer=answer if answer is not None else base.answer, intro=base.intro)


def parse_list(text: str, name: str, cast: type) -> list:
    """"1024,2048" -> [1024, 2048] (UserError naming `name` on a bad item)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        out = [cast(t) for t in items]
    except ValueError:
        raise UserError(f"{name}: expected comma-separated {cast.__name__} values, got {text!r}") from None
    if not out:
        raise UserError(f"{name}: no values in {text!r}")
    return out


def default_lengths(max_ctx: int) -> list[int]:
    """Powers of two from 1024 up to max_ctx (and max_ctx itself); [max_ctx] when it is below 1024."""
    out, n = [], 1024
    while n < max_ctx:
        out.append(n)
        n *= 2
    return [*out, max_ctx]


class _Hay:
    """Token stream of haystack sentences (each encoded with a leading space), cycled."""

    def __init__(self, sentences: Sequence[str], tokenizer):
        self.pieces = [tokenizer.encode(" " + s) for s in sentences]
        self.pieces = [p for p in self.pieces if p]
        if not self.pieces:
            raise UserError("haystack: no tokens")

    def take(self, n: int, start: int) -> tuple[list[int], list[int]]:
        """Whole sentences from sentence `start` on (cycling), at most n tokens, and the sentence
        boundaries inside (0 first, the length last)."""
        toks, bounds, i = [], [0], start
        while len(toks) + len(self.pieces[i % len(self.pieces)]) <= n:
            toks.extend(self.pieces[i % len(self.pieces)])
            bounds.append(len(toks))
            i += 1
        return toks, bounds


def build_trial(tokenizer, hay: _Hay, spec: NeedleSpec, ctx: int, depth: float, rng: random.Random
                ) -> tuple[list[int], list[int]]:
    """(prompt ids starting with 0, answer ids) for one trial: len(prompt) + len(answer) <= ctx, the
    haystack being whole sentences (at most one sentence short of ctx)."""
    answer = spec.answer if spec.answer is not None else str(rng.randint(10000, 99999))
    intro = tokenizer.encode(spec.intro) if spec.intro else []
    needle = tokenizer.encode(" " + spec.needle.format(answer=answer))
    question = tokenizer.encode(spec.question.format(answer=answer))
    target = tokenizer.encode(" " + answer)
    n_hay = ctx - 1 - len(intro) - len(needle) - len(question) - len(target)
    if n_hay < 0:
        raise UserError(f"context length {ctx} is too short: the needle, question and answer alone take "
                        f"{ctx - n_hay} tokens")
    toks, bounds = hay.take(n_hay, rng.randrange(len(hay.pieces)))
    cut = min(bounds, key=lambda b: (abs(b - depth * len(toks)), b))
    return [EOT, *intro, *toks[:cut], *needle, *toks[cut:], *question], target


def check_grid(tokenizer, spec: NeedleSpec, lengths: Sequence[int], depths: Sequence[float], trials: int,
               haystack: Sequence[str] | None = None) -> _Hay:
    """UserError (one line) for a grid that cannot run, before any model work; returns the haystack."""
    if trials <= 0:
        raise UserError(f"--trials must be positive, got {trials}")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise UserError(f"--depths must lie in [0, 1], got {bad[0]}")
    bad = [n for n in lengths if n <= 0]
    if bad:
        raise UserError(f"--lengths must be positive, got {bad[0]}")
    bad = [n for n in lengths if n > MAX_LENGTH]
    if bad:
        raise UserError(f"--lengths must be at most {MAX_LENGTH} tokens, got {bad[0]}")
    hay = _Hay(haystack if haystack is not None else generated_haystack(), tokenizer)
    build_trial(tokenizer, hay, spec, min(lengths), 0.0, random.Random(0))
    return hay


def score_answer(model: nn.Module, prompt: Sequence[int], answer: Sequence[int],
                 chunk_len: int = DEFAULT_CHUNK) -> tuple[bool, float]:
    """(greedy reproduces `answer`, summed log p(answer | prompt) in nats) reading prompt + answer
    chunk by chunk (batch 1, state carried)."""
    logprob, correct = score_continuation(model, [*prompt, *answer], None, skip=len(prompt) - 1, chunk_len=chunk_len)
    return correct, logprob


def needle_grid(
    model: nn.Module,
    tokenizer,
    spec: NeedleSpec = NIAH,
    lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Sequence[float] = DEFAULT_DEPTHS,
    haystack: Sequence[str] | None = None,
    trials: int = 3,
    seed: int = 0,
    chunk_len: int = DEFAULT_CHUNK,
    progress: bool = True,
    desc: str = "niah",
) -> dict:
    """Score every (context length, depth) cell over `trials` trials.

    Returns {"cells": [{"ctx", "depth", "correct", "logprob", "trials"}, ...], "accuracy",
    "lengths", "depths", "needle", "question"}: `correct` is the share of the cell's trials whose
    greedy answer is exact (0..1), `logprob` their mean answer log-probability (nats). Trial i of
    every cell uses the same answer and haystack offset (seeded by `seed` and i), so cells differ
    only in length and depth. The model runs in eval mode and is restored afterwards.
    """
    hay = check_grid(tokenizer, spec, lengths, depths, trials, haystack)
    from tqdm.auto import tqdm

    cells = []
    bar = tqdm(total=len(lengths) * len(depths) * trials, desc=desc, unit="trial", disable=not progress, leave=False)
    was_training = model.training
    model.eval()
    try:
        for ctx in lengths:
            for depth in depths:
                ok, lp = [], []
                for i in range(trials):
                    prompt, answer = build_trial(tokenizer, hay, spec, ctx, depth, random.Random(seed * 100003 + i))
                    c, p = score_answer(model, prompt, answer, chunk_len)
                    ok.append(c)
                    lp.append(p)
                    bar.update(1)
                cells.append({"ctx": int(ctx), "depth": float(depth), "correct": sum(ok) / trials,
                              "logprob": sum(lp) / trials, "trials": trials})
    finally:
        bar.close()
        model.train(was_training)
    return {"cells": cells, "accuracy": sum(c["correct"] for c in cells) / len(cells),
            "lengths": [int(n) for n in lengths], "depths": [float(d) for d in depths],
            "needle": spec.needle, "question": spec.question}


def plot_grid(runs: Sequence[dict], path: str, title: str = "needle in a haystack") -> None:
    """One heatmap per run (dicts from needle_grid with a "label"): depth (rows) x context length
    (columns), colour = share correct, each cell annotated with it and the mean answer log-prob."""
    from .longctx import _pyplot, save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(1.2 + 1.3 * len(runs[0]["lengths"]) * len(runs), 4.2),
                             dpi=100, squeeze=False)
    for ax, run in zip(axes[0], runs):
        lengths, depths = run["lengths"], run["depths"]
        grid = torch.zeros(len(depths), len(lengths))
        for c in run["cells"]:
            i, j = depths.index(c["depth"]), lengths.index(c["ctx"])
            grid[i, j] = c["correct"]
            ax.text(j, i, f"{c['correct']:.2f}\n{c['logprob']:.1f}", ha="center", va="center", fontsize=7,
                    color="black" if c["correct"] > 0.5 else "white")
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{run.get('label', 'model')}: {run['accuracy']:.0%}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="share correct (cell text: share, mean log-prob)")
    fig.suptitle(title)
    save_figure(fig, path)


def format_grid(runs: Sequence[dict]) -> str:
    """A text table per run: depth rows x length columns of `correct` (and the overall accuracy)."""
    out = []
    for run in runs:
        lengths = run["lengths"]
        out.append(f"{run.get('label', 'model')}: accuracy {run['accuracy']:.3f}")
        out.append(f"{'depth':>7}" + "".join(f"{n:>9}" for n in lengths))
        for d in run["depths"]:
            row = {c["ctx"]: c for c in run["cells"] if c["depth"] == d}
            out.append(f"{d:>7.2f}" + "".join(f"{row[n]['correct']:>9.2f}" for n in lengths))
    return "\n".join(out)


def passkey_records(n: int, lengths: Sequence[int], tokenizer, seed: int = 0, per_doc: int = 1) -> list[dict]:
    """`n` passkey training documents {"text": ...} for `data.kind: text`: the instruction line, then
    `per_doc` rounds of haystack with a needle at a random depth + the question + " " + answer + ".",
    each round (with the instruction for the first) at most a length drawn from `lengths` tokens.
    A round is exactly what `--passkey` scores; later rounds ask for their own, newer pass key."""
    rng = random.Random(seed)
    hay = _Hay(read_haystack(None, passkey=True), tokenizer)
    recs = []
    for _ in range(n):
        text = ""
        for k in range(per_doc):
            spec = PASSKEY if k == 0 else NeedleSpec(PASSKEY.needle, PASSKEY.question)
            ctx = rng.choice(list(lengths))
            prompt, answer = build_trial(tokenizer, hay, spec, ctx, rng.random(), rng)
            text += tokenizer.decode(prompt[1:]) + tokenizer.decode(answer) + "."
        recs.append({"text": text})
    return recs
