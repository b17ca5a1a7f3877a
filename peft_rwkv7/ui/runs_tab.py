"""Runs tab: every run in --runs (method, status, steps, loss, eval loss), one opened (`rwkv-peft inspect` and its
loss curve), written out for another runtime and deleted after a confirmation.

Nothing is computed here twice: the table is ui.runs.list_runs, the summary is infer.inspect.inspect_path (what
`rwkv-peft inspect` prints), the curve is the run's loss.png or train.logger.plot_losses of its log, merge /
export / convert run the CLI itself in a subprocess (its printed line or its one-line error is what the page shows;
an existing output is written over, as on the command line) and deletion is ui.runs.delete_run.
"""

from __future__ import annotations

import html
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import UserError
from .app import error_html
from .data_tab import probe, session_lang
from .runs import _section, delete_run, list_runs, read_log, read_recipe

# what the format dropdown offers: key -> (CLI command, whether it needs the base model, default output name)
FORMATS: dict[str, tuple[list[str], bool, str]] = {
    "merge": (["merge", "--base", "{base}", "--adapter", "{run}", "--out", "{out}"], True, "merged.pth"),
    "st": (["export", "--base", "{base}", "--adapter", "{run}", "--format", "st", "--out", "{out}"], True, "merged.st"),
    "st-adapter": (["export", "--adapter", "{run}", "--format", "st", "--out", "{out}"], False, "adapter.st"),
    "hf": (["export", "--base", "{base}", "--adapter", "{run}", "--format", "hf", "--out", "{out}"], True, "hf"),
    "runner-state": (["export", "--adapter", "{run}", "--format", "runner-state", "--out", "{out}"], False,
                     "runner-state.pth"),
    "rwkv-peft": (["export", "--adapter", "{run}", "--format", "rwkv-peft", "--out", "{out}"], False,
                  "rwkv-peft.pth"),
    "convert": (["convert", "{base}", "{out}"], True, "converted.st"),
}
COLUMNS = ("run", "method", "status", "steps", "loss", "eval")


def cli_args(fmt: str, run: str | Path, base: str, out: str) -> list[str]:
    """The `rwkv-peft` arguments that write `run` as `fmt` (convert: the model `base` to `out`)."""
    if fmt not in FORMATS:
        raise UserError(f"{fmt!r}: expected one of {', '.join(FORMATS)}")
    template, _, _ = FORMATS[fmt]
    paths = {k: f"./{v}" if str(v).startswith("-") else v for k, v in (("run", run), ("base", base), ("out", out))}
    return [a.format(**paths) for a in template]  # a relative path starting with "-" is not read as an option


def command_label(fmt: str) -> str:
    """The dropdown's text for `fmt`: the command line it runs, with placeholders."""
    return "rwkv-peft " + " ".join(cli_args(fmt, "RUN", "BASE", "OUT"))


def default_out(fmt: str, run: Path | None) -> str:
    """Where `fmt` writes by default: a file (hf: a folder) inside the run directory."""
    if run is None or fmt not in FORMATS:
        return ""
    return str(Path(run) / FORMATS[fmt][2])


def base_model(run: Path) -> str:
    """The base model the run trained on (its recipe.yaml's model.path), or "" where none is named."""
    path = _section(read_recipe(run), "model").get("path")
    return path if isinstance(path, str) else ""


def _loss(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def table_rows(runs: list, t) -> list[list]:
    """One row per RunInfo: run, method, status (in the interface language through `t`), step/max_steps, the
    last logged loss and eval loss (4 decimals; None where not logged yet)."""
    return [[r.name, r.method, t(f"status.{r.status}"), f"{r.step}/{r.max_steps}", _loss(r.loss), _loss(r.eval_loss)]
            for r in runs]


def run_cli(args: list[str]) -> tuple[int, str]:
    """Run `rwkv-peft ARGS` (this Python, `-m peft_rwkv7.cli`) in the working directory: (exit status, its last
    printed line on success, else its last stderr line without the "error: " the page adds itself)."""
    proc = subprocess.run([sys.executable, "-m", "peft_rwkv7.cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    stream = proc.stdout if proc.returncode == 0 else proc.stderr
    lines = [ln.rsplit("\r", 1)[-1].strip() for ln in stream.splitlines()]
    lines = [ln for ln in lines if ln]
    line = lines[-1] if lines else f"rwkv-peft {args[0]} ended with exit status {proc.returncode}"
    return proc.returncode, line.removeprefix("error: ")


def run_path(ui, name: str | None) -> Path:
    """The run directory `name` under --runs (UserError where none is picked or it is not a run)."""
    if not name:
        raise UserError(ui.t("runs.no_run"))
    if Path(name).name != name or name in (".", ".."):
        raise UserError(f"{name}: not a run name in {ui.runs_dir}")
    run = Path(ui.runs_dir) / name
    if not (run / "recipe.yaml").is_file():
        raise UserError(f"{run}: not a run directory (no recipe.yaml)")
    return run


def curve(run: Path):
    """The run's loss curve as a PIL image: its loss.png, else drawn from log.jsonl; None before any step."""
    from PIL import Image

    png = Path(run) / "loss.png"
    if png.is_file():
        try:
            with Image.open(png) as im:
                return im.copy()
        except OSError:  # damaged or not an image: drawn from log.jsonl as where there is none
            pass
    records = read_log(run)
    if not any("loss" in r for r in records):
        return None
    from ..train.logger import plot_losses

    with tempfile.TemporaryDirectory() as d:
        plot_losses(records, Path(d) / "loss.png")
        with Image.open(Path(d) / "loss.png") as im:
            return im.copy()


def refresh(ui, current: str | None = None) -> tuple[list[list], dict]:
    """(the table's rows, the run dropdown's choices keeping `current` while it exists)."""
    runs = list_runs(ui.runs_dir)
    names = [r.name for r in runs]
    return table_rows(runs, ui.t), {"choices": names} if current in names else {"choices": names, "value": None}


def open_run(ui, name: str | None, fmt: str) -> tuple[str, object, str, str, str]:
    """(inspect's summary, the loss curve, the base model, the default output for `fmt`, an error line or "")."""
    if not name:
        return "", None, "", "", ""
    from ..infer.inspect import inspect_path

    try:
        run = run_path(ui, name)
        summary = inspect_path(str(run))
    except (UserError, OSError, ValueError) as e:
        return "", None, "", "", error_html(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return summary, curve(run), base_model(run), default_out(fmt, run), ""


def check_out(run: Path, base: str, out: str) -> None:
    """Refuse an output that would write over the run itself (its adapter, recipe, log, checkpoints: the CLI
    would write an export over adapter.safetensors) or over the base model; what Write wrote before (the default
    output names) may be written again."""
    target = Path(out).resolve()
    run = Path(run).resolve()
    if base and target == Path(base).resolve():
        raise UserError(f"{out}: is the base model; write the output elsewhere (nothing is overwritten)")
    ours = run in target.parents and target.exists() and target.relative_to(run).parts[0] not in \
        {name for _, _, name in FORMATS.values()}
    if target == run or ours:
        raise UserError(f"{out}: is part of run {run.name} (its own files); write the output elsewhere, e.g. "
                        f"{run / 'merged.pth'} (nothing is overwritten)")


def write(ui, fmt: str, name: str | None, base: str, out: str) -> str:
    """Run the CLI command `fmt` stands for on run `name`; its printed line, or its error as error_html."""
    try:
        run = run_path(ui, name)
        base, out = (base or "").strip(), (out or "").strip()
        if fmt not in FORMATS:
            raise UserError(f"{ui.t('runs.format')}: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        if FORMATS[fmt][1] and not base:
            raise UserError(ui.t("runs.need_base", command=command_label(fmt)))
        args = cli_args(fmt, run, base, out)
        if out:
            check_out(run, base, out)
    except UserError as e:
        return error_html(str(e))
    if not out:  # the CLI's own message for a missing --out / OUTPUT
        args = args[:-2] if args[-2] == "--out" else args[:-1]
    rc, line = run_cli(args)
    return f'<div class="ui-ok">{html.escape(line)}</div>' if rc == 0 else error_html(line)


def delete(ui, name: str | None, confirmed: bool) -> str:
    """Delete run `name` through runs.delete_run once `confirmed`; the outcome as one line."""
    try:
        run = run_path(ui, name)
        if not confirmed:
            raise UserError(ui.t("runs.need_confirm"))
        delete_run(run)
    except UserError as e:
        return error_html(str(e))
    return f'<div class="ui-ok">{html.escape(ui.t("runs.deleted", run=run))}</div>'


def headers(t) -> list[str]:
    return [t(f"runs.col.{c}") for c in COLUMNS]


LANG_KEY = "status.running"  # the probe's text: tells a handler the page's language


def build(ui) -> None:
    import gradio as gr

    lang_value = probe(ui, LANG_KEY)

    def at(lang_v):
        """The Ui in this page's language (the switch relabels the probe; ui.lang is the start-up language)."""
        return ui.in_lang(session_lang(lang_v, LANG_KEY))

    rows, pick0 = refresh(ui)
    types = ["str", "str", "str", "str", "number", "number"]
    table = ui.label(gr.Dataframe(rows, headers=headers(ui.t), datatype=types,
                                  label=ui.t("runs.table"), interactive=False, elem_id="runs-table", wrap=True),
                     "runs.table")
    refresh_btn = ui.label(gr.Button(ui.t("runs.refresh"), elem_id="runs-refresh"), "runs.refresh", "value")
    timer = gr.Timer(3.0)
    pick = ui.label(gr.Dropdown(label=ui.t("runs.pick"), elem_id="runs-pick", **pick0), "runs.pick")
    opened = gr.HTML(elem_id="runs-open-msg")
    with gr.Row():
        summary = ui.label(gr.Textbox(label=ui.t("runs.inspect"), lines=9, max_lines=20, interactive=False,
                                      elem_id="runs-inspect", scale=3), "runs.inspect")
        thumb = ui.label(gr.Image(label=ui.t("runs.curve"), type="pil", interactive=False, height=220,
                                  elem_id="runs-curve", scale=2), "runs.curve")
    with gr.Row():
        fmt = ui.label(gr.Dropdown([(command_label(k), k) for k in FORMATS], value="merge", label=ui.t("runs.format"),
                                   elem_id="runs-format", scale=2), "runs.format")
        base = ui.label(gr.Textbox(label=ui.t("runs.base"), elem_id="runs-base"), "runs.base")
        out = ui.label(gr.Textbox(label=ui.t("runs.out"), elem_id="runs-out"), "runs.out")
    write_btn = ui.label(gr.Button(ui.t("runs.write"), variant="primary", elem_id="runs-write"), "runs.write", "value")
    written = gr.HTML(elem_id="runs-write-msg")
    with gr.Accordion(ui.t("runs.formats"), open=False, elem_id="runs-formats") as acc:
        ui.label(gr.Markdown(ui.t("runs.runtimes")), "runs.runtimes", "value")
    ui.label(acc, "runs.formats")
    with gr.Row():
        confirm = ui.label(gr.Checkbox(False, label=ui.t("runs.confirm"), elem_id="runs-confirm"), "runs.confirm")
        delete_btn = ui.label(gr.Button(ui.t("runs.delete"), variant="stop", elem_id="runs-delete", scale=0),
                              "runs.delete", "value")
    deleted = gr.HTML(elem_id="runs-delete-msg")

    def table_value(u, rows):
        return {"data": rows, "headers": headers(u.t)}  # the column names follow the language too

    def on_refresh(current, lang_v):
        u = at(lang_v)
        rows, choices = refresh(u, current)
        return table_value(u, rows), gr.update(**choices)

    def on_delete(name, confirmed, lang_v):
        u = at(lang_v)
        msg = delete(u, name, confirmed)
        rows, choices = refresh(u, name)
        return msg, table_value(u, rows), gr.update(**choices), gr.update(value=False)

    refresh_btn.click(on_refresh, [pick, lang_value], [table, pick])
    timer.tick(on_refresh, [pick, lang_value], [table, pick], show_progress="hidden")
    pick.change(lambda name, f: open_run(ui, name, f), [pick, fmt], [summary, thumb, base, out, opened])
    fmt.change(lambda f, name: default_out(f, Path(ui.runs_dir) / name if name else None), [fmt, pick], out)
    write_btn.click(lambda f, name, b, o, lang_v: write(at(lang_v), f, name, b, o), [fmt, pick, base, out, lang_value],
                    written)
    delete_btn.click(on_delete, [pick, confirm, lang_value], [deleted, table, pick, confirm])
