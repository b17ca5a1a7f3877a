"""`rwkv-peft ui`: the gradio page and its server. Each tab is a module with `build(ui)`; they share the `Ui`
below (where runs live, the trainer processes, the interface language and the components that follow it).

The page holds no logic of its own: the tabs call the functions the CLI calls (recipes, the runner's checks,
the trainer as the CLI in a process, evaluation, inference, export) and show their one-line errors.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UserError
from .runs import Trainers
from .texts import LANGS, text

CSS = """
.field-error input, .field-error textarea, .field-error select { border-color: #d03030 !important; }
.field-error [data-testid="block-info"], .field-error .info { color: #d03030; }
.ui-error { color: #d03030; font-weight: 600; }
#train-side { position: sticky; top: 8px; align-self: flex-start; }
"""


@dataclass
class Ui:
    """What every tab shares. `labelled` is every component whose text follows the language: (component, text
    key, property) — the language switch updates them all in one event."""

    runs_dir: Path
    lang: str = "en"
    trainers: Trainers = field(default_factory=Trainers)
    labelled: list[tuple[Any, str, str]] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # tokenizers; the chat's models, one pair (chat_tab.load)

    def t(self, key: str, **fmt: object) -> str:
        return text(self.lang, key, **fmt)

    def in_lang(self, lang: str) -> Ui:
        """This Ui speaking `lang` (one browser tab's choice); runs, trainers and cache stay shared."""
        return self if lang == self.lang else replace(self, lang=lang)

    def label(self, component, key: str, prop: str = "label"):
        """Register `component` so that its `prop` shows text `key` in the chosen language; returns it."""
        self.labelled.append((component, key, prop))
        return component

    def relabel(self, lang: str) -> list:
        import gradio as gr

        return [gr.update(**{prop: text(lang, key)}) for _, key, prop in self.labelled]


def error_html(message: str) -> str:
    """A one-line error as the page shows it (the CLI's wording, no traceback)."""
    import html

    return f'<div class="ui-error">error: {html.escape(message)}</div>'


def build_app(runs_dir: Path | str = "runs", lang: str = "en"):
    """The whole page (gradio Blocks). Relative paths typed into it resolve against the working directory,
    as on the command line."""
    import gradio as gr

    from . import chat_tab, data_tab, eval_tab, runs_tab, train_tab

    ui = Ui(Path(runs_dir), lang)
    with gr.Blocks(title="rwkv-peft") as demo:
        with gr.Row():
            ui.label(gr.Markdown(ui.t("title")), "title", "value")
            chooser = gr.Dropdown(choices=[("English", "en"), ("中文", "zh")], value=lang, label=ui.t("lang"),
                                  elem_id="lang", scale=0, min_width=160)
        with gr.Tabs():
            for key, module in (("train", train_tab), ("data", data_tab), ("chat", chat_tab), ("eval", eval_tab),
                                ("runs", runs_tab)):
                with gr.Tab(ui.t(f"tab.{key}"), id=key, elem_id=f"tab-{key}") as tab:
                    ui.label(tab, f"tab.{key}")
                    module.build(ui)
        chooser.change(ui.relabel, chooser, [c for c, _, _ in ui.labelled])
    return demo


def check_bind(host: str, auth: str | None) -> tuple[str, str] | None:
    """(user, password) from --auth; refuses to serve beyond this machine without it."""
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise UserError("--auth: expected USER:PASSWORD")
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    if not local and auth is None:
        raise UserError(f"--host {host}: serving beyond this machine lets anyone on the network train and read files "
                        "here; add --auth USER:PASSWORD (or keep the default --host 127.0.0.1)")
    return None if auth is None else (auth.partition(":")[0], auth.partition(":")[2])


def serve(host: str = "127.0.0.1", port: int = 7860, runs_dir: str = "runs", lang: str = "en",
          auth: str | None = None, block: bool = True):
    """Build and serve the page; returns the gradio app (block=False: the server runs in a thread)."""
    if lang not in LANGS:
        raise UserError(f"--lang {lang}: expected one of {', '.join(LANGS)}")
    credentials = check_bind(host, auth)
    if Path(runs_dir).exists() and not Path(runs_dir).is_dir():
        raise UserError(f"--runs {runs_dir}: is a file, expected the directory runs are trained into")
    demo = build_app(runs_dir, lang)
    demo.queue(default_concurrency_limit=4)
    try:
        demo.launch(server_name=host, server_port=port, auth=credentials, prevent_thread_lock=True, quiet=True,
                    show_error=False, css=CSS, footer_links=[], allowed_paths=[str(Path(runs_dir).resolve())])
    except OSError as e:
        raise UserError(f"--port {port}: cannot serve on {host}:{port} ({e.strerror or e})") from None
    print(f"rwkv-peft ui: serving http://{host}:{port} (runs in {runs_dir}; Ctrl-C stops the page, trainers it "
          "started keep training)", flush=True)
    if block:
        demo.block_thread()
    return demo
