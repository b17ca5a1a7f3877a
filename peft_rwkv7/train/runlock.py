"""One run per run directory: an exclusive lock on `out_dir/.lock` for the run's lifetime.

The lock is an OS file lock (fcntl.flock; msvcrt on Windows), so it is released when its process dies,
however it dies: a lock file left by a dead run is simply taken over. The file's text names the
holder (pid, host, start time) for the message a second run prints."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError

LOCK_NAME = ".lock"
_HELD: set[int] = set()  # this process's lock fds, closed in a forked child (see _drop_in_child)


def _drop_in_child() -> None:
    """A forked child (the tokenizer's worker processes) shares the lock's open file, and flock belongs to that: a
    worker outliving its killed run would keep the directory locked. The child closes its copy; the parent holds."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_in_child)


def _try_lock(fd: int) -> bool:
    try:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True


@contextlib.contextmanager
def run_lock(out_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold `out_dir/.lock` while the body runs; a second holder gets a one-line UserError at once.

    enabled=False (ranks other than 0 of a multi-process run) does nothing."""
    if not enabled:
        yield
        return
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"out_dir {out_dir}: cannot be created or written ({e.strerror})") from None
    try:
        if not _try_lock(fd):
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise UserError(f"{out_dir} is in use by another rwkv-peft train ({holder}); wait for it to finish "
                            f"or train into another out_dir=...")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
                      .encode(), 0)
        _HELD.add(fd)
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)  # closing releases the lock


def held(out_dir: Path) -> bool:
    """Whether a live process holds `out_dir/.lock` now (a run is training there). Takes and at once releases
    the lock where it is free; a directory without a lock file holds no run."""
    path = Path(out_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        return not _try_lock(fd)
    finally:
        os.close(fd)


def holder_pid(out_dir: Path) -> int | None:
    """The pid named in `out_dir/.lock` (the last run that held it; check `held` for whether it still does)."""
    try:
        text = (Path(out_dir) / LOCK_NAME).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    parts = text.split()
    return int(parts[1]) if len(parts) > 1 and parts[0] == "pid" and parts[1].isdigit() else None
