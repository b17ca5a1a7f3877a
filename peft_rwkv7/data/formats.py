"""Data kinds as text segments with a loss flag, and their tokenization into documents.

A record renders to segments `[(text, carries_loss), ...]`; adjacent segments with the same flag
are joined and each run is encoded on its own (so the loss boundary is a token boundary, and a
prompt is tokenized exactly as it will be at inference: `"User: ...\\n\\nAssistant:"` in one
piece). Every document then ends with end-of-text (0), which carries loss iff the last segment
does: text and sft always, chat when the conversation ends with an assistant turn.

- text: `{"text": ...}`, every token carries loss.
- sft: `[System: {system}\\n\\n] + prompt_template + response_template`; loss on the response.
- chat: RWKV World chat format, `User: ...\\n\\n`, `System: ...\\n\\n`, `Assistant: ...\\n\\n`;
  loss on each assistant reply (the text after `Assistant:`, from its leading space through the
  closing blank line). Contents are stripped and blank lines inside them collapse to one newline,
  because a blank line is the World format's turn separator. Messages are `{"role", "content"}`
  (user/assistant/system) or ShareGPT's `{"from", "value"}` (human/gpt/system), usually under
  `conversations`. `infer/chat.py` renders conversations at inference with this same class.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import chain

import numpy as np

from ..errors import UserError
from .records import get_str, json_type

Segments = list[tuple[str, bool]]

# (prompt fields, response field) pairs tried in order when data.kind is sft and the fields are unset.
SFT_FIELD_SETS = (
    (("instruction", "input"), "output"),
    (("query",), "response"),
    (("prompt",), "response"),
    (("prompt",), "completion"),
    (("question",), "answer"),
    (("input",), "output"),
)
ROLES = ("user", "assistant", "system")
SHAREGPT_FIELD = "conversations"  # ShareGPT's list of {"from", "value"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
ASSISTANT_PROMPT = "Assistant:"  # what the model reads before it writes a reply
_EOT = (0,)
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


def clean_turn(text: str) -> str:
    """Chat content as the World format needs it: stripped, no blank lines inside."""
    return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n").strip())


@dataclass(frozen=True)
class TextFormat:
    field: str = "text"
    has_mask = False

    def segments(self, rec: dict, where: str) -> Segments:
        return [(get_str(rec, self.field, where), True)]


@dataclass(frozen=True)
class SftFormat:
    """Prompt fields that are missing or empty are skipped; the rest are stripped and joined by
    a newline into `{prompt}`. The response (stripped) fills `{response}`."""

    prompt_fields: tuple[str, ...]
    response_field: str
    prompt_template: str = "User: {prompt}\n\nAssistant:"
    response_template: str = " {response}\n\n"
    system: str | None = None
    has_mask = True

    def segments(self, rec: dict, where: str) -> Segments:
        parts = []
        for f in self.prompt_fields:
            if f in rec and rec[f] is not None:
                parts.append(get_str(rec, f, where).strip())
        if not any(f in rec for f in self.prompt_fields):
            names = ", ".join(map(repr, self.prompt_fields))
            raise UserError(f"{where}: missing prompt field {names} (keys: {', '.join(map(repr, rec))})")
        prompt = "\n".join(p for p in parts if p)
        response = get_str(rec, self.response_field, where).strip()
        segs: Segments = [(f"System: {clean_turn(self.system)}\n\n", False)] if self.system else []
        segs.append((self.prompt_template.replace("{prompt}", prompt), False))
        segs.append((self.response_template.replace("{response}", response), True))
        return segs


def chat_field(messages_field: str, rec: dict) -> str:
    """The key holding a record's conversation: `messages_field`, else ShareGPT's `conversations`."""
    return SHAREGPT_FIELD if messages_field not in rec and SHAREGPT_FIELD in rec else messages_field


def _message(m: object, at: str) -> tuple[str, str]:
    """(role, content) of one message: {"role", "content"} or ShareGPT's {"from", "value"}."""
    if not isinstance(m, dict):
        raise UserError(f"{at} must be an object with 'role' and 'content' (or ShareGPT 'from' and 'value'), "
                        f"got {json_type(m)}")
    if "role" not in m and "from" in m:
        sender = get_str(m, "from", at)
        if sender not in SHAREGPT_ROLES:
            raise UserError(f"{at}: from {sender!r} is not one of {', '.join(SHAREGPT_ROLES)}")
        return SHAREGPT_ROLES[sender], get_str(m, "value", at)
    role = get_str(m, "role", at)
    content = get_str(m, "content", at)
    if role not in ROLES:
        raise UserError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
    return role, content


@dataclass(frozen=True)
class ChatFormat:
    """`system` is prepended when a conversation has no system message of its own."""

    messages_field: str = "messages"
    system: str | None = None
    has_mask = True

    def segments(self, rec: dict, where: str) -> Segments:
        field = chat_field(self.messages_field, rec)
        msgs = rec.get(field)
        if field not in rec:
            raise UserError(f"{where}: missing field {field!r} (keys: {', '.join(map(repr, rec))})")
        if not isinstance(msgs, list):
            raise UserError(f"{where}: field {field!r} must be an array, got {json_type(msgs)}")
        if not msgs:
            raise UserError(f"{where}: field {field!r} is empty")
        turns = [_message(m, f"{where}: {field}[{j}]") for j, m in enumerate(msgs)]
        segs: Segments = []
        for role, text in turns:
            content = clean_turn(text)
            if role == "assistant":
                segs += [(ASSISTANT_PROMPT, False), (f" {content}\n\n", True)]
            else:
                segs.append((f"{role.capitalize()}: {content}\n\n", False))
        if self.system and not any(role == "system" for role, _ in turns):
            segs.insert(0, (f"System: {clean_turn(self.system)}\n\n", False))
        return segs


def merge(segs: Segments) -> Segments:
    out: Segments = []
    for text, loss in segs:
        if out and out[-1][1] == loss:
            out[-1] = (out[-1][0] + text, loss)
        else:
            out.append((text, loss))
    return out


def encode_segments(tokenizer, segs: Segments) -> tuple[list[int], list[bool]]:
    """One rendered document as `encode_records` tokenizes it, without the end-of-text: runs of
    equal loss flag joined and encoded on their own. Returns (token ids, loss flag per token)."""
    ids: list[int] = []
    flags: list[bool] = []
    for text, loss in merge(segs):
        piece = tokenizer.encode(text)
        ids += piece
        flags += [loss] * len(piece)
    return ids, flags


def encode_records(fmt, tokenizer, records, dtype, batched: bool = True
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Render and tokenize `records` [(where, rec)] into documents, each ending with 0.

    batched: use tokenizer.encode_batch (multi-threaded; not in forked workers, see build.py).
    Returns (tokens [total] `dtype`, loss mask [total] bool or None for text, sizes [docs] int32).
    """
    rendered = [merge(fmt.segments(rec, where)) for where, rec in records]
    texts = [t for segs in rendered for t, _ in segs]
    try:
        ids = tokenizer.encode_batch(texts) if batched else [tokenizer.encode(t) for t in texts]
    except UnicodeEncodeError:
        for (where, _), segs in zip(records, rendered, strict=True):
            for t, _ in segs:
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError:
                    raise UserError(f"{where}: text contains an unpaired surrogate (not valid Unicode)") from None
        raise
    parts: list = []  # token lists, each document followed by (0,)
    lengths: list[int] = []
    flags: list[bool] = []
    sizes = np.empty(len(rendered), np.int32)
    k = 0
    for d, segs in enumerate(rendered):
        n = 1
        for _, loss in segs:
            parts.append(ids[k])
            lengths.append(len(ids[k]))
            flags.append(loss)
            n += len(ids[k])
            k += 1
        parts.append(_EOT)
        lengths.append(1)
        flags.append(segs[-1][1] if segs else False)  # end-of-text carries loss iff the last segment does
        sizes[d] = n
    tokens = np.fromiter(chain.from_iterable(parts), dtype, int(sizes.sum(dtype=np.int64)))
    mask = np.repeat(np.array(flags, bool), lengths) if fmt.has_mask else None
    return tokens, mask, sizes
