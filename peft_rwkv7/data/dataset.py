"""`make_dataset`: a `DataConfig` -> `TrainData`, token batches addressed by the training step.

Every source becomes one token stream of documents (each ending with end-of-text 0), kept as
a binidx pair: binidx input as it is, jsonl / json / parquet tokenized once into the cache
(`cache_dir`, keyed by the input's content hash, the tokenizer and the rendering options; sft
and chat add a per-token loss mask file). A second run with the same inputs memory-maps the
cached pair and starts at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .binidx import MMapIndexedDataset, is_binidx, split_prefix
from .build import tokenize_file
from .config import DataConfig, not_get
from .formats import SFT_FIELD_SETS, SHAREGPT_FIELD, ChatFormat, SftFormat, TextFormat, chat_field
from .preference import PreferenceData, PreferenceFormat, Side, make_preference_data, preference_format
from .records import check_file, first_record, iter_records
from .sampling import PieceSampler, WindowSampler
from .tokenizer import Tokenizer

CACHE_VERSION = 1  # bump when the cached layout or rendering changes
DEFAULT_CACHE_DIR = Path("~/.cache/rwkv-peft/data")
DEFAULT_EVAL_SPLIT = 0.02  # held out of the user's own data when no eval_path is given
EVAL_SPLIT_STREAM = 7  # a random stream of its own for the held-out choice (independent of sampling)
IGNORE = -100  # label of positions that carry no loss (F.cross_entropy's default ignore_index)


class TrainData:
    """Samples of `ctx_len` tokens from a token stream; a pure function of (seed, sample index).

    `sample(i)` -> (input_ids [ctx_len] int64, labels [ctx_len] int64), labels already shifted
    (input_ids[t] predicts labels[t]) and IGNORE (-100) where no loss is taken. Indices past
    `num_samples` run into the next epoch (a new order, see sampling.py).
    """

    def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray | None, starts: np.ndarray,
                 sizes: np.ndarray, ctx_len: int, sampling: str, split: bool, seed: int,
                 source: str = "data") -> None:
        self.tokens, self.loss_mask, self.ctx_len, self.sampling = tokens, loss_mask, ctx_len, sampling
        self.num_docs, self.source = len(sizes), source
        self.empty_docs = int((np.asarray(sizes) <= 1).sum())  # nothing but the end-of-text token
        self.held_out: list[list[int]] = []  # documents make_dataset kept out for evaluation
        self.held_out_masks: list[list[bool]] | None = None  # sft/chat: which of their tokens are scored
        self.eval_note = ""  # why nothing is held out, where no data.eval_path is given either
        self.group_by_length = False  # pad: each micro-batch takes pieces of similar length (data.group_by_length)
        if sampling == "get":
            if len(tokens) < ctx_len + 1:
                raise UserError(f"{source}: {len(tokens)} tokens cannot fill one sample of ctx_len+1 = "
                                f"{ctx_len + 1}; lower data.ctx_len or use data.sampling: pad")
            self._sampler: WindowSampler | PieceSampler = WindowSampler(len(tokens), ctx_len, seed)
        else:
            self._sampler = PieceSampler(starts, sizes, ctx_len, split, loss_mask, seed)
            if self._sampler.num_samples == 0:
                raise UserError(f"{source}: no sample has a token that carries loss (every response cut "
                                "off? raise data.ctx_len or use data.overflow: split)")

    @property
    def num_samples(self) -> int:
        """Samples per epoch."""
        return self._sampler.num_samples

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def _labels(self, targets: np.ndarray, start: int) -> np.ndarray:
        y = targets.astype(np.int64)
        if self.loss_mask is not None:
            y[self.loss_mask[start : start + len(y)] == 0] = IGNORE
        return y

    def sample(self, i: int, block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample `i` (>= 0): (input_ids [ctx_len], labels [ctx_len]), int64. block > 1 (pad sampling): the
        order grouped by length for micro-batches of `block` samples (sampling.grouped_order)."""
        L = self.ctx_len
        if self.sampling == "get":
            o = self._sampler.offset(i)
            window = self.tokens[o : o + L + 1].astype(np.int64)
            x, y = window[:-1], self._labels(window[1:], o + 1)
        else:
            k = self._sampler.piece(i, block)
            start, n = int(self._sampler.piece_start[k]), int(self._sampler.piece_len[k])
            targets = self.tokens[start : start + n]
            if self._sampler.piece_first[k]:  # a document starts after end-of-text, as in the stream
                prev = np.zeros(1, np.int64)
                x_real = np.concatenate([prev, self.tokens[start : start + n - 1].astype(np.int64)])
            else:
                x_real = self.tokens[start - 1 : start + n - 1].astype(np.int64)
            x = np.zeros(L, np.int64)
            y = np.full(L, IGNORE, np.int64)
            x[:n], y[:n] = x_real, self._labels(targets, start)
        return torch.from_numpy(x), torch.from_numpy(y)

    def batch(self, step: int, micro_step: int, micro_bsz: int, grad_accum: int, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), each [micro_bsz, ctx_len] int64, for one micro-batch of one rank.

        Sample j of the micro-batch is the global sample
        `((step * grad_accum + micro_step) * world_size + rank) * micro_bsz + j`: the data position
        is a function of the step alone (exact resume needs only the step), ranks read distinct
        samples, and together they read what one process with micro_bsz * world_size would. With
        group_by_length the ranks' micro-batches of one micro-step hold pieces of similar length.
        """
        base = ((step * grad_accum + micro_step) * world_size + rank) * micro_bsz
        block = micro_bsz * world_size if self.group_by_length else 1
        xs, ys = zip(*(self.sample(base + j, block) for j in range(micro_bsz)), strict=True)
        return torch.stack(xs), torch.stack(ys)

    def describe(self) -> str:
        grouped = ", grouped by length" if self.group_by_length else ""
        return (f"{self.source}: {self.num_docs} docs, {self.num_tokens} tokens, {self.sampling} sampling{grouped}, "
                f"{self.num_samples} samples/epoch of ctx_len {self.ctx_len}")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def _sft_format(cfg: DataConfig, rec: dict, where: str) -> SftFormat:
    """Fields set in cfg are used as given; unset ones are taken from the first known pair that fits."""
    if cfg.prompt_fields and cfg.response_field:  # records lacking them fail later, naming their line
        return SftFormat(tuple(cfg.prompt_fields), cfg.response_field, cfg.prompt_template,
                         cfg.response_template, cfg.system)
    for cand_pf, cand_rf in SFT_FIELD_SETS:
        pf, rf = tuple(cfg.prompt_fields or cand_pf), cfg.response_field or cand_rf
        if rf in rec and any(f in rec for f in pf):
            return SftFormat(pf, rf, cfg.prompt_template, cfg.response_template, cfg.system)
    keys = ", ".join(map(repr, rec))
    raise UserError(f"{where}: cannot tell the sft prompt/response fields from keys {keys}; "
                    "set data.prompt_fields and data.response_field")


def resolve_format(cfg: DataConfig) -> tuple[str, TextFormat | SftFormat | ChatFormat | PreferenceFormat | None]:
    """(kind, format) for cfg: kind auto is guessed from the path and the first record. For preference
    data the format renders the chosen side (what `eval` scores); training reads both (make_dataset)."""
    kind = cfg.kind
    p = Path(cfg.path)
    if kind == "binidx" or (kind == "auto" and (p.suffix in (".bin", ".idx") or
                                                (not p.exists() and is_binidx(p)))):
        return "binidx", None
    where, rec = first_record(cfg.path)
    if kind == "auto":
        if cfg.chosen_field in rec and cfg.rejected_field in rec:
            kind = "preference"
        elif cfg.messages_field in rec or SHAREGPT_FIELD in rec:  # ShareGPT: conversations of {from, value}
            kind = "chat"
        elif cfg.text_field in rec:
            kind = "text"
        else:
            kind = "sft"
            try:
                _sft_format(cfg, rec, where)
            except UserError:
                keys = ", ".join(map(repr, rec))
                raise UserError(f"{where}: cannot guess data.kind from keys {keys}; set data.kind to "
                                "text, sft or chat (and the field names)") from None
    if kind == "preference":
        return kind, preference_format(cfg, "chosen")
    if kind == "text":
        return kind, TextFormat(cfg.text_field)
    if kind == "chat":
        return kind, ChatFormat(chat_field(cfg.messages_field, rec), cfg.system)
    return kind, _sft_format(cfg, rec, where)


def _open_cached(prefix: str, with_mask: bool) -> tuple[MMapIndexedDataset, np.ndarray | None] | None:
    if not Path(prefix + ".idx").is_file():
        return None
    try:
        ds = MMapIndexedDataset(prefix)
    except UserError:
        return None  # damaged cache: rebuild
    if not with_mask:
        return ds, None
    mask_path = Path(prefix + ".mask")
    if not mask_path.is_file() or mask_path.stat().st_size != ds.num_tokens:
        return None
    return ds, (np.memmap(mask_path, np.uint8, mode="r") if ds.num_tokens else np.zeros(0, np.uint8))


def _check_vocab(ds: MMapIndexedDataset, vocab_size: int, locate) -> None:
    """UserError naming the first document with a token id >= vocab_size (scanned in blocks)."""
    block = 1 << 24
    for a in range(0, ds.num_tokens, block):
        chunk = ds.tokens[a : a + block]
        if len(chunk) and int(chunk.max()) >= vocab_size:
            pos = a + int(np.argmax(chunk >= vocab_size))
            doc = int(np.searchsorted(ds.pointers // ds.dtype.itemsize, pos, side="right")) - 1
            raise UserError(f"{locate(doc)}: token id {int(ds.tokens[pos])} is beyond the model's "
                            f"vocabulary ({vocab_size} ids; wrong data.tokenizer?)")


def _record_where(path: str, doc: int) -> str:
    for i, (where, _) in enumerate(iter_records(path)):
        if i == doc:
            return where
    return path


def make_dataset(cfg: DataConfig, tokenizer: Tokenizer | None, seed: int, vocab_size: int | None = None,
                 cache_dir: str | os.PathLike | None = None, workers: int | None = None,
                 progress: bool = True, build: bool = True) -> TrainData | None:
    """Tokenize (or load from cache) `cfg.path` and return its TrainData.

    vocab_size: the model's; a token id >= vocab_size is a UserError naming file and line.
    cache_dir: default ~/.cache/rwkv-peft/data. workers: tokenizer processes (default all cores).
    build: False only opens the cache, returning None where it is missing or damaged (several
    processes: one builds it, the others wait and open it). The cache appears atomically (temp
    files renamed, `.idx` last), so a reader never sees a half-written one.
    """
    cfg.validate()
    if cfg.kind == "preference" or (cfg.kind == "auto" and resolve_format(cfg)[0] == "preference"):
        # pairs, not a token stream: data/preference.py
        pairs = make_preference_data(cfg, tokenizer, seed, vocab_size, cache_dir, workers, progress, build)
        if pairs is None:
            return None
        pairs = _hold_out_pairs(cfg, pairs, seed)
        pairs.group_by_length = cfg.group_by_length
        return pairs
    kind, fmt = resolve_format(cfg)
    if kind == "binidx":
        ds, mask = MMapIndexedDataset(cfg.path), None
        source = split_prefix(cfg.path) + ".bin"
        locate = lambda d: f"{source}: document {d}"
        must_scan = True
    else:
        if tokenizer is None:
            raise ValueError("make_dataset needs a tokenizer for jsonl / json / parquet data")
        path = check_file(cfg.path)
        key = json.dumps([CACHE_VERSION, file_digest(path), tokenizer.fingerprint, type(fmt).__name__,
                          dataclasses.asdict(fmt)])
        folder = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
        prefix = str(folder / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}")
        cached = _open_cached(prefix, fmt.has_mask)
        if cached is None and not build:
            return None
        if cached is None:
            tokenize_file(path, prefix, fmt, tokenizer, workers, progress,
                          mask_path=prefix + ".mask" if fmt.has_mask else None)
            cached = _open_cached(prefix, fmt.has_mask)
            assert cached is not None, f"cache {prefix} unreadable right after writing it"
        ds, mask = cached
        source = str(path)
        locate = lambda d: _record_where(cfg.path, d)
        must_scan = vocab_size is not None and tokenizer.vocab_size > vocab_size
    if len(ds) == 0:
        raise UserError(f"{source}: no documents (empty dataset)")
    if vocab_size is not None and must_scan:
        _check_vocab(ds, vocab_size, locate)
    sampling = cfg.sampling if cfg.sampling != "auto" else ("pad" if kind in ("sft", "chat") else "get")
    if cfg.group_by_length and sampling == "get":
        raise UserError(f"data.group_by_length: {not_get(f'{cfg.path} is read with get sampling')}")
    tokens, starts, sizes = ds.tokens, ds.pointers // ds.dtype.itemsize, ds.sizes
    held_out: list[list[int]] = []
    held_masks: list[list[bool]] | None = None
    n_eval, note = eval_count(cfg, len(sizes), "documents")
    if n_eval:
        held = _held_out_choice(len(sizes), n_eval, seed)
        held_out, held_masks = _held_out_docs(tokens, mask, starts, sizes, held)
        tokens, mask, starts, sizes = _without(tokens, mask, starts, sizes, held)
        if not held_out:
            note = "no eval: the held-out documents have nothing to score (set data.eval_path)"
    data = TrainData(tokens, mask, starts, sizes, cfg.ctx_len, sampling, cfg.overflow == "split", seed,
                     source=source)
    data.held_out, data.held_out_masks, data.eval_note = held_out, held_masks, note
    data.group_by_length = cfg.group_by_length
    return data


def eval_count(cfg: DataConfig, n: int, unit: str) -> tuple[int, str]:
    """(how many of the n documents (or pairs) data.eval_split holds out, and where none is, a note
    saying why there is no eval); data.eval_split defaults to DEFAULT_EVAL_SPLIT without an eval_path."""
    split = cfg.eval_split if cfg.eval_split is not None else (0.0 if cfg.eval_path else DEFAULT_EVAL_SPLIT)
    n_eval = int(split * n)
    if n_eval or cfg.eval_path:
        return n_eval, ""
    if not split:
        return 0, "no eval: data.eval_split is 0 and no data.eval_path"
    return 0, (f"no eval: {split:.0%} of {n} {unit} is less than one (set data.eval_split, or a held-out file "
               f"as data.eval_path)")


def _held_out_choice(n: int, n_eval: int, seed: int) -> np.ndarray:
    """The indices (ascending) of `n_eval` of `n` documents held out for evaluation: a seeded random choice
    of its own random stream, so that a resume (and every rank) holds out the same ones."""
    return np.sort(np.random.default_rng([seed, EVAL_SPLIT_STREAM]).permutation(n)[:n_eval])


def _held_out_docs(tokens: np.ndarray, mask: np.ndarray | None, starts: np.ndarray, sizes: np.ndarray,
                   held: np.ndarray) -> tuple[list[list[int]], list[list[bool]] | None]:
    """The documents `held` as `infer.evaluate` scores them, each with something to score: text as
    data.eval_path records are (without their end-of-text; the evaluator puts token 0 in front), sft/chat
    as training and `eval --data` see them (with the end-of-text, scored where the loss mask is set)."""
    docs = [tokens[starts[i] : starts[i] + sizes[i]].tolist() for i in held]
    if mask is None:
        docs = [d[:-1] if d and d[-1] == 0 else d for d in docs]
        return [d for d in docs if d], None
    masks = [(mask[starts[i] : starts[i] + sizes[i]] != 0).tolist() for i in held]
    kept = [k for k, m in enumerate(masks) if any(m)]
    return [docs[k] for k in kept], [masks[k] for k in kept]


def _without(tokens: np.ndarray, mask: np.ndarray | None, starts: np.ndarray, sizes: np.ndarray, held: np.ndarray):
    """(tokens, mask, starts, sizes) of the stream without the documents `held`, as one new contiguous stream."""
    drop = np.zeros(len(tokens), bool)
    for i in held:
        drop[starts[i] : starts[i] + sizes[i]] = True
    kept_sizes = np.delete(np.asarray(sizes), held).astype(np.int32)
    kept_starts = np.concatenate([[0], np.cumsum(kept_sizes[:-1], dtype=np.int64)])
    return tokens[~drop], None if mask is None else mask[~drop], kept_starts, kept_sizes


def _hold_out_pairs(cfg: DataConfig, data: PreferenceData, seed: int) -> PreferenceData:
    """The pairs without those data.eval_split holds out (whole records, both sides), which become its
    `held_out_pairs`, chosen as documents are."""
    n_eval, note = eval_count(cfg, data.num_docs, "pairs")
    held_pairs = None
    if n_eval:
        held = _held_out_choice(data.num_docs, n_eval, seed)
        keep = np.setdiff1d(np.arange(data.num_docs), held)

        def sides(drop: np.ndarray) -> list[Side]:
            return [Side(*_without(s.tokens, s.mask, s.starts, s.sizes, drop)) for s in data.sides]

        held_pairs = PreferenceData(*sides(keep), data.ctx_len, seed, source=f"{data.source} (held out)")
        data = PreferenceData(*sides(held), data.ctx_len, seed, source=data.source)
    data.held_out_pairs, data.eval_note = held_pairs, note
    return data
