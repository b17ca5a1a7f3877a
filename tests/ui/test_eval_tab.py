"""The Evaluate tab, without a browser: the CLI arguments of each mode, a real run of the CLI on the demo model
(the same numbers as `rwkv-peft eval` run on its own), and the CLI's one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("gradio")

from peft_rwkv7.ui import eval_tab  # noqa: E402
from peft_rwkv7.ui.app import error_html  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "data" / "demo" / "rwkv7-demo.pth"
EVAL = ROOT / "data" / "demo" / "ship_log_eval.jsonl"
LABEL = "Loss / perplexity"  # the probe's English text (eval.mode.loss)


def test_arguments_of_each_mode():
    def args(mode, adapter="", compare=False, max_ctx=2048.0):
        return eval_tab.eval_args(mode, " m.pth ", adapter, "d.jsonl", compare, max_ctx, "r.json", "p.png")

    assert args("loss") == ["eval", "--model", "m.pth", "--data", "d.jsonl", "--json", "--out", "r.json"]
    # --compare and --max-ctx are the long-context modes' (the CLI refuses them with loss)
    assert args("loss", "runs/x", compare=True) == ["eval", "--model", "m.pth", "--adapter", "runs/x", "--data",
                                                    "d.jsonl", "--json", "--out", "r.json"]
    assert args("ctx") == ["eval", "--model", "m.pth", "--ctx-curve", "--data", "d.jsonl", "--max-ctx", "2048",
                           "--json", "--out", "r.json", "--plot", "p.png"]
    # passkey / niah build their own contexts: no --data (the CLI refuses it)
    assert args("passkey", "runs/x", compare=True, max_ctx=4096) == [
        "eval", "--model", "m.pth", "--adapter", "runs/x", "--passkey", "--max-ctx", "4096", "--compare", "--json",
        "--out", "r.json", "--plot", "p.png"]
    assert args("niah") == ["eval", "--model", "m.pth", "--niah", "--max-ctx", "2048", "--json", "--out", "r.json",
                            "--plot", "p.png"]
    assert args("ctx", max_ctx=2.5)[6:8] == ["--max-ctx", "2.5"]  # for the CLI to refuse, as typed
    with pytest.raises(Exception, match="DPO/ORPO/SimPO run directory"):
        args("pairs")
    assert eval_tab.shown_inputs("loss") == {"data": True, "compare": False, "max_ctx": False}
    assert eval_tab.shown_inputs("niah") == {"data": False, "compare": True, "max_ctx": True}
    assert eval_tab.command_line(eval_tab.cli_command(args("ctx"))) == (
        "rwkv-peft eval --model m.pth --ctx-curve --data d.jsonl --max-ctx 2048 --json")


def test_pairs_mode_reads_the_runs_recipe(tmp_path):
    run = tmp_path / "dpo"
    run.mkdir()
    (run / "recipe.yaml").write_text("train: {objective: dpo}\n")
    got = eval_tab.eval_args("pairs", "m.pth", str(run), "p.jsonl", True, 2048, "r.json", "p.png")
    assert got == ["eval", "--model", "m.pth", "--pairs", str(run / "recipe.yaml"), "--adapter", str(run), "--data",
                   "p.jsonl", "--json", "--out", "r.json"]
    from peft_rwkv7.cli_args import parse_args

    parsed = parse_args(got)  # the CLI reads it as its --pairs mode
    assert parsed.pairs == str(run / "recipe.yaml") and parsed.data == "p.jsonl" and parsed.compare is None


def test_mode_labels_follow_the_language():
    assert eval_tab.mode_choices("zh")[0] == ("损失 / 困惑度", "loss")
    assert [v for _, v in eval_tab.mode_choices("en")] == list(eval_tab.MODES)


def _last(gen):
    *_, last = gen
    return last


def _cli_json(capsys, argv: list[str]) -> dict:
    from peft_rwkv7 import cli

    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture
def small_eval(tmp_path) -> Path:
    path = tmp_path / "eval8.jsonl"
    path.write_text("".join(EVAL.read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")
    return path


def test_loss_is_the_cli_loss(small_eval, capsys):
    want = _cli_json(capsys, ["eval", "--model", str(MODEL), "--data", str(small_eval), "--json"])
    done = _last(eval_tab.evaluate("loss", str(MODEL), "", str(small_eval), False, 2048))
    assert done["result"]["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert done["result"]["tokens"] == want["tokens"] == 394  # 8 documents of the demo eval file
    assert done["image"] is None
    assert done["markdown"].splitlines()[-1] == f"| {want['loss']:.4f} | {want['ppl']:.3f} | {want['tokens']} | n/a |"
    assert eval_tab.command_line(done["command"]) == f"rwkv-peft eval --model {MODEL} --data {small_eval} --json"


def test_ctx_curve_shows_the_cli_table_and_plot(small_eval, capsys):
    from peft_rwkv7 import cli

    assert cli.main(["eval", "--model", str(MODEL), "--ctx-curve", "--data", str(small_eval), "--max-ctx", "64"]) == 0
    want = capsys.readouterr().out.rstrip("\n")  # the CLI's own text table
    status, table, image = _last(eval_tab.on_run("ctx", str(MODEL), "", str(small_eval), False, 64, LABEL))
    assert "ui-error" not in status
    assert table == f"```\n{want}\n```"
    assert image is not None and image.size[0] > 100 and image.size[1] > 100


def test_bad_paths_show_the_cli_error_line(tmp_path):
    missing = str(tmp_path / "missing.pth")
    status, table, image = _last(eval_tab.on_run("loss", missing, "", str(EVAL), False, 2048, LABEL))
    assert status == error_html(f"--model {missing}: no such file or directory")
    assert (table, image) == ("", None)
    status, _, _ = _last(eval_tab.on_run("passkey", str(MODEL), "", "", False, 0, LABEL))
    assert status == error_html("argument --max-ctx: --max-ctx must be a positive integer, got 0 "
                                "(see: rwkv-peft eval --help)")
    status, _, _ = _last(eval_tab.on_run("pairs", str(MODEL), "", str(EVAL), False, 2048, LABEL))
    assert "DPO/ORPO/SimPO run directory" in status and "\n" not in status


def test_error_line_is_the_last_error_of_stderr():
    stderr = "--dtype auto chose fp32\rbase:  10%|#  | 1/10\rbase: 20%\nerror: data.jsonl:3: invalid JSON\n"
    assert eval_tab.error_line(stderr) == "data.jsonl:3: invalid JSON"
    assert eval_tab.error_line("Killed\n") == "Killed"
    assert eval_tab.last_line("a\rb\r\n\n") == "b"
