"""Evaluate tab: `rwkv-peft eval` itself, in its own process — loss / perplexity on a file, the loss-by-position
curve and the passkey / needle-in-a-haystack heatmaps (with --compare: the base model beside the adapter), shown
as the JSON result and the PNG the CLI writes.

Calls: the CLI (`python -m peft_rwkv7.cli eval ... --json --out R.json [--plot P.png]`: its checks, the model
loading, infer.evaluate / infer.longctx.ctx_curve / infer.niah.needle_grid and the plots), and for the result
table the CLI's own text tables (infer.longctx.format_ctx_curve, infer.niah.format_grid).

Preference pairs: `eval --pairs RUN/recipe.yaml --data PAIRS` (the adapter's run recipe gives the objective and
beta that define the reward): reward accuracy and margin, as training's held-out evaluation computes them.
"""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

from ..errors import UserError
from .app import error_html
from .data_tab import probe, session_lang
from .texts import text

MODES = ("loss", "ctx", "passkey", "niah", "pairs")
MODE_FLAGS = {"ctx": "--ctx-curve", "passkey": "--passkey", "niah": "--niah"}  # the long-context modes
LABEL_KEYS = {"loss": "eval.mode.loss", "ctx": "eval.mode.ctx", "passkey": "eval.mode.passkey",
              "niah": "eval.mode.niah", "pairs": "eval.mode.pairs"}
DEFAULT_MAX_CTX = 2048  # the CLI's 16384 takes long on a CPU; the grid's lengths are 1024, 2048, ... up to it
POLL_S = 0.5


def mode_choices(lang: str) -> list[tuple[str, str]]:
    return [(text(lang, LABEL_KEYS[m]), m) for m in MODES]


def shown_inputs(mode: str) -> dict[str, bool]:
    """Which inputs a mode reads: --data (loss, ctx-curve), --compare and --max-ctx (the long-context modes)."""
    return {"data": mode in ("loss", "ctx", "pairs"), "compare": mode in MODE_FLAGS, "max_ctx": mode in MODE_FLAGS}


def _number(value) -> str:
    """A gr.Number as the command line has it (512.0 -> '512'); anything else as typed, for the CLI to judge."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def eval_args(mode: str, model: str, adapter: str | None, data: str | None, compare: bool, max_ctx,
              out_json: str, plot_png: str) -> list[str]:
    """The `rwkv-peft eval` arguments for the form (after `python -m peft_rwkv7.cli`): each mode gets only the
    flags it reads (the CLI refuses the others)."""
    if mode not in MODES:
        raise UserError(f"evaluation mode {mode!r}: expected one of {', '.join(MODES)}")
    if not (model or "").strip():
        raise UserError("--model: give a model file (.pth, .st or an HF directory)")
    args = ["eval", "--model", (model or "").strip()]
    adapter = (adapter or "").strip()
    if mode == "pairs":
        if not adapter or not (Path(adapter) / "recipe.yaml").is_file():
            raise UserError("preference pairs: give the adapter as a DPO/ORPO/SimPO run directory (its recipe.yaml "
                            "defines the reward: objective and beta)")
        args += ["--pairs", str(Path(adapter) / "recipe.yaml")]
    if adapter:
        args += ["--adapter", adapter]
    if mode in MODE_FLAGS:
        args.append(MODE_FLAGS[mode])
    if shown_inputs(mode)["data"]:
        args += ["--data", (data or "").strip()]
    if mode in MODE_FLAGS:
        args += ["--max-ctx", _number(max_ctx)]
        if compare:
            args.append("--compare")
    args += ["--json", "--out", out_json]
    if mode in MODE_FLAGS:
        args += ["--plot", plot_png]
    return args


def cli_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "peft_rwkv7.cli", *args]


def last_line(output: str) -> str:
    """The last line of a stream with progress bars (lines end in \\n or are redrawn after \\r)."""
    lines = [ln.strip() for ln in output.replace("\r", "\n").split("\n")]
    return next((ln for ln in reversed(lines) if ln), "")


def error_line(stderr: str) -> str:
    """The CLI's one-line error (its last `error: ...` line) without the `error: ` that error_html adds."""
    lines = [ln.strip() for ln in stderr.replace("\r", "\n").split("\n")]
    err = next((ln for ln in reversed(lines) if ln.startswith("error:")), None)
    line = err if err is not None else last_line(stderr) or "rwkv-peft eval failed"
    return line.removeprefix("error:").strip()


def result_markdown(mode: str, result: dict) -> str:
    """The JSON result as the page shows it: loss as a table, the curve and grids as the CLI's text tables."""
    if mode == "loss":
        acc = "n/a" if result.get("acc") is None else f"{result['acc']:.4f}"
        return ("| loss | ppl | tokens | acc |\n|---:|---:|---:|---:|\n"
                f"| {result['loss']:.4f} | {result['ppl']:.3f} | {result['tokens']} | {acc} |")
    if mode == "pairs":
        return ("| objective | reward accuracy | reward margin | loss | pairs |\n|---|---:|---:|---:|---:|\n"
                f"| {result['objective']} (beta {result['beta']:g}) | {result['reward_acc']:.4f} | "
                f"{result['reward_margin']:.4f} | {result['loss']:.4f} | {result['pairs']} |")
    runs = result["runs"] if "runs" in result else [result]
    if mode == "ctx":
        from ..infer.longctx import format_ctx_curve

        table = format_ctx_curve(runs)
    else:
        from ..infer.niah import format_grid

        table = format_grid(runs)
    return f"```\n{table}\n```"


def run_cli(args: list[str], cwd: str | None = None) -> Iterator[str | tuple[int, str, str]]:
    """Run the CLI with `args`; yields its latest progress line now and then, and last (exit code, stdout,
    stderr). Closing the iterator (the page went away) stops the process."""
    with tempfile.TemporaryDirectory(prefix="rwkv-peft-ui-") as tmp:
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cli_command(args), stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd)
            try:
                shown = ""
                while proc.poll() is None:
                    time.sleep(POLL_S)
                    line = last_line(err_path.read_text(errors="replace")[-2000:])
                    if line != shown:
                        shown = line
                        yield line
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        yield proc.returncode, out_path.read_text(errors="replace"), err_path.read_text(errors="replace")


def evaluate(mode: str, model: str, adapter: str | None, data: str | None, compare: bool, max_ctx,
             cwd: str | None = None) -> Iterator[dict]:
    """The whole evaluation; yields {"progress": line} while the CLI runs, then one of {"error": line} or
    {"result": JSON dict, "markdown": str, "image": PIL image or None, "command": [...]}."""
    tmp = Path(tempfile.mkdtemp(prefix="rwkv-peft-eval-"))
    try:
        try:
            args = eval_args(mode, model, adapter, data, compare, max_ctx, str(tmp / "result.json"),
                             str(tmp / "plot.png"))
        except UserError as e:
            yield {"error": str(e)}
            return
        code, stdout, stderr = 1, "", ""
        with closing(run_cli(args, cwd)) as runs:
            for item in runs:
                if isinstance(item, str):
                    yield {"progress": item}
                else:
                    code, stdout, stderr = item
        if code != 0:
            yield {"error": error_line(stderr)}
            return
        out = tmp / "result.json"
        try:
            result = json.loads(out.read_text() if out.is_file() else last_line(stdout))
            markdown = result_markdown(mode, result)
        except (ValueError, KeyError, TypeError, AttributeError):  # not the JSON result this mode writes
            yield {"error": f"rwkv-peft eval ended without a {mode} result: {last_line(stdout) or 'no output'}"}
            return
        image = None
        if (tmp / "plot.png").is_file():
            from PIL import Image

            with Image.open(tmp / "plot.png") as im:
                image = im.convert("RGB")
        yield {"result": result, "markdown": markdown, "image": image,
               "command": cli_command(args)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def command_line(command: list[str]) -> str:
    """The command as a terminal would take it (`rwkv-peft eval ...`, without the temporary outputs)."""
    import shlex

    args = command[3:]
    keep, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--out", "--plot"):
            skip = True
            continue
        keep.append(a)
    return "rwkv-peft " + shlex.join(keep)


def on_run(mode, model, adapter, data, compare, max_ctx, lang_value):
    working = text(session_lang(lang_value, LABEL_KEYS["loss"]), "working")
    yield f"<div>{html.escape(working)}</div>", "", None
    for item in evaluate(mode, model, adapter, data, compare, max_ctx):
        if "progress" in item:
            yield f"<div>{html.escape(working)} {html.escape(item['progress'])}</div>", "", None
        elif "error" in item:
            yield error_html(item["error"]), "", None
        else:
            yield (f"<code>{html.escape(command_line(item['command']))}</code>", item["markdown"], item["image"])


def on_mode(mode):
    import gradio as gr

    shown = shown_inputs(mode)
    return (gr.update(visible=shown["data"]), gr.update(visible=shown["compare"]),
            gr.update(visible=shown["max_ctx"]))


def build(ui) -> None:
    import gradio as gr

    lang_value = probe(ui, LABEL_KEYS["loss"])
    with gr.Row():
        model = ui.label(gr.Textbox("data/demo/rwkv7-demo.pth", label=ui.t("eval.model"), elem_id="eval-model"),
                         "eval.model")
        adapter = ui.label(gr.Textbox("", label=ui.t("eval.adapter"), elem_id="eval-adapter"), "eval.adapter")
    with gr.Row():
        mode = ui.label(gr.Radio(mode_choices(ui.lang), value="loss", label=ui.t("eval.mode"), elem_id="eval-mode",
                                 scale=2), "eval.mode")
        data = ui.label(gr.Textbox("data/demo/ship_log_eval.jsonl", label=ui.t("eval.data"), elem_id="eval-data"),
                        "eval.data")
    with gr.Row():
        compare = ui.label(gr.Checkbox(False, label=ui.t("eval.compare"), elem_id="eval-compare", visible=False),
                           "eval.compare")
        max_ctx = ui.label(gr.Number(DEFAULT_MAX_CTX, label=ui.t("eval.max_ctx"), precision=0, minimum=1,
                                     elem_id="eval-max-ctx", visible=False), "eval.max_ctx")
    run = ui.label(gr.Button(ui.t("eval.run"), variant="primary", elem_id="eval-run"), "eval.run", "value")
    status = gr.HTML(elem_id="eval-status")
    result = ui.label(gr.Markdown(label=ui.t("eval.result"), elem_id="eval-result"), "eval.result")
    plot = ui.label(gr.Image(label=ui.t("eval.plot"), type="pil", interactive=False, elem_id="eval-plot"),
                    "eval.plot")
    # the mode's choice labels follow the language switch through the probe (ui.label sets one text per property)
    lang_value.change(lambda v: gr.update(choices=mode_choices(session_lang(v, LABEL_KEYS["loss"]))), lang_value,
                      mode)
    mode.change(on_mode, mode, [data, compare, max_ctx])
    run.click(on_run, [mode, model, adapter, data, compare, max_ctx, lang_value], [status, result, plot])
