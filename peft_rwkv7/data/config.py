"""The recipe's `data:` section."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

KINDS = ("auto", "text", "sft", "chat", "binidx")
SAMPLINGS = ("auto", "get", "pad")
OVERFLOWS = ("split", "truncate")


@dataclass
class DataConfig:
    """Where the training data is and how it becomes samples of `ctx_len` tokens.

    path: a .jsonl / .json / .parquet file, or a binidx PREFIX (PREFIX.bin + PREFIX.idx).
    kind: text | sft | chat | binidx; `auto` guesses: a binidx pair -> binidx, else from the first
        record: `messages_field` -> chat, `text_field` -> text, known prompt/response fields -> sft.
    tokenizer: `world` or a path to a tokenizer.json (unused for binidx, already tokenized).
    ctx_len: tokens per sample (the model sees ctx_len inputs and predicts ctx_len targets).
    sampling: get = RWKV-LM's random windows of ctx_len+1 tokens over the concatenated token
        stream; pad = one document (or one piece of a long one) per sample, right-padded.
        auto = get for text/binidx, pad for sft/chat.
    overflow: pad sampling only: documents longer than ctx_len are split into consecutive pieces
        (`split`, every token trained once) or cut after ctx_len tokens (`truncate`).
    eval_path: optional held-out `{"text": ...}` jsonl for evaluation during training.
    text_field: the text key for kind text.
    prompt_fields / response_field: sft keys; unset = guessed from the first record among
        instruction+input/output, query/response, prompt/response, prompt/completion,
        question/answer, input/output.
    prompt_template / response_template: sft rendering; `{prompt}` / `{response}` are replaced by
        the record's text. The defaults give the World chat format, so an sft pair trains exactly
        like a one-turn chat. Loss is taken on the rendered response and end-of-text.
    system: optional system message, rendered `System: ...\\n\\n` first (sft, and chat records
        that have no system message).
    messages_field: the conversation key for kind chat (a list of {role, content}).
    """

    path: str
    kind: str = "auto"
    tokenizer: str = "world"
    ctx_len: int = 512
    sampling: str = "auto"
    overflow: str = "split"
    eval_path: str | None = None
    text_field: str = "text"
    prompt_fields: list[str] | None = None
    response_field: str | None = None
    prompt_template: str = "User: {prompt}\n\nAssistant:"
    response_template: str = " {response}\n\n"
    system: str | None = None
    messages_field: str = "messages"

    def validate(self) -> DataConfig:
        """UserError("data.<field>: ...") naming the first bad field and what it allows."""
        _check_str("path", self.path)
        _check_choice("kind", self.kind, KINDS)
        _check_choice("sampling", self.sampling, SAMPLINGS)
        _check_choice("overflow", self.overflow, OVERFLOWS)
        _check_str("tokenizer", self.tokenizer)
        if isinstance(self.ctx_len, bool) or not isinstance(self.ctx_len, int) or self.ctx_len < 1:
            raise UserError(f"data.ctx_len: must be a positive integer, got {self.ctx_len!r}")
        if self.eval_path is not None:
            _check_str("eval_path", self.eval_path)
        for name in ("text_field", "messages_field"):
            _check_str(name, getattr(self, name))
        if self.response_field is not None:
            _check_str("response_field", self.response_field)
        if self.prompt_fields is not None:
            pf = self.prompt_fields
            if isinstance(pf, str):
                pf = self.prompt_fields = [pf]
            if not isinstance(pf, (list, tuple)) or not pf or not all(isinstance(f, str) and f for f in pf):
                raise UserError(f"data.prompt_fields: must be a non-empty list of field names, got {pf!r}")
        for name, slot in (("prompt_template", "{prompt}"), ("response_template", "{response}")):
            t = getattr(self, name)
            if not isinstance(t, str) or t.count(slot) != 1:
                raise UserError(f"data.{name}: must be a string containing {slot} exactly once, got {t!r}")
        if self.system is not None and not isinstance(self.system, str):
            raise UserError(f"data.system: must be a string, got {self.system!r}")
        return self


def _check_str(name: str, v: object) -> None:
    if not isinstance(v, str) or not v.strip():
        raise UserError(f"data.{name}: must be a non-empty string, got {v!r}")


def _check_choice(name: str, v: object, allowed: tuple[str, ...]) -> None:
    if v not in allowed:
        raise UserError(f"data.{name}: {v!r} is not one of {', '.join(allowed)}")
