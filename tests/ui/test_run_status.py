"""The Runs table's status of a full fine-tune killed after its last checkpoint but before its model.pth (found by
the kill-point sweeps, tests/kill): the CLI's --resume finishes such a run, so the table must not call it finished."""

from __future__ import annotations

import os
from pathlib import Path

from peft_rwkv7.ui.runs import run_info


def full_run(root: Path, model_pth_age: float | None) -> Path:
    """A full run of 2 steps whose checkpoint at step 2 is written; model.pth absent (None), or written that many
    seconds after the checkpoint (negative: before it, as when an older run was extended)."""
    run = root / "full"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text("method: {kind: full}\ntrain: {max_steps: 2}\n", encoding="utf-8")
    ckpt = run / "checkpoints/step_000002.pt"
    ckpt.write_bytes(b"x")
    os.utime(ckpt, (1_000_000, 1_000_000))
    if model_pth_age is not None:
        (run / "model.pth").write_bytes(b"x")
        os.utime(run / "model.pth", (1_000_000 + model_pth_age, 1_000_000 + model_pth_age))
    return run


def test_a_full_run_without_its_model_pth_is_stopped_not_finished(tmp_path):
    assert run_info(full_run(tmp_path / "a", None)).status == "stopped"
    assert run_info(full_run(tmp_path / "b", -10)).status == "stopped"  # model.pth older than the last checkpoint
    assert run_info(full_run(tmp_path / "c", 10)).status == "finished"


def test_an_adapter_run_needs_no_model_pth(tmp_path):
    run = full_run(tmp_path, None)
    (run / "recipe.yaml").write_text("method: {kind: lora}\ntrain: {max_steps: 2}\n", encoding="utf-8")
    assert run_info(run).status == "finished"
