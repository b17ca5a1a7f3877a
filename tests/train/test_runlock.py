"""One run per run directory, and a --resume that only continues the same run."""

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
from peft_rwkv7.train.runlock import run_lock
from peft_rwkv7.train.runner import train_from_cli
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "recipes/lora.yaml")


def _cli_main(*argv) -> int:
    from peft_rwkv7.cli import main

    return main([str(a) for a in argv])


def test_a_second_run_into_a_locked_directory_stops_at_once(tiny_world, tmp_path):
    out = tmp_path / "r"
    with run_lock(out):
        t0 = time.perf_counter()
        with pytest.raises(UserError, match=r"is in use by another rwkv-peft train \(pid \d+ on .*\); wait"):
            train_from_cli(LORA, tiny_overrides(tiny_world, out, steps=1))
        assert time.perf_counter() - t0 < 5
    assert not (out / "recipe.yaml").exists()  # the refused run wrote nothing
    assert train_from_cli(LORA, tiny_overrides(tiny_world, out, steps=1)) == 0  # released on exit


def test_a_killed_runs_lock_is_taken_over(tiny_world, tmp_path):
    out = tmp_path / "k"
    over = tiny_overrides(tiny_world, out, steps=400, **{"train.save_every": 1})
    proc = subprocess.Popen([sys.executable, "-m", "peft_rwkv7.cli", "train", LORA, *over], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not list((out / "checkpoints").glob("step_*")) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "peft_rwkv7.cli", "train", LORA, *over], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"pid {proc.pid}" in second.stderr, second.stderr
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # the dead run's lock file is still there; a resume takes it over
    assert (out / ".lock").exists()
    done = max(int(p.name[5:11]) for p in (out / "checkpoints").glob("step_*"))
    assert train_from_cli(LORA, [*over, f"train.stop_after={done + 1}"], resume=True) == 0
    assert f"pid {os.getpid()}" in (out / ".lock").read_text()


def _bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}


def test_resume_with_a_changed_recipe_is_refused_and_writes_nothing(tiny_world, tmp_path):
    out = tmp_path / "c"
    train_from_cli(LORA, tiny_overrides(tiny_world, out, steps=4, **{"train.save_every": 1}) + ["train.stop_after=3"])
    before = _bytes(out)
    with pytest.raises(UserError, match=r"differs from the run's: train\.lr 0\.0001 -> 0\.5"):
        train_from_cli(LORA, tiny_overrides(tiny_world, out, steps=4, **{"train.lr": 0.5}), resume=True)
    with pytest.raises(UserError, match=r"train\.max_steps 4 -> 60 would change the learning rate of the 3 steps"):
        train_from_cli(LORA, tiny_overrides(tiny_world, out, steps=60, **{"train.save_every": 1}), resume=True)
    assert _bytes(out) == before


def test_a_finished_run_says_so(tiny_world, tmp_path):
    out = tmp_path / "f"
    train_from_cli(LORA, tiny_overrides(tiny_world, out, steps=2))
    before = _bytes(out)
    with pytest.raises(UserError, match=r"the run is finished \(2 of 2 steps\)"):
        train_from_cli(LORA, tiny_overrides(tiny_world, out, steps=2), resume=True)
    assert _bytes(out) == before  # no duplicate eval record, no rewritten recipe


def test_extending_a_constant_schedule_equals_the_longer_run(tiny_world, tmp_path):
    const = {"train.schedule": "constant", "train.lr": 3e-3, "train.save_every": 2}
    short, long = tmp_path / "short", tmp_path / "long"
    train_from_cli(LORA, tiny_overrides(tiny_world, short, steps=2, **const))
    # as the finished-run message says: the same command line, --resume, then the raised key (after the flag)
    assert _cli_main("train", LORA, *tiny_overrides(tiny_world, short, steps=2, **const), "--resume",
                     "train.max_steps=4") == 0
    train_from_cli(LORA, tiny_overrides(tiny_world, long, steps=4, **const))
    a, b = load_file(short / "adapter.safetensors"), load_file(long / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in map(json.loads, (short / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4]


# Run in a fresh interpreter: which modules the refusal needed, and how long it took.
_PROBE = """
import json, sys, time
t0 = time.perf_counter()
from peft_rwkv7.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "s": time.perf_counter() - t0, "heavy": sorted(
    m for m in ("torch", "deepspeed", "peft", "peft_rwkv7.model", "peft_rwkv7.train.loop") if m in sys.modules)}))
"""


def test_a_locked_directory_is_refused_before_torch_is_imported(tiny_world, tmp_path):
    out = tmp_path / "busy"
    with run_lock(out):
        res = subprocess.run([sys.executable, "-c", _PROBE, "train", LORA, *tiny_overrides(tiny_world, out, steps=1)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    probe = json.loads(res.stdout.strip().splitlines()[-1])
    assert probe["rc"] == 2 and "is in use by another rwkv-peft train" in res.stderr, res.stderr
    assert probe["heavy"] == [], probe
    assert not (out / "recipe.yaml").exists()


def test_rerunning_a_finished_run_is_a_no_op(tiny_world, tmp_path, capsys):
    """The README's set-up one-liner ends with `rwkv-peft train recipes/state_tune.yaml`: running it twice
    must not fail. The same finished run again: one line, exit 0, nothing written; anything else is refused."""
    out = tmp_path / "done"
    over = tiny_overrides(tiny_world, out, steps=2)
    assert _cli_main("train", LORA, *over) == 0
    before = _bytes(out)
    capsys.readouterr()
    assert _cli_main("train", LORA, *over, "log.progress=true") == 0  # progress bars change no number
    said = capsys.readouterr().out.strip()
    # --resume is offered exactly where check_resume would take a raised max_steps: here the 2 steps (1 of
    # warmup, then the cosine's first, at the peak) keep their lr in a longer run
    assert said == (f"{out} already holds this finished run (2 steps); nothing to do — to train again pick "
                    "another out_dir=..., or raise train.max_steps with --resume")
    assert _bytes(out) == before
    assert _cli_main("train", LORA, *over, "train.lr=0.5") == 2  # another recipe: refused
    err = capsys.readouterr().err
    assert "already holds a run" in err and "train.lr" in err and "out_dir=" in err, err
    assert _bytes(out) == before


def test_an_unfinished_run_is_not_restarted_without_resume(tiny_world, tmp_path, capsys):
    out = tmp_path / "half"
    over = tiny_overrides(tiny_world, out, steps=3, **{"train.save_every": 1})
    assert _cli_main("train", LORA, *over, "train.stop_after=1") == 0
    before = _bytes(out)
    capsys.readouterr()
    assert _cli_main("train", LORA, *over) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err, err
    assert _bytes(out) == before


def test_a_run_written_before_a_key_existed_is_the_same_run(tiny_world, tmp_path, capsys):
    """A recipe key added in an upgrade (its default keeps the old behaviour) does not make an existing run
    "another recipe": the README's first command, run again after `git pull`, must still succeed."""
    import yaml

    out = tmp_path / "old"
    over = tiny_overrides(tiny_world, out, steps=2)
    assert _cli_main("train", LORA, *over) == 0
    stored = yaml.safe_load((out / "recipe.yaml").read_text())
    del stored["data"]["group_by_length"], stored["train"]["grad_cp"]  # as an older version wrote it
    (out / "recipe.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    before = _bytes(out)
    capsys.readouterr()
    assert _cli_main("train", LORA, *over) == 0
    assert "already holds this finished run" in capsys.readouterr().out
    assert _bytes(out) == before
    assert _cli_main("train", LORA, *over, "data.sampling=pad", "data.group_by_length=true") == 2  # a real change
    assert "data.group_by_length False -> True" in capsys.readouterr().err
