"""What the kill-point sweeps found (tests/kill/test_kill_points.py): targeted tests, each failing before its fix."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.kill.support import (
    FULL,
    LORA,
    ROOT,
    _overrides,
    _reap,
    _start,
)

# --- what the sweeps found (each failed before its fix) --------------------------------------------------------------

def test_a_full_run_killed_after_its_last_checkpoint_writes_model_pth_on_resume(world, tmp_path):
    """The last checkpoint comes before the end (eval, model.pth): a run killed between them was taken as finished,
    its model.pth never written (the same command: "nothing to do"; --resume: "the run is finished")."""
    from peft_rwkv7.model import load_model

    out = tmp_path / "full"
    args = ["train", FULL, *_overrides(world, out, steps=2, **{"method.state": "false"})]
    proc = _start(args, ROOT)
    while not (out / "checkpoints/step_000002.pt").exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    rc, err = _reap(proc)
    assert rc == -signal.SIGKILL and not (out / "model.pth").exists(), err
    again = _reap(_start(args, ROOT))
    assert again[0] == 2, again
    assert "stopped before its end was written (final eval, loss plot, model.pth); add --resume" in again[1], again
    res = _reap(_start([*args, "--resume"], ROOT))
    assert res[0] == 0, res[1]
    load_model(out / "model.pth")
    assert _reap(_start(args, ROOT))[0] == 0  # now finished: the same command is a no-op


def test_a_forked_child_does_not_hold_the_run_lock(tmp_path):
    """The tokenizer's worker processes are forked while the run holds its lock, and flock belongs to the open file:
    a worker that outlived its SIGKILLed run kept the directory locked ("in use by another rwkv-peft train")."""
    import multiprocessing as mp

    from peft_rwkv7.train.runlock import held, run_lock

    fork = mp.get_context("fork")
    started = fork.Event()

    def work():
        started.set()
        time.sleep(60)

    with run_lock(tmp_path / "r"):
        child = fork.Process(target=work)
        child.start()
        assert started.wait(30)
    try:
        assert not held(tmp_path / "r")
    finally:
        child.kill()
        child.join()


def test_a_run_killed_while_tokenizing_leaves_no_lock(world, tmp_path):
    """The same through the CLI: SIGKILL while two worker processes tokenize, then the next run is not refused."""
    import psutil

    from peft_rwkv7.train.runlock import held

    out = tmp_path / "tok"
    env = {**os.environ, "HOME": str(tmp_path)}  # the data cache: a fresh one, the user's left alone
    proc = _start(["train", LORA, *_overrides(world, out, **{"data.path": world / "big.jsonl"})], ROOT, env=env)
    deadline = time.time() + 120
    while len(psutil.Process(proc.pid).children()) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        assert not held(out), "the killed run's tokenizer workers hold its lock"
    finally:
        _reap(proc)


def test_ctrl_c_inside_torch_save_is_an_interrupt(tmp_path):
    """A Ctrl-C inside torch.save's zip writer came out as its RuntimeError ("enforce fail at inline_container.cc"):
    merge/convert/export printed "error: ..." (exit 1) instead of "interrupted" (130). Nothing is left behind."""
    from peft_rwkv7.model import atomic_write

    class CtrlCAt:
        def __init__(self, f):
            self.f, self.calls = f, 0

        def write(self, b):
            self.calls += 1
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # an interactive run's
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write(tmp_path / "x.pth", lambda f: torch.save({"t": torch.zeros(1 << 16)}, CtrlCAt(f)))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert list(tmp_path.iterdir()) == []


def test_an_hf_folder_cut_short_is_no_model(world, tmp_path, monkeypatch):
    """config.json makes a folder a model (is_hf_dir): it was written before the tokenizer files, so a convert cut
    short there left a folder that looked complete without them; and one rewritten in part kept the old config."""
    from peft_rwkv7.model.formats import convert, is_hf_dir, tokenizer_files

    out = tmp_path / "hf"
    convert(world / "tiny.pth", out)
    assert is_hf_dir(out)
    real = tokenizer_files.atomic_write

    def cut(path, write):
        if Path(path).name == "special_tokens_map.json":
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(tokenizer_files, "atomic_write", cut)
    for target in (out, tmp_path / "fresh"):  # over a complete folder, and a new one
        with pytest.raises(KeyboardInterrupt):
            convert(world / "tiny.pth", target)
        assert not is_hf_dir(target), target
    monkeypatch.undo()
    convert(world / "tiny.pth", out)  # the same command again
    assert is_hf_dir(out) and (out / "special_tokens_map.json").exists()
