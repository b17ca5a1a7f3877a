"""The `preference` data kind: `{prompt, chosen, rejected}` records as (chosen, rejected) pairs.

A record renders twice, once per side, as `prompt + response` with loss on the response and the
end-of-text after it (so a side's log-probability is `log pi(response + EOT | prompt)`):

- prompt and response strings: the sft rendering, `[System: {system}\\n\\n] + prompt_template +
  response_template` (by default the World chat format `User: {prompt}\\n\\nAssistant: {response}\\n\\n`);
- a prompt or a response given as chat messages (`[{"role", "content"}, ...]`, as `data.kind: chat`
  reads them): the chat rendering of `data.formats.ChatFormat`; a prompt string is then one user turn
  and a response string one assistant turn; loss on the response's assistant replies only.

Each side is tokenized once into the data cache like sft data (`dataset.make_dataset`), one document
per record, chosen and rejected in two aligned caches. A pair is `pad`-sampled: pair i of an epoch is a
fresh permutation of the records per (seed, epoch), each side right-padded, and a response longer
than the room `data.ctx_len` leaves after its prompt is cut there. A prompt that alone fills ctx_len
leaves no response token to score: a one-line error naming file and line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .config import DataConfig
from .formats import ChatFormat, Segments, SftFormat
from .records import check_file, get_str, json_type
from .sampling import EpochOrder
from .tokenizer import Tokenizer

IGNORE = -100
SIDES = ("chosen", "rejected")


@dataclass(frozen=True)
class PreferenceFormat:
    """One side (`chosen` or `rejected`) of a preference record as text segments with a loss flag.

    Both sides are checked whichever is rendered, so a bad record fails the same way in either cache."""

    side: str = "chosen"
    prompt_fields: tuple[str, ...] = ("prompt",)
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    prompt_template: str = "User: {prompt}\n\nAssistant:"
    response_template: str = " {response}\n\n"
    system: str | None = None
    has_mask = True

    def _prompt(self, rec: dict, where: str) -> str | list:
        present = [f for f in self.prompt_fields if f in rec and rec[f] is not None]
        if not present:
            names = ", ".join(map(repr, self.prompt_fields))
            raise UserError(f"{where}: missing prompt field {names} (keys: {', '.join(map(repr, rec))})")
        if len(present) == 1 and isinstance(rec[present[0]], list):
            if not rec[present[0]]:
                raise UserError(f"{where}: field {present[0]!r} is empty")
            return rec[present[0]]
        text = "\n".join(p for p in (get_str(rec, f, where).strip() for f in present) if p)
        if not text:
            raise UserError(f"{where}: field {present[0]!r} is empty")
        return text

    def _response(self, rec: dict, field: str, where: str) -> str | list:
        if field not in rec:
            raise UserError(f"{where}: missing field {field!r} (keys: {', '.join(map(repr, rec))})")
        v = rec[field]
        if isinstance(v, str):
            if not v.strip():
                raise UserError(f"{where}: field {field!r} is empty")
            return v
        if not isinstance(v, list):
            raise UserError(f"{where}: field {field!r} must be a string or an array of chat messages, "
                            f"got {json_type(v)}")
        if not v:
            raise UserError(f"{where}: field {field!r} is empty")
        return v

    def _chat(self, field: str, messages: list, where: str, loss: bool, system: str | None = None) -> Segments:
        segs = ChatFormat(messages_field=field, system=system).segments({field: messages}, where)
        return [(text, flag and loss) for text, flag in segs]

    def _reply(self, field: str, response: str | list, where: str) -> Segments:
        reply = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
        segs = self._chat(field, reply, where, loss=True)
        if not any(loss and text.strip() for text, loss in segs):
            raise UserError(f"{where}: field {field!r} has no assistant reply with text")
        return segs

    def segments(self, rec: dict, where: str) -> Segments:
        prompt = self._prompt(rec, where)
        fields = dict(zip(SIDES, (self.chosen_field, self.rejected_field)))
        responses = {s: self._response(rec, f, where) for s, f in fields.items()}
        for s, response in responses.items():  # the other side's messages too: a bad one fails in either cache
            if s != self.side and isinstance(response, list):
                self._reply(fields[s], response, where)
        response = responses[self.side]
        if isinstance(prompt, str) and isinstance(response, str):  # the sft rendering
            sft = SftFormat(("prompt",), "response", self.prompt_template, self.response_template, self.system)
            return sft.segments({"prompt": prompt, "response": response}, where)
        pfield = next(f for f in self.prompt_fields if f in rec and rec[f] is not None)
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        segs = self._chat(pfield, turns, where, loss=False, system=self.system)
        return segs + self._reply(fields[self.side], response, where)


def preference_format(cfg: DataConfig, side: str = "chosen") -> PreferenceFormat:
    return PreferenceFormat(side, tuple(cfg.prompt_fields or ("prompt",)), cfg.chosen_field, cfg.rejected_field,
                            cfg.prompt_template, cfg.response_template, cfg.system)


@dataclass
class Side:
    """One side's documents: the token stream, its loss mask, and each document's start and size."""

    tokens: np.ndarray
    mask: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray


class PreferenceData:
    """(chosen, rejected) pairs addressed by the training step, like `TrainData`.

    `batch(...)` -> (input_ids, labels), each [2 * micro_bsz, T] int64: rows 0..B-1 the chosen sides of
    the micro-batch's B pairs, rows B..2B-1 their rejected sides in the same order; T is the longest of
    them (<= ctx_len; padding carries no loss and a causal model never reads it)."""

    kind = "preference"
    empty_docs = 0
    held_out_pairs: PreferenceData | None = None  # pairs data.eval_split kept out of training (make_dataset)
    eval_note = ""  # why nothing is held out, where no data.eval_path is given either

    def __init__(self, chosen: Side, rejected: Side, ctx_len: int, seed: int, source: str = "data",
                 locate=None) -> None:
        if len(chosen.sizes) != len(rejected.sizes):
            raise ValueError("preference sides differ in their number of records")
        self.sides, self.ctx_len, self.source = (chosen, rejected), ctx_len, source
        self.num_docs = len(chosen.sizes)
        if self.num_docs == 0:
            raise UserError(f"{source}: no records (empty dataset)")
        prompt = self.prompt_lengths(chosen)
        bad = np.flatnonzero(prompt >= ctx_len)
        if len(bad):
            k = int(bad[0])
            where = locate(k) if locate else f"{source}: record {k}"
            raise UserError(f"{where}: the prompt alone is {int(prompt[k])} tokens, data.ctx_len is {ctx_len}: no "
                            f"response token fits ({len(bad)} such records); raise data.ctx_len or shorten the prompt")
        self.truncated = int(sum((s.sizes > ctx_len).sum() for s in self.sides))
        self.identical = len(self.identical_pairs())  # no preference to learn (the loop's data line counts them)
        self.group_by_length = False
        # a pair's rows run to its longer side (data.group_by_length puts pairs of similar length together)
        self._order = EpochOrder(self.num_docs, np.minimum(np.maximum(chosen.sizes, rejected.sizes), ctx_len), seed)

    def identical_pairs(self) -> list[int]:
        """The records whose chosen and rejected documents are the same tokens with the same loss mask."""
        (c, r) = self.sides
        out = []
        for k in np.flatnonzero(c.sizes == r.sizes):
            a, b, n = int(c.starts[k]), int(r.starts[k]), int(c.sizes[k])
            same = np.array_equal(c.tokens[a:a + n], r.tokens[b:b + n])
            if same and np.array_equal(c.mask[a:a + n], r.mask[b:b + n]):
                out.append(int(k))
        return out

    @staticmethod
    def prompt_lengths(side: Side) -> np.ndarray:
        """Tokens before the first loss-carrying one, per document."""
        at = np.where(side.mask[: int(side.starts[-1] + side.sizes[-1])] != 0,
                      np.arange(int(side.starts[-1] + side.sizes[-1])), np.iinfo(np.int64).max)
        return np.minimum.reduceat(at, side.starts.astype(np.int64)) - side.starts.astype(np.int64)

    @property
    def num_samples(self) -> int:
        """Pairs per epoch."""
        return self.num_docs

    @property
    def num_tokens(self) -> int:
        return int(sum(len(s.tokens) for s in self.sides))

    def pair_index(self, i: int, block: int = 1) -> int:
        """The record of sample i (>= 0): a permutation of the records per (seed, epoch); block > 1 groups it
        by length for micro-batches of `block` pairs (sampling.EpochOrder)."""
        return self._order(i, block)

    def sequence(self, k: int, side: int) -> tuple[np.ndarray, np.ndarray]:
        """Record k's chosen (side 0) or rejected (side 1) document: (inputs, labels) of its first
        min(size, ctx_len) targets; inputs start with end-of-text 0."""
        s = self.sides[side]
        start, n = int(s.starts[k]), min(int(s.sizes[k]), self.ctx_len)
        targets = s.tokens[start : start + n].astype(np.int64)
        x = np.concatenate([np.zeros(1, np.int64), targets[:-1]])
        y = np.where(s.mask[start : start + n] != 0, targets, IGNORE)
        return x, y

    def pairs_batch(self, records: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) [2 * len(records), T]: the chosen sides, then the rejected ones."""
        seqs = [self.sequence(k, side) for side in (0, 1) for k in records]
        T = max(len(x) for x, _ in seqs)
        idx = np.zeros((len(seqs), T), np.int64)
        labels = np.full((len(seqs), T), IGNORE, np.int64)
        for row, (x, y) in enumerate(seqs):
            idx[row, : len(x)], labels[row, : len(y)] = x, y
        return torch.from_numpy(idx), torch.from_numpy(labels)

    def batch(self, step: int, micro_step: int, micro_bsz: int, grad_accum: int, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's pairs: sample j is the global sample
        `((step * grad_accum + micro_step) * world_size + rank) * micro_bsz + j`, as in TrainData.batch."""
        base = ((step * grad_accum + micro_step) * world_size + rank) * micro_bsz
        block = micro_bsz * world_size if self.group_by_length else 1
        return self.pairs_batch([self.pair_index(base + j, block) for j in range(micro_bsz)])

    def in_order(self, micro_bsz: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every pair once, in file order, micro_bsz pairs at a time (evaluation)."""
        for lo in range(0, self.num_docs, micro_bsz):
            yield self.pairs_batch(list(range(lo, min(lo + micro_bsz, self.num_docs))))

    def describe(self) -> str:
        return (f"{self.source}: {self.num_docs} preference pairs, {self.num_tokens} tokens, ctx_len {self.ctx_len}, "
                f"{self.truncated} responses cut at ctx_len")


def make_preference_data(cfg: DataConfig, tokenizer: Tokenizer | None, seed: int, vocab_size: int | None = None,
                         cache_dir: str | os.PathLike | None = None, workers: int | None = None,
                         progress: bool = True, build: bool = True) -> PreferenceData | None:
    """Tokenize (or open from the cache) both sides of `cfg.path`; see `dataset.make_dataset`."""
    from .build import tokenize_file
    from .dataset import CACHE_VERSION, DEFAULT_CACHE_DIR, _check_vocab, _open_cached, _record_where, file_digest

    if cfg.sampling == "get":
        raise UserError("data.sampling: get does not apply to preference pairs (each sample is one pair); "
                        "use pad or auto")
    if Path(cfg.path).suffix in (".bin", ".idx"):
        raise UserError(f"data.path: {cfg.path}: preference data are .jsonl / .json / .parquet records")
    if tokenizer is None:
        raise ValueError("make_preference_data needs a tokenizer")
    path = check_file(cfg.path)
    digest = file_digest(path)
    folder = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    sides = []
    for side in SIDES:
        fmt = preference_format(cfg, side)
        key = json.dumps([CACHE_VERSION, digest, tokenizer.fingerprint, type(fmt).__name__, dataclasses.asdict(fmt)])
        prefix = str(folder / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}")
        cached = _open_cached(prefix, True)
        if cached is None and not build:
            return None
        if cached is None:
            tokenize_file(path, prefix, fmt, tokenizer, workers, progress, mask_path=prefix + ".mask")
            cached = _open_cached(prefix, True)
            assert cached is not None, f"cache {prefix} unreadable right after writing it"
        ds, mask = cached
        if vocab_size is not None and tokenizer.vocab_size > vocab_size:
            _check_vocab(ds, vocab_size, lambda d: _record_where(cfg.path, d))
        sides.append(Side(ds.tokens, mask, ds.pointers // ds.dtype.itemsize, ds.sizes.astype(np.int64)))
    data = PreferenceData(sides[0], sides[1], cfg.ctx_len, seed, source=str(path),
                          locate=lambda d: _record_where(cfg.path, d))
    if data.identical == data.num_docs:
        raise UserError(f"{path}: chosen and rejected are the same in every record ({data.num_docs}); a pair teaches "
                        "a preference only where its two sides differ")
    return data


__all__ = ["PreferenceFormat", "PreferenceData", "make_preference_data", "preference_format"]
