"""Ctrl-C held over a block (interrupts.py): a checkpoint's save, and torch's import at a command's start.

A Ctrl-C that lands inside `import torch` is swallowed by torch's optional import of numpy (the command then fails
later with an AttributeError and a traceback) or thrown through pybind11 (the process aborts, rc -6; seen in the kill
sweep). Here the Ctrl-C is sent from inside the import, at a module that torch imports, so the moment is exact."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from peft_rwkv7.interrupts import ctrl_c_held, import_torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data/demo/rwkv7-demo.pth"

# Sends SIGINT to this process as `TARGET` starts to import (once), then runs CODE.
_PROBE = """
import os, signal, sys
class CtrlCAt:
    def find_spec(self, name, path=None, target=None):
        if name == {target!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlCAt())
{code}
"""


def _run(target: str, code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # SIGINT at its default in the child, so that Python installs its own handler (as in a terminal): a pytest
    # started in the background hands it down ignored
    return subprocess.run([sys.executable, "-c", _PROBE.format(target=target, code=code)], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_in_the_block_takes_effect_at_its_end():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with ctrl_c_held():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("written")  # the body goes on to its end
        assert done == ["written"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with ctrl_c_held():  # no Ctrl-C: nothing raised
            pass
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_in_another_thread_the_signals_are_left_alone():
    """Only the main thread may set signal handlers: elsewhere (a save from a helper thread) it does nothing."""
    errors = []

    def save():
        try:
            with ctrl_c_held():
                pass
        except Exception as e:  # signal.signal outside the main thread raises ValueError
            errors.append(e)

    t = threading.Thread(target=save)
    t.start()
    t.join()
    assert errors == []


@pytest.mark.parametrize("before, rc, said", [("signal.SIG_DFL", -signal.SIGINT, ""), ("signal.SIG_IGN", 0, "end")])
def test_the_handler_in_place_decides_what_a_held_ctrl_c_does(before, rc, said):
    """Where Ctrl-C had its default action the process ends by it once the block is done; ignored, it stays so."""
    code = ("import os, signal\nfrom peft_rwkv7.interrupts import ctrl_c_held\n"
            f"signal.signal(signal.SIGINT, {before})\n"
            "with ctrl_c_held():\n    os.kill(os.getpid(), signal.SIGINT)\n    print('block', flush=True)\n"
            "print('end', flush=True)")
    res = _run("-", code)
    assert res.returncode == rc and res.stdout.split() == ["block", *([said] if said else [])], res


@pytest.mark.parametrize("before, raised", [(signal.SIG_DFL, [signal.SIGINT]), (signal.SIG_IGN, [])])
def test_a_held_ctrl_c_is_sent_again_where_its_default_action_was_in_place(monkeypatch, before, raised):
    """In this process, with the signal sent again recorded instead (the subprocess test above sees its effect)."""
    sent = []
    monkeypatch.setattr(signal, "raise_signal", sent.append)
    previous = signal.signal(signal.SIGINT, before)
    try:
        with ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == before
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sent == raised


def test_import_torch_holds_ctrl_c_over_the_import_only_where_torch_is_not_imported(monkeypatch):
    """A stand-in torch, found by a finder of this test, records the handler in place while it is imported."""
    seen = []

    class Loader:
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            seen.append(signal.getsignal(signal.SIGINT))
            os.kill(os.getpid(), signal.SIGINT)

    class Finder:
        def find_spec(self, name, path=None, target=None):
            return importlib.util.spec_from_loader(name, Loader()) if name == "torch" else None

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        handlers = []
        real = signal.signal
        monkeypatch.setattr(signal, "signal", lambda *a: handlers.append(a) or real(*a))
        import_torch()  # torch is imported (this test file's conftest): no handler is set
        monkeypatch.setattr(signal, "signal", real)
        assert seen == [] and handlers == []
        monkeypatch.delitem(sys.modules, "torch")
        monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
        with pytest.raises(KeyboardInterrupt):
            import_torch()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(seen) == 1 and seen[0] not in (signal.default_int_handler, signal.SIG_DFL, signal.SIG_IGN)


@pytest.mark.parametrize("target", ["numpy", "torch._C", "torch.nn"])
def test_import_torch_takes_a_ctrl_c_once_torch_is_whole(target):
    code = ("from peft_rwkv7.interrupts import import_torch\n"
            "try:\n    import_torch()\nexcept KeyboardInterrupt:\n    print('interrupted after the import')\n"
            "import numpy, torch\n"
            "print(float(torch.from_numpy(numpy.multiply(numpy.ones(2), 3)).sum()))")
    res = _run(target, code)
    assert res.returncode == 0 and res.stdout.split("\n")[:2] == ["interrupted after the import", "6.0"], res


@pytest.mark.skipif(not DEMO.exists(), reason="the bundled demo model")
@pytest.mark.parametrize("target", ["numpy", "torch._C", "torch.nn"])
@pytest.mark.parametrize("command", ["convert", "train"])
def test_a_ctrl_c_while_a_command_imports_torch_ends_it_as_interrupted(tmp_path, command, target):
    out = tmp_path / "out"
    argv = {"convert": ["convert", str(DEMO), str(out / "demo.st")],
            "train": ["train", "recipes/state_tune.yaml", f"out_dir={out}", "train.max_steps=1",
                      "log.progress=false"]}[command]
    res = _run(target, f"import sys\nfrom peft_rwkv7.cli import main\nsys.exit(main({argv!r}))")
    assert (res.returncode, res.stderr.strip().splitlines()[-1:]) == (130, ["interrupted"]), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not (out / "demo.st").exists() and not (out / "adapter.safetensors").exists()
