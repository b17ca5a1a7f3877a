"""`rwkv-peft inspect` on everything of ours: runs, training checkpoints, binidx, models (text and --json)."""

from __future__ import annotations

import json

from peft_rwkv7.cli import main
from peft_rwkv7.train.runner import train_from_cli
from tests.train.conftest import ROOT, tiny_overrides


def run_inspect(capsys, *args) -> str:
    assert main(["inspect", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_inspect_a_state_run_and_its_checkpoint(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    train_from_cli(str(ROOT / "recipes/state_tune.yaml"), tiny_overrides(tiny_world, out, steps=2))
    capsys.readouterr()
    text = run_inspect(capsys, out)
    lines = text.splitlines()
    assert lines[0] == f"{out}: run directory" and len(lines) <= 8  # a readable summary, not one JSON line
    assert "method: kind state" in text and "r 16" not in text and "alpha" not in text  # no LoRA fields on a state run
    assert "steps 2 of 2" in text and "checkpoints at steps: 2" in text and "state.pth" in text
    info = json.loads(run_inspect(capsys, out, "--json"))
    assert info["kind"] == "run" and info["method"]["kind"] == "state" and info["steps_done"] == 2
    ckpt = next((out / "checkpoints").iterdir())
    text = run_inspect(capsys, ckpt)
    assert "training checkpoint (single process) at step 2" in text and "truncated" not in text


def test_inspect_a_binidx_pair(tmp_path, capsys):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"log entry {i}"}) + "\n" for i in range(5)))
    assert main(["data", "build", str(src), "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    for path in (tmp_path / "c", tmp_path / "c.bin", tmp_path / "c.idx"):
        text = run_inspect(capsys, path)
        assert text.startswith(f"{tmp_path / 'c'}: binidx dataset, 5 documents"), text
