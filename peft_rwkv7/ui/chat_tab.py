"""Chat tab: a model with an adapter or tuned state, streaming replies, sampling controls, a system prompt, and
A/B: the base model answers the same message with the same seed beside the tuned one.

Calls what `rwkv-peft chat` calls: infer.load.load_for_inference (the model with --adapter), data.load_tokenizer,
infer.chat.ChatSession (the conversation format training uses, its sampler and seed).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from ..errors import UserError
from .app import error_html
from .data_tab import probe, session_lang

DEFAULT_MODEL = "data/demo/rwkv7-demo.pth"
DEFAULT_ADAPTER = "runs/state_tune"
LANG_KEY = "chat.empty"  # the probe's text: tells a handler the page's language
SEED_LIMIT = 2**63  # the sampler's generator takes a signed 64-bit seed


def number(flag: str, value, whole: bool = False) -> int | float:
    """A number box's value (gradio sends None for a cleared box) as the CLI flag `flag` takes it; a one-line
    UserError naming the flag where it is empty, not finite, or (whole) not a whole number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{flag}: expected {'a whole number' if whole else 'a number'}, got nothing")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag}: expected {'a whole number' if whole else 'a number'}, got {value!r}") from None
    if not whole:
        return x  # NaN and inf: check_sampling's own message
    if not math.isfinite(x) or x != int(x):
        raise UserError(f"{flag}: expected a whole number, got {value}")
    return int(x)


def sampling(max_tokens, temperature, top_p, seed) -> dict:
    """The sampling boxes as ChatSession's settings, each refused in one line naming its flag."""
    opts = {"max_tokens": number("--max-tokens", max_tokens, whole=True),
            "temperature": number("--temperature", temperature), "top_p": number("--top-p", top_p),
            "seed": number("--seed", seed, whole=True)}
    if not -SEED_LIMIT <= opts["seed"] < SEED_LIMIT:
        raise UserError(f"--seed: expected a whole number from -2**63 to 2**63-1, got {opts['seed']}")
    return opts


def _key(model: str, adapter: str | None) -> tuple:
    """The cache key of a chat model: ("chat", model, adapter or None), as typed less surrounding blanks."""
    return "chat", (model or "").strip(), (adapter or "").strip() or None


def load(ui, model: str, adapter: str | None, keep: tuple = ()):
    """The model, as the CLI's --model/--adapter (and its default --dtype auto) load it. Cached on the Ui, so a
    second chat with it starts at once; the cache holds the models of one chat only: loading another drops every
    cached model but this one and `keep` (keys ("chat", model, adapter), the other side of an A/B pair), before
    it loads, so a session that tries many models holds at most a pair."""
    from ..infer.load import load_for_inference
    from ..path_checks import need_model, need_path

    model, adapter = (model or "").strip(), (adapter or "").strip() or None
    if not model:
        raise UserError("model: give a model file (.pth, .st or an HF directory)")
    need_model("--model", model)  # the CLI's checks of --model and --adapter, in its words
    if adapter:
        need_path("--adapter", adapter)
    key = _key(model, adapter)
    if key not in ui.cache:
        for old in [k for k in ui.cache if k[0] == "chat" and k != key and k not in keep]:
            del ui.cache[old]
        try:
            ui.cache[key] = load_for_inference(model, adapter, dtype="auto", say=False)
        except (OSError, RuntimeError, ValueError) as e:  # as the CLI shows them: the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(first) from None
    return ui.cache[key]


def sessions(ui, cfg: tuple) -> dict:
    """{"tuned": ChatSession, "base": ChatSession or absent} for (model, adapter, tokenizer, system, max_tokens,
    temperature, top_p, seed, compare): both with the same seed, so A and B sample alike."""
    from ..data import load_tokenizer
    from ..infer.chat import ChatSession

    model, adapter, tok, system, max_tokens, temperature, top_p, seed, compare = cfg
    opts = {"system": (system or "").strip() or None, **sampling(max_tokens, temperature, top_p, seed)}
    tok = (tok or "").strip() or "world"
    if ("tokenizer", tok) not in ui.cache:
        ui.cache[("tokenizer", tok)] = load_tokenizer(tok)
    tokenizer = ui.cache[("tokenizer", tok)]
    pair = (_key(model, adapter), _key(model, None)) if compare else (_key(model, adapter),)
    out = {"tuned": ChatSession(load(ui, model, adapter, keep=pair), tokenizer, **opts)}
    if compare:
        out["base"] = ChatSession(load(ui, model, None, keep=pair), tokenizer, **opts)
    return out


def reply(ui, text: str | None, held, cfg: tuple):
    """The Send event: yields (tuned chat, base chat, held (config, sessions), message box, status) as the
    replies stream. Bad settings, a model that does not load, an empty message or a reply that fails midway are
    one error line in the status; the conversation shown so far stays."""
    import gradio as gr

    text = (text or "").strip()
    if not text:
        yield gr.update(), gr.update(), held, gr.update(), error_html(ui.t("chat.no_message"))
        return
    try:
        if held is None or held[0] != cfg:  # another model, adapter or setting: a new conversation
            held = (cfg, sessions(ui, cfg))
    except UserError as e:
        yield gr.update(), gr.update(), None, gr.update(), error_html(str(e))
        return
    chats = held[1]
    names = list(chats)
    shown = {n: [*chats[n].messages, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
             for n in names}
    streams = {n: chats[n].ask(text) for n in names}
    try:
        while streams:  # A and B stream side by side, a piece of each in turn
            for n in list(streams):
                piece = next(streams[n], None)
                if piece is None:
                    del streams[n]
                    shown[n] = [dict(m) for m in chats[n].messages]
                    if not shown[n][-1]["content"]:  # said so, not an empty bubble
                        shown[n][-1]["content"] = ui.t("chat.empty")
                else:
                    shown[n][-1]["content"] += piece
            yield shown["tuned"], shown.get("base", []), held, "", ""
    except (UserError, RuntimeError, ValueError, IndexError) as e:  # the model and tokenizer do not fit, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        yield shown["tuned"], shown.get("base", []), None, gr.update(), error_html(msg)
        return
    stats = chats["tuned"].last
    yield shown["tuned"], shown.get("base", []), held, "", html.escape(stats.describe())


def build(ui) -> None:
    import gradio as gr

    with gr.Row():
        model = ui.label(gr.Textbox(DEFAULT_MODEL, label=ui.t("chat.model"), elem_id="chat-model"), "chat.model")
        adapter = ui.label(gr.Textbox(DEFAULT_ADAPTER if Path(DEFAULT_ADAPTER).is_dir() else "",
                                      label=ui.t("chat.adapter"), elem_id="chat-adapter"), "chat.adapter")
        tokenizer = ui.label(gr.Textbox("world", label=ui.t("data.tokenizer"), elem_id="chat-tokenizer", scale=0,
                                        min_width=120), "data.tokenizer")
    with gr.Row():
        system = ui.label(gr.Textbox(label=ui.t("chat.system"), elem_id="chat-system"), "chat.system")
        compare = ui.label(gr.Checkbox(True, label=ui.t("chat.compare"), elem_id="chat-compare"), "chat.compare")
    with gr.Row():
        max_tokens = ui.label(gr.Number(64, precision=0, minimum=1, label=ui.t("chat.max_tokens"),
                                        elem_id="chat-max-tokens"), "chat.max_tokens")
        temperature = ui.label(gr.Slider(0, 2, 1.0, step=0.05, label=ui.t("chat.temperature"),
                                         elem_id="chat-temperature"), "chat.temperature")
        top_p = ui.label(gr.Slider(0.05, 1, 0.85, step=0.05, label=ui.t("chat.top_p"), elem_id="chat-top-p"),
                         "chat.top_p")
        seed = ui.label(gr.Number(0, precision=0, label=ui.t("chat.seed"), elem_id="chat-seed"), "chat.seed")
    with gr.Row():
        tuned_box = ui.label(gr.Chatbot(label=ui.t("chat.tuned"), elem_id="chat-tuned", height=320), "chat.tuned")
        base_box = ui.label(gr.Chatbot(label=ui.t("chat.base"), elem_id="chat-base", height=320), "chat.base")
    with gr.Row():
        message = ui.label(gr.Textbox(label=ui.t("chat.message"), elem_id="chat-message", scale=4), "chat.message")
        send = ui.label(gr.Button(ui.t("chat.send"), variant="primary", elem_id="chat-send", scale=0), "chat.send",
                        "value")
        clear = ui.label(gr.Button(ui.t("chat.clear"), elem_id="chat-clear", scale=0), "chat.clear", "value")
    status = gr.HTML("", elem_id="chat-status")
    lang_value = probe(ui, LANG_KEY)
    state = gr.State(None)  # (config, sessions) of this browser tab

    def on_send(text, held, lang_v, *cfg):
        yield from reply(ui.in_lang(session_lang(lang_v, LANG_KEY)), text, held, tuple(cfg))

    def on_clear():
        return [], [], None, ""

    cfg = [model, adapter, tokenizer, system, max_tokens, temperature, top_p, seed, compare]
    send.click(on_send, [message, state, lang_value, *cfg], [tuned_box, base_box, state, message, status])
    message.submit(on_send, [message, state, lang_value, *cfg], [tuned_box, base_box, state, message, status])
    clear.click(on_clear, None, [tuned_box, base_box, state, status])
