"""`rwkv-peft inspect`, and the web UI's runs table, on run files damaged or edited by hand: `inspect` says what is
wrong in one line naming the file (exit 2, no traceback); a log.jsonl keeps its well-formed records and skips the
rest, so a run killed mid-write still reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peft_rwkv7.cli import main
from peft_rwkv7.run_dir import read_log
from peft_rwkv7.ui.runs import list_runs, run_info

ADAPTER = {"method": {"kind": "lora", "r": 4, "alpha": 8}, "trainable_parameters": 1234,
           "base": {"path": "base.pth", "fingerprint": "abc", "dtype": "bf16"}}


def inspect_error(capsys, path: Path) -> str:
    rc = main(["inspect", str(path)])  # any exception but the CLI's one-line error fails the test here
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0].removeprefix("error: ")


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


ADAPTER_JSON, RECIPE, META = "adapter.json", "recipe.yaml", "checkpoints/step_000002/meta.json"
DAMAGED = {  # the file, what it holds, the line's end
    "json-not-utf8": (ADAPTER_JSON, b'\xff\xfe{"method": {}}', "not UTF-8 text (byte 0), expected a JSON file"),
    "json-control-char": (ADAPTER_JSON, '{"a": "x\x01y"}', ":1: invalid JSON (Invalid control character at column 9)"),
    "json-cut-short": (ADAPTER_JSON, '{\n  "method": {"kind": "lora"},\n',
                       ":3: invalid JSON (Expecting property name enclosed in double quotes at column 1)"),
    "json-list": (ADAPTER_JSON, "[1, 2]", "expected a JSON object, got list"),
    "method": (ADAPTER_JSON, '{"method": "lora"}', "method is str 'lora'"),
    "params-str": (ADAPTER_JSON, '{"trainable_parameters": "1234"}', "trainable_parameters is str '1234'"),
    "params-bool": (ADAPTER_JSON, '{"trainable_parameters": true}', "trainable_parameters is bool True"),
    "base": (ADAPTER_JSON, '{"base": ["base.pth"]}', "base is list"),
    "ranks-list": (ADAPTER_JSON, '{"ranks": [3, 3]}', "ranks is list"),
    "ranks-value": (ADAPTER_JSON, '{"ranks": {"blocks.0.att.key": "3"}}', "ranks holds a value that is not an integer"),
    "yaml": (RECIPE, "train: {max_steps: [1\n", "not a readable YAML file (ParserError)"),
    "yaml-not-utf8": (RECIPE, b"train:\n  max_steps: \xff\n", "not a readable YAML file (UnicodeDecodeError)"),
    "yaml-list": (RECIPE, "- 1\n- 2\n", "expected a YAML mapping, got list"),
    "train": (RECIPE, "train: 5\n", "train is int 5"),
    "max-steps": (RECIPE, "train: {max_steps: ten}\n", "train: max_steps is str 'ten'"),
    "data-path": (RECIPE, "data: {path: 3}\n", "data: path is int 3"),
    "meta-str": (META, '"step 2"', "expected a JSON object, got str"),
    "meta-step": (META, '{"step": "2", "world_size": 2}', "step is str '2'"),
    "world-size": (META, '{"step": 2, "world_size": 2.5}', "world_size is float 2.5"),
    "tensors": (META, '{"step": 2, "tensors": 5}', "tensors is int 5"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_run_file_is_one_line_naming_it(tmp_path, capsys, case):
    name, content, expected = DAMAGED[case]
    bad = write(tmp_path / "run" / name, content)
    msg = inspect_error(capsys, bad.parent if name == META else tmp_path / "run")  # a DeepSpeed step_N/ folder
    assert msg.startswith(str(bad)) and expected in msg, msg


@pytest.mark.parametrize(("payload", "expected"), [
    ([1, 2], "not a training checkpoint of rwkv-peft (it holds a list)"),
    ({"step": 2, "params": [torch.zeros(2)]}, "params is list"),
    ({"step": 2, "optimizer": {}}, "not a training checkpoint of rwkv-peft (it holds no params)"),
    ({"step": 2, "params": {"a": 1.0}}, "params holds a value that is not a tensor"),
    ({"step": "2", "params": {"a": torch.zeros(2)}}, "step is str '2'"),
], ids=["list", "params-list", "no-params", "params-value", "step"])
def test_a_foreign_pt_checkpoint_is_one_line_naming_it(tmp_path, capsys, payload, expected):
    pt = tmp_path / "run" / "checkpoints" / "step_000002.pt"
    pt.parent.mkdir(parents=True)
    torch.save(payload, pt)
    msg = inspect_error(capsys, pt)
    assert msg.startswith(str(pt)) and expected in msg, msg


LOG = (
    b'{"step": 1, "loss": 2.0, "lr": 0.001, "time": 100.0}\n'
    b"[1, 2]\n"  # JSON, not a record
    b'{"loss": 9.0}\n'  # no step
    b'{"step": 2, "loss": "low"}\n'  # a loss that is no number
    b'{"step": true, "loss": 7.0}\n'  # bool is no step
    b'{"step": 2, "loss": 1.75, "time": "late"}\n'  # a time that is no number
    b"\xff\xfe\x00\n"  # not UTF-8
    b'{"step": 2, "eval_loss": 1.9, "time": 150.0}\n'
    b'{"step": 3, "loss": 1.5, "lr": 0.001, "time": 200.0}\n'
    b'{"step": 4, "loss": 1.2'  # still being written, or cut by a kill
)


def test_a_log_keeps_its_records_and_skips_what_is_not_one(tmp_path, capsys):
    run = tmp_path / "run"
    write(run / "log.jsonl", LOG)
    write(run / "adapter.json", json.dumps({k: v for k, v in ADAPTER.items() if k != "trainable_parameters"}))
    write(run / "recipe.yaml", "method: {kind: lora}\ntrain: {max_steps: 5}\ndata: {path: d.jsonl}\n")
    assert [r["step"] for r in read_log(run)] == [1, 2, 3]
    assert [r.get("loss", r.get("eval_loss")) for r in read_log(run)] == [2.0, 1.9, 1.5]
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "  steps 3 of 5  loss 2.0000 -> 1.5000  eval loss 1.9000" in out.splitlines(), out
    assert "  trains ? values; base base.pth (fingerprint abc)" in out.splitlines(), out  # no count in this file
    info = run_info(run)
    assert (info.step, info.loss, info.eval_loss, info.max_steps, info.method) == (3, 1.5, 1.9, 5, "lora")


@pytest.mark.parametrize("recipe", ["method: lora\ntrain: 5\n", "train: {max_steps: ten, objective: dpo}\n",
                                    "- a list\n", "train: [1\n"], ids=["str-sections", "max-steps", "list", "yaml"])
def test_the_runs_table_lists_a_run_whose_recipe_was_edited_by_hand(tmp_path, recipe):
    good, odd = tmp_path / "good", tmp_path / "odd"
    write(good / "recipe.yaml", "method: {kind: state}\ntrain: {max_steps: 2}\n")
    write(good / "log.jsonl", LOG)
    write(odd / "recipe.yaml", recipe)
    write(odd / "log.jsonl", LOG)
    runs = {r.name: r for r in list_runs(tmp_path)}
    assert set(runs) == {"good", "odd"}
    assert (runs["good"].method, runs["good"].max_steps, runs["good"].step) == ("state", 2, 3)
    assert (runs["odd"].method, runs["odd"].max_steps, runs["odd"].step) == ("?", 0, 3)
