"""Train tab: a recipe as a form (one field per recipe key, from the schema), the exact CLI command, save as
YAML, and Start / Stop / Resume of the CLI trainer in its own process, watched live through the run directory.

Calls: train.starter.list_recipes / resolve_recipe (the recipe names), ui.form (train.recipe.load_recipe and
its one-line errors), train.runner.preflight (every check `rwkv-peft train` makes before training), ui.runs
(the CLI as the trainer process; status, log.jsonl and console from the run directory).
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

from ..errors import UserError
from ..model import atomic_write
from ..train.runner import preflight
from ..train.starter import list_recipes, resolve_recipe
from . import form
from .app import error_html
from .data_tab import probe, session_lang
from .runs import console_tail, eta_seconds, run_info

SECTIONS = ("model", "method", "data", "train", "log", "run")
OPEN = ("method", "train")
DEFAULT = "state_tune"
PER_ROW = 2
LANG_KEY = "train.ok"  # the probe's text: tells a handler the page's language


def recipe_path(name: str | None, file: str | None) -> str:
    """The recipe a form stands for: a typed file path wins over the bundled name."""
    file = (file or "").strip()
    return file if file else resolve_recipe(name or DEFAULT)


def shown_name(name: str | None, file: str | None) -> str:
    """The recipe as the command line names it (a bundled recipe by name, a file by its path)."""
    return (file or "").strip() or (name or DEFAULT)


def field_help(spec: form.FieldSpec) -> str:
    return f"{spec.allowed} — {spec.help}" if spec.help else spec.allowed


def elem_id(key: str) -> str:
    return "field-" + key.replace(".", "-")


def fmt_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):  # a log.jsonl edited by hand: times of 1e309
        return ""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_html(ui, out_dir: str) -> str:
    """The watched run's status line: status, step of total, ETA, tokens/s, loss, eval loss."""
    run = Path(out_dir or "")
    if not out_dir or not (run / "recipe.yaml").is_file():
        return f'<div id="train-progress-text">{html.escape(ui.t("status.none"))}</div>'
    info = run_info(run)
    steps = [r for r in info.records if "loss" in r]
    tps = steps[-1].get("tokens_per_s", 0) if steps else None
    eta = fmt_eta(eta_seconds(info.records, info.max_steps)) if info.status == "running" else ""
    line = ui.t("train.progress", status=ui.t(f"status.{info.status}"), step=info.step, total=info.max_steps,
                eta=ui.t("train.eta", eta=eta) if eta else "",
                tps=f"{tps:,.0f}" if _finite(tps) else "-",
                loss=f"{info.loss:.4f}" if info.loss is not None else "-",
                eval=ui.t("train.eval_loss", loss=f"{info.eval_loss:.4f}") if info.eval_loss is not None else "")
    return (f'<progress value="{info.step}" max="{max(info.max_steps, 1)}" style="width:100%"></progress>'
            f'<div id="train-progress-text" data-status="{info.status}" data-step="{info.step}" '
            f'data-points="{len(steps)}">{html.escape(line)}</div>')


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def plot_frame(out_dir: str):
    """log.jsonl as the loss plot's rows: (step, loss, series) for train and eval loss."""
    import pandas as pd

    rows = []
    if out_dir and (Path(out_dir) / "recipe.yaml").is_file():
        for r in run_info(Path(out_dir)).records:
            if "loss" in r:
                rows.append((r["step"], r["loss"], "train"))
            if "eval_loss" in r:
                rows.append((r["step"], r["eval_loss"], "eval"))
    if not rows:  # None, not an empty frame: a plot first drawn empty never draws its coloured lines (gradio 6)
        return None
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64"})


def save_yaml(recipe: str, extra: list[str], path: str) -> str:
    """Write the form as a recipe file; never over an existing file (nothing a user made is lost)."""
    path = (path or "").strip()
    if not path:
        raise UserError("save as: give a file name, e.g. my_recipe.yaml")
    if not path.endswith((".yaml", ".yml")):
        raise UserError(f"save as {path}: a recipe file ends in .yaml")
    if os.path.isdir(path):
        raise UserError(f"save as {path}: is a directory, expected a file name ending in .yaml")
    if os.path.exists(path):
        raise UserError(f"save as {path}: the file exists; pick another name (nothing is overwritten)")
    text = form.to_yaml(recipe, extra)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


def build(ui) -> None:
    import gradio as gr

    specs = form.fields()
    lang_value = probe(ui, LANG_KEY)

    def at(lang_v):
        """The Ui in this page's language (the switch relabels the probe; ui.lang is the start-up language)."""
        return ui.in_lang(session_lang(lang_v, LANG_KEY))

    names = [n for n, _ in list_recipes()]
    values = form.recipe_values(resolve_recipe(DEFAULT))
    with gr.Row():
        recipe = ui.label(gr.Dropdown(names, value=DEFAULT, label=ui.t("train.recipe"), elem_id="train-recipe"),
                          "train.recipe")
        recipe_file = ui.label(gr.Textbox(label=ui.t("train.recipe_file"), elem_id="train-recipe-file",
                                          placeholder="my_recipe.yaml"), "train.recipe_file")
        load = ui.label(gr.Button(ui.t("train.load"), elem_id="train-load", scale=0), "train.load", "value")
    by_key, accordions = {}, {}
    with gr.Row():
        with gr.Column(scale=3):
            for sec in SECTIONS:
                with gr.Accordion(ui.t(f"train.sec.{sec}"), open=sec in OPEN, elem_id=f"sec-{sec}") as acc:
                    ui.label(acc, f"train.sec.{sec}")
                    accordions[sec] = acc
                    for group in groups(specs, sec):
                        if group == sec:
                            _rows(gr, [s for s in specs if group_of(s) == group], values, by_key)
                            continue
                        with gr.Accordion(group, open=False, elem_id=f"sec-{group.replace('.', '-')}") as sub:
                            accordions[group] = sub
                            _rows(gr, [s for s in specs if group_of(s) == group], values, by_key)
        widgets = [by_key[s.key] for s in specs]  # the form's order: specs[i] is widgets[i]
        with gr.Column(scale=2, elem_id="train-side"):
            command = ui.label(gr.Textbox(form.command(DEFAULT, []), label=ui.t("train.command"), interactive=False,
                                          elem_id="train-command"), "train.command")
            with gr.Row():
                check = ui.label(gr.Button(ui.t("train.check"), elem_id="train-check"), "train.check", "value")
                start = ui.label(gr.Button(ui.t("train.start"), variant="primary", elem_id="train-start"),
                                 "train.start", "value")
                stop = ui.label(gr.Button(ui.t("train.stop"), variant="stop", elem_id="train-stop"), "train.stop",
                                "value")
                resume = ui.label(gr.Button(ui.t("train.resume"), elem_id="train-resume"), "train.resume", "value")
            with gr.Row():
                save_path = ui.label(gr.Textbox(label=ui.t("train.save_path"), elem_id="train-save-path",
                                                placeholder="my_recipe.yaml"), "train.save_path")
                save = ui.label(gr.Button(ui.t("train.save"), elem_id="train-save", scale=0), "train.save", "value")
            message = gr.HTML("", elem_id="train-message")
            progress = gr.HTML(progress_html(ui, values.get("out_dir", "")), elem_id="train-progress")
            plot = ui.label(gr.LinePlot(plot_frame(values.get("out_dir", "")), x="step", y="loss", color="series",
                                        label=ui.t("train.plot"), elem_id="train-plot", height=260), "train.plot")
            console = ui.label(gr.Textbox(label=ui.t("train.console"), lines=10, max_lines=10, interactive=False,
                                          elem_id="train-console"), "train.console")
    out_dir = widgets[[s.key for s in specs].index("out_dir")]
    timer = gr.Timer(1.0)

    acc_keys = list(accordions)

    def field_updates(bad: str | None = None, msg: str = "") -> list:
        """Every field's help back, the bad one's error in its place; its sections opened so it is seen."""
        fields = [gr.update(info=f"⚠ {msg}", elem_classes=["field-error"]) if s.key == bad
                  else gr.update(info=field_help(s), elem_classes=[]) for s in specs]
        spec = next((s for s in specs if s.key == bad), None)
        opened = {spec.section, group_of(spec)} if spec else set()
        return fields + [gr.update(open=True) if k in opened else gr.update() for k in acc_keys]

    def on_load(name, file):
        path = recipe_path(name, file)
        try:
            vals = form.recipe_values(path)
        except UserError as e:
            return [error_html(str(e)), gr.update(), *[gr.update() for _ in specs + acc_keys]]
        ups = [gr.update(value=form.shown(s, vals.get(s.key)), info=field_help(s), elem_classes=[]) for s in specs]
        return ["", form.command(shown_name(name, file), []), *ups, *[gr.update() for _ in acc_keys]]

    def checked(name, file, raw, resume_run=False):
        """(overrides, html message, field updates, command) for the form; the message is empty when valid."""
        path = recipe_path(name, file)
        extra, err, key = form.check(path, specs, list(raw))
        if err:
            return None, error_html(err), field_updates(key, err), gr.update()
        return extra, "", field_updates(), form.command(shown_name(name, file), extra, resume_run)

    def on_check(lang_v, name, file, *raw):
        extra, msg, ups, cmd = checked(name, file, raw)
        ok = f'<div class="ui-ok">{html.escape(at(lang_v).t("train.ok"))}</div>' if extra is not None else msg
        return [ok, cmd, *ups]

    def launch(u, name, file, raw, resume_run: bool):
        extra, msg, ups, cmd = checked(name, file, raw, resume_run)
        if extra is None:
            return [msg, cmd, *ups]
        path = recipe_path(name, file)
        try:
            recipe_obj = preflight(path, extra, resume=resume_run)
            ui.trainers.start(path, extra, Path(recipe_obj.out_dir), resume=resume_run, cwd=Path.cwd())
        except UserError as e:
            return [error_html(str(e)), cmd, *ups]
        if ui.trainers.wait_started(Path(recipe_obj.out_dir)) == "ended":
            last = console_tail(Path(recipe_obj.out_dir), 1)
            return [error_html(last.removeprefix("error: ") or "the trainer ended at once"), cmd, *ups]
        return [html.escape(u.t("train.started", command=cmd)), cmd, *ups]

    def on_start(lang_v, name, file, *raw):
        return launch(at(lang_v), name, file, raw, False)

    def on_resume(lang_v, name, file, *raw):
        return launch(at(lang_v), name, file, raw, True)

    def on_stop(run, lang_v):
        return stop_message(at(lang_v), run)

    def on_save(lang_v, name, file, path, *raw):
        extra, msg, ups, cmd = checked(name, file, raw)
        if extra is None:
            return [msg, cmd, *ups]
        try:
            written = save_yaml(recipe_path(name, file), extra, path)
        except UserError as e:
            return [error_html(str(e)), cmd, *ups]
        return [html.escape(at(lang_v).t("train.saved", path=written)), cmd, *ups]

    def on_tick(run, lang_v):
        return progress_html(at(lang_v), run), plot_frame(run), console_tail(Path(run)) if run else ""

    form_out = [message, command, *widgets, *accordions.values()]
    load.click(on_load, [recipe, recipe_file], form_out)
    recipe.change(on_load, [recipe, recipe_file], form_out)
    check.click(on_check, [lang_value, recipe, recipe_file, *widgets], form_out)
    start.click(on_start, [lang_value, recipe, recipe_file, *widgets], form_out)
    resume.click(on_resume, [lang_value, recipe, recipe_file, *widgets], form_out)
    save.click(on_save, [lang_value, recipe, recipe_file, save_path, *widgets], form_out)
    stop.click(on_stop, [out_dir, lang_value], message)
    timer.tick(on_tick, [out_dir, lang_value], [progress, plot, console], show_progress="hidden")


def stop_message(ui, run: str | None) -> str:
    """Stop for the run in out_dir `run` (the form's field): what was sent, or why nothing was."""
    run = (run or "").strip()
    if not run:
        return error_html(ui.t("train.need_out_dir"))
    if ui.trainers.stop(Path(run)):
        return html.escape(ui.t("train.stopping", run=run))
    return error_html(ui.t("train.no_run", run=run))


def group_of(spec: form.FieldSpec) -> str:
    """The accordion a key sits in: its section, or its sub-section (train.grpo, method.adalora, ...)."""
    parts = spec.key.split(".")
    return ".".join(parts[:-1]) if len(parts) > 2 else spec.section


def groups(specs: list[form.FieldSpec], section: str) -> list[str]:
    return list(dict.fromkeys(group_of(s) for s in specs if s.section == section))


def _rows(gr, specs: list[form.FieldSpec], values: dict, by_key: dict) -> None:
    for i in range(0, len(specs), PER_ROW):
        with gr.Row():
            for spec in specs[i:i + PER_ROW]:
                by_key[spec.key] = _widget(gr, spec, values.get(spec.key))


def _widget(gr, spec: form.FieldSpec, value):
    """The form field of one recipe key: its label is the key (what a YAML file and key=value say)."""
    common = {"label": spec.key, "info": field_help(spec), "elem_id": elem_id(spec.key), "min_width": 200}
    shown = form.shown(spec, value)
    if spec.widget == "choice":
        return gr.Dropdown(list(spec.choices), value=None if shown is None else str(shown), **common)
    if spec.widget == "bool":
        return gr.Checkbox(value=bool(shown), **common)
    if spec.widget in ("int", "float"):
        return gr.Number(value=shown, precision=0 if spec.widget == "int" else None, **common)
    multiline = spec.widget == "str" and isinstance(shown, str) and "\n" in shown
    return gr.Textbox(value=shown, lines=2 if multiline else 1, **common)
