"""Perplexity and LAMBADA-style last-word accuracy, as docs/formats.md defines `rwkv-peft eval`.

Each document d (token ids) is scored as the sequence [0] + d: the model reads end-of-text (0)
first, then predicts every token of d. loss = total negative log-likelihood (nats) over all
predicted tokens of all documents / number of those tokens; ppl = exp(loss).

LAMBADA accuracy: with text = decode(d) = context + " " + last_word (split at the last space), the
document counts as correct when greedy decoding after [0] + encode(context) produces exactly
encode(" " + last_word): every one of those target tokens is the argmax given the true tokens
before it (teacher forcing on the target equals greedy decoding when all of them are right).
When d itself is encode(context) + encode(" " + last_word) (the usual case) this reuses the loss
pass; otherwise that sequence is scored separately, for accuracy only.

sft and chat data (`load_eval_data`) are rendered and masked exactly as training renders them
(`data.formats`): each document is its rendered tokens plus end-of-text, and only the tokens that
carry loss in training (the responses / assistant replies, and the end-of-text after a final one)
are scored; loss and tokens count those alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .longctx import chunked_forward, exact_logprobs

EOT = 0
_IGNORE = -1


_HEAD_ROWS = 512  # rows of logits made at once by _scored_chunks: 128 MiB fp32 at a vocabulary of 65536


def _forward_logits(model: nn.Module, idx: torch.Tensor, chunk_len: int):
    """Yield (start, logits [B, t, V]) over idx [B, T] in time chunks, carrying the RNN state."""
    if idx.shape[1] <= chunk_len:
        yield 0, model(idx)
        return
    for s, logits, _ in chunked_forward(model, idx, None, chunk_len):
        yield s, logits
        del logits  # one chunk of logits alive at a time (the caller drops its reference too)


def _wrong(logits: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Where a checked position's argmax is not its target: `c` [n] bool, targets `t` [n], logits [n, V]. The
    vocabulary-wide argmax only where some position is checked (LAMBADA accuracy; ~13% of a 0.1B eval)."""
    return (logits.argmax(dim=-1) != t) & c if bool(c.any()) else c


def _scored_chunks(model: nn.Module, inp: torch.Tensor, tgt: torch.Tensor, check: torch.Tensor, chunk_len: int):
    """Yield (log p(target) [B, t] fp64, 0 where tgt < 0; argmax wrong where `check` [B, t] bool) per time chunk.

    A model with `hidden` and `head_logits` (this package's RWKV7, adapted or not) runs the head only on the
    rows that have a target (not on prompts and padding), _HEAD_ROWS rows at a time, so no [B, t, V] logits
    are held; any other model (idx -> logits) is scored from its whole logits. A check on a position without
    a target is wrong either way (no argmax equals it)."""
    if not (callable(getattr(model, "hidden", None)) and callable(getattr(model, "head_logits", None))):
        for s, logits in _forward_logits(model, inp, chunk_len):
            t = tgt[:, s : s + logits.shape[1]]
            yield exact_logprobs(logits, t), _wrong(logits, t, check[:, s : s + logits.shape[1]])
            del logits
        return
    state = None
    for s in range(0, inp.shape[1], chunk_len):
        h, state = model.hidden(inp[:, s : s + chunk_len], state)
        t, c = tgt[:, s : s + h.shape[1]].reshape(-1), check[:, s : s + h.shape[1]].reshape(-1)
        logp = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        wrong = c & (t < 0)
        rows, h = (t >= 0).nonzero().squeeze(1), h.reshape(-1, h.shape[-1])
        for lo in range(0, rows.shape[0], _HEAD_ROWS):
            at = rows[lo : lo + _HEAD_ROWS]
            logits = model.head_logits(h.index_select(0, at))
            logp[at] = exact_logprobs(logits, t[at])
            wrong[at] = _wrong(logits, t[at], c[at])
            del logits
        yield logp.view(inp.shape[0], -1), wrong.view(inp.shape[0], -1)


@torch.no_grad()
def score_sequences(
    model: nn.Module,
    seqs: list[list[int]],
    last_k: list[int],
    batch_size: int = 8,
    chunk_len: int = 512,
    scored: list[list[bool]] | None = None,
) -> tuple[list[float], list[int], list[bool]]:
    """For each sequence s (s[0] is the first input), predict s[1:] from its prefix.

    Returns per sequence: summed NLL (nats, an fp64 log-softmax of the logits), number of predicted tokens, and whether
    the argmax was right at each of the last `last_k[i]` positions (True when last_k[i] == 0).
    scored: per sequence, a flag per predicted token (len(s) - 1); only flagged tokens are counted.
    Sequences are right-padded per batch (longest first); a causal model never sees the padding.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    nll, count, ok = [0.0] * len(seqs), [0] * len(seqs), [True] * len(seqs)
    for b in range(0, len(order), batch_size):
        ids = [i for i in order[b : b + batch_size] if len(seqs[i]) > 1]
        if not ids:
            continue
        T = len(seqs[ids[0]]) - 1
        inp = torch.full((len(ids), T), EOT, dtype=torch.long)
        tgt = torch.full((len(ids), T), _IGNORE, dtype=torch.long)
        check = torch.zeros(len(ids), T, dtype=torch.bool)  # positions whose argmax must be right
        for row, i in enumerate(ids):
            s = seqs[i]
            n = len(s) - 1
            inp[row, :n] = torch.tensor(s[:-1])
            tgt[row, :n] = torch.tensor(s[1:])
            if scored is not None:
                tgt[row, :n][~torch.tensor(scored[i], dtype=torch.bool)] = _IGNORE
            check[row, n - last_k[i] : n] = True
        inp, tgt, check = inp.to(device), tgt.to(device), check.to(device)
        row_nll = torch.zeros(len(ids), dtype=torch.float64, device=device)
        row_ok = torch.ones(len(ids), dtype=torch.bool, device=device)
        for logp, wrong in _scored_chunks(model, inp, tgt, check, chunk_len):
            row_nll -= logp.sum(dim=1)  # fp64 log-softmax: exact on confident text
            row_ok &= ~wrong.any(dim=1)
        for row, i in enumerate(ids):
            n = len(seqs[i]) - 1 if scored is None else sum(scored[i])
            nll[i], count[i], ok[i] = row_nll[row].item(), n, bool(row_ok[row])
    return nll, count, ok


def _lambada_sequence(doc: list[int], tokenizer, n: int) -> tuple[list[int], int]:
    """[0] + encode(context) + encode(" " + last_word) and the number of last-word tokens."""
    text = tokenizer.decode(doc)
    cut = text.rfind(" ")
    if cut < 0 or cut == len(text) - 1:
        raise UserError(f"eval data: document {n} has no last word after a space (LAMBADA accuracy needs one)")
    target = tokenizer.encode(text[cut:])
    return [EOT] + tokenizer.encode(text[:cut]) + target, len(target)


def evaluate(
    model: nn.Module,
    docs: list[list[int]],
    batch_size: int = 8,
    lambada: bool = False,
    tokenizer=None,
    chunk_len: int = 512,
    masks: list[list[bool]] | None = None,
) -> dict:
    """Score `docs` (token ids, without the leading 0) with `model` (idx [B, T] -> logits [B, T, V];
    for documents longer than chunk_len also `model(idx, state, return_state=True)`).

    masks: per document, which of its tokens are scored (sft/chat: those that carry loss in
    training, see `load_eval_data`); None scores every token.
    Returns {"loss": mean NLL per predicted token (nats), "ppl": exp(loss), "tokens": number of
    predicted tokens, "acc": LAMBADA last-word accuracy or None}. `lambada=True` needs `tokenizer`
    (encode/decode). The model runs in eval mode (dropout off) and is restored afterwards.
    """
    if lambada and tokenizer is None:
        raise ValueError("evaluate: lambada=True needs the tokenizer to find each document's last word")
    if lambada and masks is not None:
        raise UserError("--lambada scores the last word of plain text; sft/chat data are scored on their replies")
    if masks is not None and [len(m) for m in masks] != [len(d) for d in docs]:
        raise ValueError("evaluate: masks must have one flag per token of each document")
    seqs = [[EOT] + list(d) for d in docs]
    last_k = [0] * len(seqs)
    extra: list[tuple[int, list[int], int]] = []  # (doc index, separate accuracy sequence, k)
    if lambada:
        for n, d in enumerate(docs):
            seq, k = _lambada_sequence(list(d), tokenizer, n)
            if seq == seqs[n]:
                last_k[n] = k
            else:
                extra.append((n, seq, k))
    was_training = model.training
    model.eval()
    try:
        nll, count, ok = score_sequences(
            model, seqs + [s for _, s, _ in extra], last_k + [k for _, _, k in extra], batch_size, chunk_len,
            scored=None if masks is None else [list(m) for m in masks],
        )
    finally:
        model.train(was_training)
    tokens = sum(count[: len(seqs)])
    if tokens == 0:
        what = "every document is empty" if masks is None else "no document has a response or assistant reply"
        raise UserError(f"eval data: no tokens to score ({what})")
    loss = sum(nll[: len(seqs)]) / tokens
    acc = None
    if lambada:
        correct = [ok[n] for n in range(len(seqs)) if last_k[n]] + list(ok[len(seqs) :])
        acc = sum(correct) / len(docs)
    ppl = math.exp(loss) if loss < math.log(float.fromhex("0x1p1023")) else math.inf
    return {"loss": loss, "ppl": ppl, "tokens": tokens, "acc": acc}


@dataclass
class EvalData:
    """Documents to score: token ids (without the leading 0), and for sft/chat which of them are scored."""

    kind: str
    docs: list[list[int]]
    masks: list[list[bool]] | None


def load_eval_data(path: str | os.PathLike, tokenizer, kind: str = "auto", system: str | None = None,
                   limit: int | None = None, data_config=None) -> EvalData:
    """A .jsonl / .json / .parquet file as `evaluate` input, kind guessed as `data.kind: auto` does.

    text: `encode(text)` per record, every token scored (as before: no end-of-text predicted after it).
    sft / chat (incl. ShareGPT `conversations`): rendered, tokenized and masked by the training code
    (`data.formats.encode_records`, `system` as `data.system`): each document ends with end-of-text and
    only the tokens training takes loss on are scored. limit: keep the first N records. data_config: a
    training run's `DataConfig`, whose field names and templates render the file (its kind is still found
    from the file itself: a text eval file beside sft training data is scored as text)."""
    from itertools import islice

    from ..data.config import DataConfig
    from ..data.dataset import resolve_format
    from ..data.formats import TextFormat, encode_records
    from ..data.records import encode_checked, get_str, iter_records

    if data_config is not None:
        cfg = data_config.model_copy(update={"path": str(path), "kind": kind, "eval_path": None, "eval_split": None})
    else:
        cfg = DataConfig(path=str(path), kind=kind, system=system)
    found, fmt = resolve_format(cfg)
    if fmt is None:
        raise UserError(f"{path}: eval reads .jsonl / .json / .parquet records, not a binidx pair ({found})")
    records = list(islice(iter_records(path), limit))
    if not records:
        raise UserError(f"{path}: no records (empty dataset)")
    if isinstance(fmt, TextFormat):
        docs = [encode_checked(tokenizer, get_str(rec, fmt.field, where), where) for where, rec in records]
        if not any(docs):  # found before the model loads, the file named
            raise UserError(f"{path}: no tokens to score (every {fmt.field!r} is empty)")
        return EvalData(found, docs, None)
    tokens, mask, sizes = encode_records(fmt, tokenizer, records, np.int64, batched=False)
    assert mask is not None
    ends = np.cumsum(sizes)
    docs = [tokens[e - n : e].tolist() for e, n in zip(ends, sizes, strict=True)]
    masks = [mask[e - n : e].tolist() for e, n in zip(ends, sizes, strict=True)]
    return EvalData(found, docs, masks)
