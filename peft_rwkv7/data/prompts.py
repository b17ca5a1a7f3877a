"""`data.kind: prompts`: the prompts a GRPO run samples completions for, with the columns its rewards read.

A record is `{"prompt": "...", ...}` (rendered with data.prompt_template, as sft renders its prompts) or a
chat prompt `{"messages": [...]}` / ShareGPT `conversations` (rendered by ChatFormat, then "Assistant:"), plus
any other keys (`answer`, ...), handed to the reward functions as columns. Prompts are few and short, so
they live in memory; `batch(...)` addresses them like TrainData's samples: a pure function of the step.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import UserError
from .config import NOT_PROMPTS, DataConfig
from .formats import ASSISTANT_PROMPT, ChatFormat, clean_turn
from .records import check_file, iter_records

PROMPT_STREAM = 0x9120  # the seeded stream that orders prompts (its own, so other draws do not move it)
EVAL_STREAM = 0x9121


class PromptData:
    """Rendered prompts (text and token ids) and their columns; `batch` -> prompt indices of a micro-batch."""

    kind = "prompts"

    def __init__(self, texts: list[str], ids: list[list[int]], columns: list[dict], seed: int, source: str,
                 wheres: list[str] | None = None):
        self.texts, self.ids, self.columns, self.seed, self.source = texts, ids, columns, seed, source
        self.wheres = wheres or [f"{source}: prompt {i + 1}" for i in range(len(ids))]  # each prompt's file:line
        self.whole: PromptData | None = None  # the file's prompts a subset was cut from (data.eval_split)
        self.held_out: PromptData | None = None
        self.eval_note = ""

    @property
    def num_docs(self) -> int:
        return len(self.ids)

    num_samples = num_docs

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.ids))

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, PROMPT_STREAM, epoch]).permutation(self.num_docs)

    def index(self, i: int) -> int:
        """The prompt of global sample i: epoch i // n in a seeded order of its own."""
        n = self.num_docs
        return int(self._order(i // n)[i % n])

    def batch(self, step: int, micro_step: int, micro_bsz: int, grad_accum: int, rank: int = 0,
              world_size: int = 1) -> list[int]:
        """Prompt indices of one micro-batch of one rank (the global sample numbering of TrainData.batch)."""
        base = ((step * grad_accum + micro_step) * world_size + rank) * micro_bsz
        return [self.index(base + j) for j in range(micro_bsz)]

    def subset(self, keep: list[int]) -> PromptData:
        part = PromptData([self.texts[i] for i in keep], [self.ids[i] for i in keep],
                          [self.columns[i] for i in keep], self.seed, self.source, [self.wheres[i] for i in keep])
        part.whole = self.whole or self
        return part

    def file_records(self) -> list[tuple[str, dict]]:
        """(where, columns) of every prompt of the file this data came from, in file order, held-out share
        included (what the rewards' checks read, without reading the file again)."""
        whole = self.whole or self
        return list(zip(whole.wheres, whole.columns, strict=True))


def render_prompt(rec: dict, cfg: DataConfig, where: str) -> str:
    """The text the model reads before its completion."""
    fields = cfg.prompt_fields or ["prompt"]
    present = [f for f in fields if f in rec and rec[f] is not None]
    if not present and (null := next((f for f in fields if f in rec), None)) is not None:
        raise UserError(f"{where}: field {null!r} is null, expected the prompt's text")
    if present and not isinstance(rec[present[0]], list):
        if bad := next((f for f in present if isinstance(rec[f], (dict, list, bool))), None):
            raise UserError(f"{where}: field {bad!r} is a {type(rec[bad]).__name__}, expected text "
                            f"(got {json.dumps(rec[bad])[:40]})")
        text = "\n".join(str(rec[f]).strip() for f in present if str(rec[f]).strip())
        if not text:
            raise UserError(f"{where}: field {present[0]!r} is empty")
        system = f"System: {clean_turn(cfg.system)}\n\n" if cfg.system else ""
        return system + cfg.prompt_template.replace("{prompt}", text)
    messages = rec[present[0]] if present else None
    chat_rec = {cfg.messages_field: messages} if messages is not None else rec
    if messages is None and cfg.messages_field not in rec and "conversations" not in rec:
        names = ", ".join(repr(f) for f in [*fields, cfg.messages_field])
        raise UserError(f"{where}: a prompts record needs {names} or ShareGPT 'conversations' "
                        f"(keys: {', '.join(map(repr, rec))})")
    segs = ChatFormat(messages_field=cfg.messages_field, system=cfg.system).segments(chat_rec, where)
    return "".join(text for text, _ in segs) + ASSISTANT_PROMPT


def _columns(rec: dict, cfg: DataConfig) -> dict:
    skip = {*(cfg.prompt_fields or ["prompt"]), cfg.messages_field, "conversations"}
    return {k: v for k, v in rec.items() if k not in skip}


def load_prompts(path: str, cfg: DataConfig, tokenizer, seed: int, max_prompt_tokens: int,
                 vocab_size: int | None = None) -> PromptData:
    """Every record of `path` rendered and tokenized; a prompt longer than max_prompt_tokens is a UserError
    naming its line (the completion needs the rest of data.ctx_len)."""
    check_file(path)
    texts, ids, columns, wheres = [], [], [], []
    for where, rec in iter_records(path):
        text = render_prompt(rec, cfg, where)
        toks = tokenizer.encode(text)
        if len(toks) > max_prompt_tokens:
            raise UserError(f"{where}: the prompt is {len(toks)} tokens; data.ctx_len minus "
                            f"train.grpo.max_new_tokens leaves {max_prompt_tokens}")
        if vocab_size is not None and toks and max(toks) >= vocab_size:
            raise UserError(f"{where}: token id {max(toks)} is outside the model's vocabulary ({vocab_size})")
        texts.append(text)
        ids.append(toks)
        columns.append(_columns(rec, cfg))
        wheres.append(where)
    if not ids:
        raise UserError(f"{path}: no prompts (empty file)")
    keys = set(columns[0])
    for where, cols in zip(wheres, columns, strict=True):
        if set(cols) != keys:
            raise UserError(f"{where}: has columns {sorted(cols)}, the first record {sorted(keys)}; every prompt "
                            f"needs the same columns (the rewards read them)")
    return PromptData(texts, ids, columns, seed, str(path), wheres)


def make_prompt_data(cfg: DataConfig, tokenizer, seed: int, max_prompt_tokens: int,
                     vocab_size: int | None = None) -> PromptData:
    """The run's prompts; held out: data.eval_path's prompts, else data.eval_split's share (default 2%)."""
    from .dataset import eval_count

    if cfg.group_by_length:
        raise UserError(f"data.group_by_length: {NOT_PROMPTS}")
    data = load_prompts(cfg.path, cfg, tokenizer, seed, max_prompt_tokens, vocab_size)
    if cfg.eval_path:
        data.held_out = load_prompts(cfg.eval_path, cfg, tokenizer, seed, max_prompt_tokens, vocab_size)
        return data
    n_eval, data.eval_note = eval_count(cfg, data.num_docs, "prompts")
    if n_eval:
        held = set(np.random.default_rng([seed, EVAL_STREAM]).permutation(data.num_docs)[:n_eval].tolist())
        rest = data.subset([i for i in range(data.num_docs) if i not in held])
        rest.held_out = data.subset(sorted(held))
        return rest
    return data
