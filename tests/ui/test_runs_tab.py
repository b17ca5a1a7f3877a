"""Runs tab without a browser: two tiny state-tuning runs trained by the CLI (one finished, one stopped), then
the tab's functions (the ones its events call) against what the run directories and the CLI say themselves."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gradio")

from peft_rwkv7.cli_args import build_parser  # noqa: E402
from peft_rwkv7.train.runlock import run_lock  # noqa: E402
from peft_rwkv7.ui import runs_tab  # noqa: E402
from peft_rwkv7.ui.app import Ui, build_app  # noqa: E402
from peft_rwkv7.ui.texts import TEXTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = "data/demo/rwkv7-demo.pth"
TINY = ["train.max_steps=4", "train.save_every=2", "train.micro_bsz=2", "data.ctx_len=64", "log.progress=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/a: 4 of 4 steps (finished); runs/b: train.stop_after=2 (stopped at step 2). Both trained at once."""
    root = tmp_path_factory.mktemp("ui_runs")
    eval_file = root / "eval.jsonl"
    eval_file.write_text("".join((ROOT / "data/demo/ship_log_eval.jsonl").read_text().splitlines(True)[:4]))
    runs = root / "runs"
    procs = [subprocess.Popen([sys.executable, "-m", "peft_rwkv7.cli", "train", "recipes/state_tune.yaml", *TINY,
                               f"data.eval_path={eval_file}", f"out_dir={runs / name}", *extra], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
             for name, extra in (("a", []), ("b", ["train.stop_after=2"]))]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    return runs


def last(run: Path, key: str):
    """The last value of `key` in the run's log.jsonl, read here with json."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def test_table_rows(runs):
    rows, choices = runs_tab.refresh(Ui(runs))
    by_name = {r[0]: r for r in rows}
    assert sorted(by_name) == ["a", "b"] and choices == {"choices": [r[0] for r in rows], "value": None}
    a, b = by_name["a"], by_name["b"]
    assert a[1:4] == ["state", "finished", "4/4"]
    assert b[1:4] == ["state", "stopped", "2/4"]
    assert a[4] == round(last(runs / "a", "loss"), 4) and a[5] == round(last(runs / "a", "eval_loss"), 4)
    assert a[5] is not None
    assert b[4] == round(last(runs / "b", "loss"), 4)
    zh = {r[0]: r for r in runs_tab.refresh(Ui(runs, "zh"))[0]}
    assert (zh["a"][2], zh["b"][2]) == ("已完成", "已停止")
    # the picked run stays picked while it exists; a vanished one is cleared
    assert runs_tab.refresh(Ui(runs), "a")[1] == {"choices": [r[0] for r in rows]}
    assert runs_tab.refresh(Ui(runs), "gone")[1]["value"] is None


def test_open_run_inspect_and_curve(runs, tmp_path):
    from PIL import Image

    summary, image, base, out, err = runs_tab.open_run(Ui(runs), "a", "merge")
    assert err == "" and "run directory" in summary and "steps 4 of 4" in summary
    assert base == BASE and out == str(runs / "a" / "merged.pth")
    with Image.open(runs / "a" / "loss.png") as png:
        assert image.size == png.size and image.tobytes() == png.convert(image.mode).tobytes()
    # without loss.png the curve is drawn from log.jsonl, leaving nothing in the run directory
    c = runs / "c"
    shutil.copytree(runs / "b", c)
    (c / "loss.png").unlink(missing_ok=True)
    assert runs_tab.curve(c) is not None and not (c / "loss.png").exists()
    assert runs_tab.open_run(Ui(runs), "c", "hf")[3] == str(c / "hf")
    shutil.rmtree(c)
    assert "pick a run first" in runs_tab.write(Ui(runs), "merge", None, BASE, "x.pth")
    assert "not a run" in runs_tab.open_run(Ui(runs), "nope", "merge")[4]


def test_cli_args_are_the_cli_s(runs):
    parser = build_parser()
    export = next(a for a in parser._subparsers._group_actions[0].choices["export"]._actions if a.dest == "format")
    offered = {runs_tab.cli_args(k, "R", "B", "O")[runs_tab.cli_args(k, "R", "B", "O").index("--format") + 1]
               for k in runs_tab.FORMATS if runs_tab.FORMATS[k][0][0] == "export"}
    assert offered == set(export.choices)  # every export format the CLI has, and no other
    for fmt in runs_tab.FORMATS:
        args = parser.parse_args(runs_tab.cli_args(fmt, "runs/a", BASE, "o.x"))
        if fmt == "convert":
            assert (args.command, args.input, args.output) == ("convert", BASE, "o.x")
            continue
        assert args.adapter == "runs/a" and args.out == "o.x"
        assert (args.base if fmt == "merge" else args.model) == (BASE if runs_tab.FORMATS[fmt][1] else None)
        # found by fuzzing: a relative path starting with "-" was read by the CLI as an option
        args = parser.parse_args(runs_tab.cli_args(fmt, "-a", "-b.pth", "-o.x"))
        if fmt == "convert":
            assert (args.input, args.output) == ("./-b.pth", "./-o.x")
            continue
        assert args.adapter == "./-a" and args.out == "./-o.x"
        assert (args.base if fmt == "merge" else args.model) == ("./-b.pth" if runs_tab.FORMATS[fmt][1] else None)
    for lang in TEXTS:  # the runtime table names every command the dropdown offers
        table = TEXTS[lang]["runs.runtimes"]
        assert all(f"--format {f}" in table for f in export.choices) and "`merge`" in table and "`convert`" in table


def test_merge_through_the_tab_equals_the_cli(runs, tmp_path):
    import torch

    ui = Ui(runs)
    base = runs_tab.open_run(ui, "a", "merge")[2]
    ref_merge = subprocess.Popen([sys.executable, "-m", "peft_rwkv7.cli", "merge", "--base", BASE, "--adapter",
                                  str(runs / "a"), "--out", str(tmp_path / "cli.pth")], cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    msg = runs_tab.write(ui, "merge", "a", base, str(tmp_path / "tab.pth"))
    assert "ui-ok" in msg and "merged" in msg and str(tmp_path / "tab.pth") in msg
    assert ref_merge.wait(timeout=300) == 0, ref_merge.stdout.read()
    tab, ref = torch.load(tmp_path / "tab.pth"), torch.load(tmp_path / "cli.pth")
    assert tab.keys() == ref.keys() and any(k.endswith("time_state") for k in tab)
    assert all(tab[k].dtype == ref[k].dtype and torch.equal(tab[k], ref[k]) for k in ref)
    # the CLI's own one-line error, and the tab's refusal where BASE is needed and empty
    bad = runs_tab.write(ui, "merge", "a", str(tmp_path / "missing.pth"), str(tmp_path / "x.pth"))
    assert bad.startswith('<div class="ui-error">error: --base') and "missing.pth" in bad and "Traceback" not in bad
    assert "needs the base model" in runs_tab.write(ui, "st", "a", " ", str(tmp_path / "x.st"))
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "x.st").exists()


def test_delete_needs_confirmation(runs):
    ui = Ui(runs)
    shutil.copytree(runs / "b", runs / "d")
    msg = runs_tab.delete(ui, "d", False)
    assert "tick the box" in msg and "ui-error" in msg and (runs / "d").is_dir()
    msg = runs_tab.delete(ui, "d", True)
    assert "deleted" in msg and not (runs / "d").exists()
    assert "d" not in runs_tab.refresh(ui)[1]["choices"]


def test_running_run_shows_running_and_is_kept(runs):
    ui = Ui(runs)
    shutil.copytree(runs / "a", runs / "e")
    with run_lock(runs / "e"):
        rows = {r[0]: r for r in runs_tab.refresh(ui)[0]}
        assert rows["e"][2] == "running"
        msg = runs_tab.delete(ui, "e", True)
        assert "ui-error" in msg and "running" in msg and (runs / "e" / "recipe.yaml").is_file()
    assert {r[0]: r for r in runs_tab.refresh(ui)[0]}["e"][2] == "finished"
    assert "deleted" in runs_tab.delete(ui, "e", True)


def test_tab_builds_and_its_events_are_wired(runs):
    demo = build_app(runs)
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    table = by_id["runs-table"]
    assert sorted(row[0] for row in table.value["data"]) == ["a", "b"]
    assert by_id["runs-pick"].choices and not by_id["runs-pick"].value
    fns = [f for f in demo.fns.values() if any(getattr(o, "elem_id", "") == "runs-table" for o in f.outputs)]
    triggers = {(type(demo.blocks[i]).__name__, event) for f in fns for i, event in f.targets}
    assert {("Button", "click"), ("Timer", "tick")} <= triggers  # Refresh, the timer (and Delete)
    timer = next(demo.blocks[i] for f in fns for i, event in f.targets if event == "tick")
    assert 1 <= timer.value <= 5  # seconds between refreshes
    opener = next(f for f in demo.fns.values() if [getattr(c, "elem_id", "") for c in f.inputs] == ["runs-pick",
                                                                                                     "runs-format"])
    summary, image, *_ = opener.fn("a", "merge")
    assert "steps 4 of 4" in summary
    assert table.postprocess(runs_tab.refresh(Ui(runs))[0]) is not None
    assert by_id["runs-curve"].postprocess(image) is not None
