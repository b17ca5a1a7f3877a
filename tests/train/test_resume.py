"""Exact resume, SIGKILL safety and Ctrl-C: a run cut anywhere continues as if it never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_rwkv7.errors import UserError
from peft_rwkv7.train.runner import train_from_cli
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "recipes/lora.yaml")


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter.safetensors")


def test_resume_equals_uninterrupted(tiny_world, tmp_path):
    # dropout > 0 makes the result depend on the restored RNG state as well
    extra = {"method.dropout": 0.1, "method.state": "true", "train.save_every": 4, "train.lr": 3e-3}
    full = tmp_path / "full"
    train_from_cli(LORA, tiny_overrides(tiny_world, full, steps=8, **extra))
    cut = tmp_path / "cut"
    train_from_cli(LORA, tiny_overrides(tiny_world, cut, steps=8, **extra) + ["train.stop_after=4"])
    assert not (cut / "loss.png").exists()  # stopped early, not finished
    train_from_cli(LORA, tiny_overrides(tiny_world, cut, steps=8, **extra), resume=True)
    a, b = adapter(full), adapter(cut)
    assert set(a) == set(b) and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit, as the README says
    assert any(a[k].abs().max() > 0 for k in a)  # training moved the weights

    def losses(out: Path) -> list[dict]:
        records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")} for r in records if "loss" in r]

    assert losses(full) == losses(cut)  # the resumed log reads like one uninterrupted run


def test_resume_with_batches_grouped_by_length_equals_uninterrupted(tiny_world, tmp_path, capsys):
    # pad sampling, grouped by length (data.group_by_length): the order is a function of (seed, step) alone
    extra = {"data.sampling": "pad", "data.group_by_length": "true", "train.micro_bsz": 3, "train.save_every": 3,
             "train.lr": 3e-3}
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_from_cli(LORA, tiny_overrides(tiny_world, full, steps=6, **extra))
    train_from_cli(LORA, tiny_overrides(tiny_world, cut, steps=6, **extra) + ["train.stop_after=3"])
    train_from_cli(LORA, tiny_overrides(tiny_world, cut, steps=6, **extra), resume=True)
    a, b = adapter(full), adapter(cut)
    assert set(a) == set(b) and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    summary = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("data: "))
    assert summary.endswith("epochs; micro-batches grouped by length"), summary


def test_resume_after_a_log_line_cut_short(tiny_world, tmp_path):
    """A run killed while it wrote a log line (a full disk, a power cut) resumes: the cut line, and one broken by
    hand, are dropped with the records past the checkpoint, and the log reads steps 1..N once each."""
    extra = {"train.save_every": 2}
    out = tmp_path / "cut"
    train_from_cli(LORA, tiny_overrides(tiny_world, out, steps=4, **extra) + ["train.stop_after=2"])
    log = out / "log.jsonl"
    kept = log.read_text().splitlines()
    assert [json.loads(x)["step"] for x in kept] == [1, 2]  # one record per step, no eval before the end
    log.write_text(kept[0] + "\n{not json\n" + kept[1] + '\n{"step": 3, "loss": 2.7')
    train_from_cli(LORA, tiny_overrides(tiny_world, out, steps=4, **extra), resume=True)
    lines = log.read_text().splitlines()
    assert lines[:2] == kept  # the records up to the checkpoint, as written
    assert [r["step"] for r in map(json.loads, lines) if "loss" in r] == [1, 2, 3, 4]  # and the final eval's


def test_existing_run_is_not_overwritten(tiny_world, tmp_path):
    out = tmp_path / "r"
    train_from_cli(LORA, tiny_overrides(tiny_world, out, steps=1))
    # the identical recipe again is a no-op (tests/train/test_runlock.py); another one must not overwrite it
    with pytest.raises(UserError, match="already holds a run"):
        train_from_cli(LORA, [*tiny_overrides(tiny_world, out, steps=1), "train.lr=0.5"])


def test_resume_without_checkpoint_is_an_error(tiny_world, tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        train_from_cli(LORA, tiny_overrides(tiny_world, tmp_path / "none", steps=1), resume=True)


def _start(tiny_world, out: Path, steps: int) -> subprocess.Popen:
    args = tiny_overrides(tiny_world, out, steps=steps, **{"train.save_every": 1})
    # Ctrl-C as a terminal delivers it: a test run started in the background (`pytest &` in a script) inherits
    # SIGINT ignored, which Python keeps (no KeyboardInterrupt at all), so the child gets the default back.
    return subprocess.Popen([sys.executable, "-m", "peft_rwkv7.cli", "train", LORA, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if list((out / "checkpoints").glob("step_*.pt")) if (out / "checkpoints").is_dir() else []:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_killed_run_resumes(tiny_world, tmp_path, sig):
    out = tmp_path / "run"
    proc = _start(tiny_world, out, steps=40)
    _wait_for_checkpoint(out, proc)
    time.sleep(0.3)  # land somewhere mid-step or mid-save
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    if sig == signal.SIGINT:  # the interrupted status (128 + SIGINT), as for a bare Ctrl-C: not an input error's 2
        last = err.strip().splitlines()[-1]
        assert proc.returncode == 130 and last.startswith("interrupted after step") and "Traceback" not in err, err
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [] or sig == signal.SIGKILL  # a killed writer may leave a temp file, never a bad .pt
    res = subprocess.run([sys.executable, "-m", "peft_rwkv7.cli", "train", LORA,
                          *tiny_overrides(tiny_world, out, steps=40, **{"train.save_every": 1}), "--resume"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "done: 40 steps" in res.stdout


def test_checkpoint_from_another_process_layout_is_refused(tmp_path):
    """A DeepSpeed checkpoint resumes only under DeepSpeed with as many processes and the same ZeRO stage, and a
    one-process checkpoint only without DeepSpeed; each refusal is one line saying what to do."""
    from peft_rwkv7.train import checkpoint as ckpt

    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p])
    ckpt.save_checkpoint(tmp_path, 1, [("p", p)], opt)
    with pytest.raises(UserError, match="written without DeepSpeed; resume without train.deepspeed"):
        ckpt.resume(tmp_path, [("p", p)], opt, engine=object(), stage=2)
    assert ckpt.resume(tmp_path, [("p", p)], opt) == 1

    # a committed DeepSpeed checkpoint (the engine's shards are not read before the layout is checked)
    folder = tmp_path / "checkpoints" / "step_000002"
    folder.mkdir()
    meta = {"step": 2, "world_size": 2, "zero_stage": 3, "params": {"p": {"shape": [3], "dtype": "float32"}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "checkpoints" / "step_000003.tmp").mkdir()  # a save cut short is not a checkpoint
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2]
    with pytest.raises(UserError, match="written with DeepSpeed; resume with train.deepspeed.stage=3 on 2 processes"):
        ckpt.resume(tmp_path, [("p", p)], opt)
    for stage, world in [(3, 1), (2, 1)]:
        with pytest.raises(UserError, match=rf"written by 2 processes under ZeRO-3; resume with 2 processes and "
                                            rf"train.deepspeed.stage=3 .*, not {world} under ZeRO-{stage}$"):
            ckpt.resume(tmp_path, [("p", p)], opt, engine=object(), stage=stage, world_size=world)


def test_ctrl_c_during_a_save_waits_for_it(tmp_path):
    """Ctrl-C landing inside torch.save would break the zip writer (a RuntimeError, the steps lost): it is
    held until the checkpoint files are written, then raised."""
    from peft_rwkv7.interrupts import ctrl_c_held
    from peft_rwkv7.train import checkpoint as ckpt

    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p])
    # Python's own Ctrl-C handler, as an interactive run has it (pytest started in the background inherits
    # SIGINT ignored, and then no KeyboardInterrupt would come at all)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal arrives while the save is still to come
            ckpt.save_checkpoint(tmp_path, 1, [("p", p)], opt)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ckpt.resume(tmp_path, [("p", p)], opt) == 1
