"""Ctrl-C held over a block that must not be cut in the middle, and taken once the block is done. Torch-free, so the
CLI can hold it over its first `import torch`.

A Ctrl-C raised inside torch's zip writer surfaces as a RuntimeError and loses a checkpoint; raised inside `import
torch`, it is swallowed by torch's optional imports (numpy half imported: a later AttributeError with a traceback) or
thrown through a pybind11 extension (the process aborts). Held, it ends the command as a Ctrl-C should: exit 130."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


@contextlib.contextmanager
def ctrl_c_held():
    """A Ctrl-C (SIGINT) during the block takes effect at its end: the handler that was in place runs then (Python's
    own raises KeyboardInterrupt; the default action ends the process). Signals can be handled only in the main
    thread, so in another thread the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def import_torch() -> None:
    """`import torch` with Ctrl-C held (see the module's note); at once where torch is already imported."""
    if "torch" in sys.modules:
        return
    with ctrl_c_held():
        import torch  # noqa: F401
