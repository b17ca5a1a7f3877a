"""Data tab: open a data file as training reads it — the detected kind, the first records, the tokens that carry
loss (the mask training builds) and the trainer's data summary line — and build a binidx pair.

Calls: data.DataConfig (the recipe's `data:` checks), path_checks (the checks `rwkv-peft train` / `data build`
make), data.load_tokenizer, data.dataset.resolve_format (data.kind auto), data.formats.encode_records (rendering,
tokens and loss mask, as the training cache is written), data.dataset.make_dataset / data.prompts.make_prompt_data
(the run's data), train.loop.data_summary (the line the trainer prints), data.build_binidx (`rwkv-peft data build`).
"""

from __future__ import annotations

import html
from itertools import islice
from pathlib import Path

from ..errors import UserError
from ..path_checks import need_data, need_output, need_path, need_tokenizer
from .app import error_html
from .texts import LANGS, text

PREVIEW_RECORDS = 5  # records shown as JSON
PREVIEW_DOCS = 2  # documents shown token by token
MAX_TOKENS = 400  # tokens shown per document
EOT_SHOWN = "<|eot|>"  # end-of-text (token 0) decodes to nothing; shown, as it can carry loss
COLORS = {"loss": "#6cc070", "context": "#d0d0d0"}


def session_lang(value: str | None, key: str) -> str:
    """The page's language now, from a hidden probe showing text `key` (see `probe`); ui.lang is the start-up
    language, shared by every browser."""
    return next((lang for lang in LANGS if text(lang, key) == value), LANGS[0])


def probe(ui, key: str):
    """A hidden textbox showing text `key` in the page's language: the language switch relabels it, so its value
    (an event input) tells a handler the language, and its change event follows the switch."""
    import gradio as gr

    return ui.label(gr.Textbox(ui.t(key), visible=False), key, "value")


def one_line(exc: Exception) -> str:
    """An error as the CLI prints it: a UserError's text, else the first line of the message."""
    msg = str(exc).strip()
    return msg.splitlines()[0] if msg else type(exc).__name__


def data_config(path: str, kind: str, tokenizer: str, ctx_len):
    """The form as the recipe's `data:` section (its one-line errors: data.ctx_len, data.kind, ...)."""
    from ..data import DataConfig

    ctx = int(ctx_len) if isinstance(ctx_len, float) and ctx_len.is_integer() else ctx_len  # gr.Number
    return DataConfig(path=(path or "").strip(), kind=kind or "auto", tokenizer=(tokenizer or "").strip(),
                      ctx_len=ctx)


def summary_recipe(cfg):
    """A Recipe holding the form's data section and the default train section: data_summary reads only those two
    (steps, batch, epochs); the model is not part of the data, so the recipe is built without one."""
    from ..train.recipe import Recipe, TrainConfig

    return Recipe.model_construct(data=cfg, train=TrainConfig())


def _documents(kind: str, fmt, cfg, tokenizer, records: list) -> list[tuple[list[int], list[bool]]]:
    """The first documents as training renders them: (token ids, carries loss per token)."""
    import numpy as np

    if kind == "binidx":
        from ..data import MMapIndexedDataset

        ds = MMapIndexedDataset(cfg.path)
        return [(ds[i].tolist(), [True] * int(ds.sizes[i])) for i in range(min(PREVIEW_DOCS, len(ds)))]
    if kind == "prompts":  # GRPO trains on the sampled completions: the prompt is context only
        from ..data.prompts import render_prompt

        ids = [tokenizer.encode(render_prompt(rec, cfg, where)) for where, rec in records[:PREVIEW_DOCS]]
        return [(d, [False] * len(d)) for d in ids]
    if kind == "preference":  # the first pair: its chosen side, then its rejected side
        from ..data.preference import SIDES, preference_format

        fmts, recs = [preference_format(cfg, side) for side in SIDES], records[:1] * 2
    else:
        fmts, recs = [fmt] * PREVIEW_DOCS, records[:PREVIEW_DOCS]
    from ..data.formats import encode_records

    out = []
    for f, rec in zip(fmts, recs, strict=False):
        tokens, mask, _ = encode_records(f, tokenizer, [rec], np.int64, batched=False)
        out.append((tokens.tolist(), [True] * len(tokens) if mask is None else mask.tolist()))
    return out


def open_data(path: str, kind: str, tokenizer: str, ctx_len, cache_dir=None) -> dict:
    """Everything the tab shows of a data file: {"kind", "records", "docs", "tokenizer", "summary"}, and where the
    trainer would refuse the data as a whole (too few tokens for one sample, ...) its one line as "summary_error"
    in place of the summary. cache_dir: the data cache (default: the trainer's, so a run on this file then starts
    at once)."""
    from ..data import iter_records, load_tokenizer
    from ..data.dataset import resolve_format

    cfg = data_config(path, kind, tokenizer, ctx_len)
    need_data("data.path", cfg.path)
    need_tokenizer("data.tokenizer", cfg.tokenizer)
    tok = load_tokenizer(cfg.tokenizer)
    found, fmt = ("prompts", None) if cfg.kind == "prompts" else resolve_format(cfg)
    records = [] if found == "binidx" else list(islice(iter_records(cfg.path), PREVIEW_RECORDS))
    docs = _documents(found, fmt, cfg, tok, records)
    shown = [rec for _, rec in records]
    if found == "binidx":
        shown = [{"document": i, "tokens": len(ids), "text": tok.decode(ids)} for i, (ids, _) in enumerate(docs)]
    opened = {"kind": found, "records": shown, "docs": docs, "tokenizer": tok}
    try:
        opened["summary"] = summary(cfg, found, tok, cache_dir)
    except UserError as e:
        opened["summary_error"] = str(e)
    return opened


def summary(cfg, kind: str, tokenizer, cache_dir=None) -> str:
    """The line the trainer prints about its data (train.loop.data_summary) for the data training would read,
    with the recipe's default steps and batch."""
    from ..data import make_dataset
    from ..train.loop import data_summary

    recipe = summary_recipe(cfg)
    if kind == "prompts":
        from ..data.prompts import make_prompt_data

        room = cfg.ctx_len - recipe.train.grpo.max_new_tokens
        if room <= 0:
            raise UserError(f"train.grpo.max_new_tokens {recipe.train.grpo.max_new_tokens} leaves no room for a "
                            f"prompt in data.ctx_len {cfg.ctx_len}")
        data = make_prompt_data(cfg, tokenizer, recipe.train.seed, room)
    else:
        data = make_dataset(cfg, tokenizer, seed=recipe.train.seed, cache_dir=cache_dir, progress=False)
    return data_summary(recipe, data)


def token_pieces(tokenizer, ids: list[int], flags: list[bool], labels: tuple[str, str]) -> list[tuple[str, str]]:
    """(text, label) per token: labels[0] where it carries loss, labels[1] where not. A character split over
    several tokens is shown once, with the token that completes it; end-of-text as EOT_SHOWN."""
    out: list[tuple[str, str]] = []
    pending: list[int] = []
    for tid, flag in zip(ids, flags, strict=True):
        label = labels[0] if flag else labels[1]
        if tid == tokenizer.eot_id:
            if pending:
                out.append((tokenizer.decode(pending), label))
                pending = []
            out.append((EOT_SHOWN, label))
            continue
        pending.append(tid)
        piece = tokenizer.decode(pending)
        if piece and not piece.endswith("\ufffd"):
            out.append((piece, label))
            pending = []
    if pending:
        out.append((tokenizer.decode(pending), labels[0] if flags[-1] else labels[1]))
    return out


def highlighted(opened: dict, lang: str) -> list[tuple[str, str | None]]:
    """The first documents for gr.HighlightedText, each cut at MAX_TOKENS, separated by a blank line."""
    labels = (text(lang, "data.loss"), text(lang, "data.context"))
    out: list[tuple[str, str | None]] = []
    for n, (ids, flags) in enumerate(opened["docs"]):
        if n:
            out.append(("\n\n", None))
        out += token_pieces(opened["tokenizer"], ids[:MAX_TOKENS], flags[:MAX_TOKENS], labels)
        if len(ids) > MAX_TOKENS:
            out.append((f" … (+{len(ids) - MAX_TOKENS} tokens)", None))
    return out


def color_map(lang: str) -> dict[str, str]:
    return {text(lang, f"data.{k}"): c for k, c in COLORS.items()}


def relabel_pieces(pieces, lang: str) -> list[tuple[str, str | None]] | None:
    """Shown tokens with their labels in `lang` (the language switch keeps what is shown)."""
    if not pieces:
        return None
    names = {text(other, f"data.{k}"): text(lang, f"data.{k}") for other in LANGS for k in COLORS}
    out = []
    for piece in pieces:  # gr.HighlightedText hands its value back as {"token", "class_or_confidence"}
        token, label = (piece["token"], piece["class_or_confidence"]) if isinstance(piece, dict) else piece
        out.append((token, names.get(label, label)))
    return out


def kind_line(chosen: str, found: str) -> str:
    return f"data.kind: {chosen} -> {found}" if chosen == "auto" else f"data.kind: {found}"


def build_data(path: str, out: str, tokenizer: str) -> dict:
    """`rwkv-peft data build PATH --out OUT --tokenizer T`: the CLI's checks, then data.build_binidx."""
    from ..data import build_binidx

    path, out, tokenizer = (path or "").strip(), (out or "").strip(), (tokenizer or "").strip()
    if not path:
        raise UserError("data.path: give the data file to build from (jsonl, json or parquet)")
    need_path("INPUT", path)
    if not out:
        raise UserError("--out is required: the output prefix (writes PREFIX.bin and PREFIX.idx)")
    need_output("--out", out)
    for ext in (".bin", ".idx"):  # nothing a user made is written over (the CLI's data build would)
        if Path(out + ext).exists():
            raise UserError(f"--out {out}: {out}{ext} exists; pick another prefix (nothing is overwritten)")
    if not tokenizer:
        raise UserError("--tokenizer: give 'world' or a tokenizer.json file, got nothing")
    need_tokenizer("--tokenizer", tokenizer)
    return build_binidx(path, out, tokenizer_spec=tokenizer, progress=False)


def _caught(fn, *args):
    """(result, None), or (None, one-line error) for a bad input — never a traceback in the page."""
    try:
        return fn(*args), None
    except UserError as e:
        return None, str(e)
    except (OSError, RuntimeError, ValueError) as e:
        return None, one_line(e)


def on_open(path, kind, tokenizer, ctx_len, lang_value):
    opened, err = _caught(open_data, path, kind, tokenizer, ctx_len)
    if err is not None:
        return error_html(err), "", None, None
    lang = session_lang(lang_value, "data.loss")
    line = kind_line(kind, opened["kind"]) + "\n" + opened.get("summary", "")
    return (error_html(opened["summary_error"]) if "summary_error" in opened else "", line.strip(),
            opened["records"], highlighted(opened, lang))


def on_lang(lang_value, pieces):
    import gradio as gr

    lang = session_lang(lang_value, "data.loss")
    return gr.update(value=relabel_pieces(pieces, lang), color_map=color_map(lang))


def on_build(path, out, tokenizer, lang_value):
    stats, err = _caught(build_data, path, out, tokenizer)
    if err is not None:
        return error_html(err)
    line = text(session_lang(lang_value, "data.loss"), "data.built", out=(out or "").strip(), docs=stats["docs"],
                tokens=stats["tokens"])
    return f"<div>{html.escape(line)}</div>"


def build(ui) -> None:
    import gradio as gr

    from ..data.config import KINDS

    lang_value = probe(ui, "data.loss")
    with gr.Row():
        path = ui.label(gr.Textbox("data/demo/ship_log.jsonl", label=ui.t("data.path"), scale=3,
                                   elem_id="data-path"), "data.path")
        kind = ui.label(gr.Dropdown(list(KINDS), value="auto", label=ui.t("data.kind"), elem_id="data-kind"),
                        "data.kind")
        tokenizer = ui.label(gr.Textbox("world", label=ui.t("data.tokenizer"), elem_id="data-tokenizer"),
                             "data.tokenizer")
        ctx_len = ui.label(gr.Number(512, label=ui.t("data.ctx_len"), precision=0, minimum=1,
                                     elem_id="data-ctx-len"), "data.ctx_len")
    open_btn = ui.label(gr.Button(ui.t("data.open"), variant="primary", elem_id="data-open"), "data.open", "value")
    error = gr.HTML(elem_id="data-error")
    summary = ui.label(gr.Textbox(label=ui.t("data.summary"), lines=3, interactive=False, elem_id="data-summary"),
                       "data.summary")
    masks = ui.label(gr.HighlightedText(label=ui.t("data.masks"), show_legend=True, show_inline_category=False,
                                        combine_adjacent=False, elem_id="data-masks", color_map=color_map(ui.lang)),
                     "data.masks")
    records = ui.label(gr.JSON(label=ui.t("data.records"), elem_id="data-records"), "data.records")
    with gr.Row():
        out = ui.label(gr.Textbox("", label=ui.t("data.out"), placeholder="data/my_corpus", scale=3,
                                  elem_id="data-out"), "data.out")
        build_btn = ui.label(gr.Button(ui.t("data.build"), elem_id="data-build"), "data.build", "value")
    built = gr.HTML(elem_id="data-built")
    lang_value.change(on_lang, [lang_value, masks], masks)
    open_btn.click(on_open, [path, kind, tokenizer, ctx_len, lang_value], [error, summary, records, masks])
    build_btn.click(on_build, [path, out, tokenizer, lang_value], built)
