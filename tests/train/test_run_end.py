"""A run's end (the final eval, a full run's model.pth, the loss plot) comes after its last checkpoint: a run
stopped there is finished by --resume, which takes no step and writes the end as an uninterrupted run does."""

from __future__ import annotations

from pathlib import Path

import pytest

from peft_rwkv7.run_dir import ENDING
from tests.conftest import log_records
from tests.train.conftest import ROOT, tiny_overrides

LORA = str(ROOT / "recipes/lora.yaml")


def _cli(*argv) -> int:
    from peft_rwkv7.cli import main

    return main(list(argv))


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("end") / "ref"
    assert _cli("train", LORA, *tiny_overrides(tiny_world, out)) == 0
    return out


def _interrupt(monkeypatch, where: str) -> None:
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "final eval":
        monkeypatch.setattr("peft_rwkv7.train.loop._run_eval", ctrl_c)
    elif where == "loss plot":
        monkeypatch.setattr("peft_rwkv7.train.logger.plot_losses", ctrl_c)
    else:  # after the last step's record, before its checkpoint: the loop's Ctrl-C handler saves that checkpoint
        from peft_rwkv7.train.logger import RunLogger

        log_step = RunLogger.step

        def ctrl_c_after(self, step, *args, **kwargs):
            log_step(self, step, *args, **kwargs)
            if step == 2:
                raise KeyboardInterrupt

        monkeypatch.setattr(RunLogger, "step", ctrl_c_after)


@pytest.mark.parametrize("where", ["last checkpoint", "final eval", "loss plot"])
def test_a_run_stopped_in_its_end_is_finished_by_resume(tiny_world, tmp_path, monkeypatch, capsys, uninterrupted,
                                                         where):
    from peft_rwkv7.ui.runs import run_info

    out = tmp_path / "run"
    args = ["train", LORA, *tiny_overrides(tiny_world, out)]
    with monkeypatch.context() as m:
        _interrupt(m, where)
        assert _cli(*args) == 130
    said = capsys.readouterr().err.strip().splitlines()[-1]
    if where == "last checkpoint":
        assert said == "interrupted after step 2 (checkpoint at step 2); continue with: rwkv-peft train ... --resume"
    else:
        assert said == ("interrupted after step 2, before the run's end was written (final eval, loss plot); finish "
                        "it with: rwkv-peft train ... --resume"), said
    assert (out / ENDING).exists() and not (out / "loss.png").exists()
    assert run_info(out).status == "stopped"

    assert _cli(*args) == 2  # not "nothing to do": the end is missing
    said = capsys.readouterr().err
    assert "stopped before its end was written (final eval, loss plot); add --resume" in said, said

    assert _cli(*args, "--resume") == 0
    assert log_records(out) == log_records(uninterrupted)  # one final eval record, equal to the uninterrupted run's
    assert any("eval_loss" in r for r in log_records(out))
    assert (out / "loss.png").stat().st_size > 0 and not (out / ENDING).exists()
    assert run_info(out).status == "finished"
    capsys.readouterr()
    assert _cli(*args) == 0 and "nothing to do" in capsys.readouterr().out


def test_an_uninterrupted_run_leaves_no_marker_and_a_run_stopped_early_none(tiny_world, tmp_path, uninterrupted):
    assert not (uninterrupted / ENDING).exists()
    out = tmp_path / "half"
    assert _cli("train", LORA, *tiny_overrides(tiny_world, out, steps=3), "train.stop_after=1") == 0
    assert not (out / ENDING).exists()


def test_a_killed_runs_temp_files_are_removed_when_the_run_is_taken_up_again(tiny_world, tmp_path, monkeypatch):
    import tempfile

    made = []  # every temp file the run's atomic writes create: a SIGKILL mid-write leaves such a file behind
    real = tempfile.mkstemp

    def recording(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        made.append(Path(name))
        return fd, name

    out = tmp_path / "run"
    args = ["train", LORA, *tiny_overrides(tiny_world, out, steps=2), "train.save_every=1", "method.state=true"]
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", recording)
        assert _cli(*args, "train.stop_after=1") == 0
    left = [p for p in made if out in p.parents] + [out / ".loss.png.tmp.png"]  # and the plot's
    names = {p.name.split(".")[1] for p in left}
    assert {"adapter", "state", "step_000001", "recipe", "loss"} <= names, names
    for p in left:
        p.write_bytes(b"left by a kill")
    mine = [out / ".notes.tmp", out / "checkpoints/.mine.tmp", out / ".adapter.safetensors.bak"]
    for p in mine:
        p.write_text("the user's")
    assert _cli(*args, "--resume") == 0
    assert [p for p in left if p.exists()] == []
    assert all(p.read_text() == "the user's" for p in mine)
