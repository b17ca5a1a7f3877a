"""The recipe's `data:` section: where the training data is and how it becomes samples of `ctx_len` tokens."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator
from typing_extensions import Self

from ..config_base import ConfigModel, Number, Wording, invalid

Kind = Literal["auto", "text", "sft", "chat", "binidx", "preference", "prompts"]
Sampling = Literal["auto", "get", "pad"]
Overflow = Literal["split", "truncate"]
KINDS: tuple[str, ...] = get_args(Kind)
SAMPLINGS: tuple[str, ...] = get_args(Sampling)
OVERFLOWS: tuple[str, ...] = get_args(Overflow)


def _not_blank(v: str) -> str:
    if not v.strip():
        raise invalid(f"{{key}}: must be a non-empty string, got {v!r}")
    return v


Name = Annotated[str, AfterValidator(_not_blank)]

# data.group_by_length's refusals (after "data.group_by_length: "): at load where kind/sampling say so, in
# make_dataset / make_prompt_data where kind auto resolves to them
NOT_PROMPTS = ("applies to pad sampling and preference pairs, not to GRPO's prompts (each completion is cut at its "
               "batch's longest already); drop it")


def not_get(how: str) -> str:
    return (f"applies to pad sampling and preference pairs; {how} (every window is ctx_len tokens: nothing to "
            f"group); set data.sampling: pad or drop group_by_length")


class DataConfig(ConfigModel):
    """Where the training data is and how it becomes samples. Bad fields are UserErrors "data.<field>: ..."."""

    section: ClassVar[str] = "data"
    wording: ClassVar[Wording] = Wording(
        "{key}: must be {allowed}, got {value}", "{key}: must be {allowed}, got {value}",
        "{key}: {value} is not one of {choices}",
    )

    path: Name = Field(description="a .jsonl / .json / .parquet file, or a binidx PREFIX (PREFIX.bin + PREFIX.idx)")
    kind: Kind = Field("auto", description=(
        "auto guesses: a binidx pair -> binidx, else from the first record: messages_field or ShareGPT "
        "conversations -> chat, text_field -> text, chosen_field + rejected_field -> preference, known "
        "prompt/response fields -> sft"))
    tokenizer: Name = Field("world", description="world, or a path to a tokenizer.json (unused for binidx)")
    ctx_len: int = Field(512, gt=0, description=(
        "tokens per sample (the model sees ctx_len inputs and predicts ctx_len targets)"))
    sampling: Sampling = Field("auto", description=(
        "get: RWKV-LM's random windows of ctx_len+1 tokens over the concatenated token stream; pad: one "
        "document (or one piece of a long one) per sample, right-padded; auto: get for text/binidx, pad for sft/chat"))
    overflow: Overflow = Field("split", description=(
        "pad sampling: documents longer than ctx_len are split into consecutive pieces (every token trained "
        "once) or cut after ctx_len tokens"))
    group_by_length: bool = Field(False, description=(
        "pad sampling and preference pairs: each micro-batch takes samples of similar length (runs of up to 50 "
        "micro-batches sorted by length, their order shuffled), so less padding is computed; an epoch sees the same "
        "samples in another order (as transformers' group_by_length)"))
    eval_path: Name | None = Field(None, description=(
        "held-out records scored during training, their kind found from the file (text: every token; sft/chat: "
        "rendered like data.path, their loss tokens only, as eval --data scores them); for kind preference, "
        "held-out pairs like data.path"))
    eval_split: Number | None = Field(None, ge=0, lt=0.5, description=(
        "share of the documents (preference: pairs) held out of training and scored as the eval set, every kind "
        "(sft/chat: on their loss tokens); default 0.02 without an eval_path; not with one"))
    text_field: Name = Field("text", description="the text key for kind text")
    prompt_fields: list[str] | None = Field(None, description=(
        "sft prompt keys (one name or a list); unset: guessed from the first record among instruction+input/output, "
        "query/response, prompt/response, prompt/completion, question/answer, input/output"))
    response_field: Name | None = Field(None, description="sft response key; unset: guessed with prompt_fields")
    prompt_template: str = Field("User: {prompt}\n\nAssistant:", description=(
        "sft rendering of the prompt ({prompt} is replaced by the record's text); with the default response_template "
        "this is the World chat format, so an sft pair trains like a one-turn chat"))
    response_template: str = Field(" {response}\n\n", description=(
        "sft rendering of the response; loss is taken on it and on end-of-text"))
    system: str | None = Field(None, description=(
        "system message, rendered 'System: ...' first (sft, and chat records that have none)"))
    messages_field: Name = Field("messages", description=(
        "the chat key: a list of {role, content}; records without it are read from ShareGPT's conversations "
        "(a list of {from, value}, from human, gpt or system)"))

    chosen_field: Name = Field("chosen", description=(
        "preference: the preferred response (a string, or a list of chat messages {role, content})"))
    rejected_field: Name = Field("rejected", description=(
        "preference: the dispreferred response (a string, or a list of chat messages {role, content}); the "
        "prompt comes from prompt_fields (default prompt: a string rendered with prompt_template, or chat messages)"))

    @model_validator(mode="after")
    def _one_eval_set(self) -> Self:
        if self.eval_split and self.eval_path:
            raise invalid(f"{{key}}: {self.eval_split} holds out part of data.path for eval, but data.eval_path names "
                          f"an eval file; give one of them (data.eval_path=null holds out instead)", "eval_split")
        return self

    @model_validator(mode="after")
    def _groupable(self) -> Self:
        if not self.group_by_length:
            return self
        if self.kind == "prompts":
            raise invalid("{key}: " + NOT_PROMPTS, "group_by_length")
        if self.sampling == "get" or (self.sampling == "auto" and self.kind in ("text", "binidx")):
            how = "data.sampling is get" if self.sampling == "get" else f"kind {self.kind} is read with get sampling"
            raise invalid("{key}: " + not_get(how), "group_by_length")
        return self

    @field_validator("prompt_fields", mode="before")
    @classmethod
    def _field_names(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if v is not None and (not isinstance(v, list) or not v or not all(isinstance(f, str) and f for f in v)):
            raise invalid(f"{{key}}: must be a non-empty list of field names, got {v!r}")
        return v

    @field_validator("prompt_template", "response_template")
    @classmethod
    def _one_slot(cls, v: str, info: ValidationInfo) -> str:
        slot = "{prompt}" if info.field_name == "prompt_template" else "{response}"
        if v.count(slot) != 1:
            raise invalid(f"{{key}}: must be a string containing {slot} exactly once, got {v!r}")
        return v
