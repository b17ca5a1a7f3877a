"""A `data build` (or a dataset cache's build) killed outright leaves its temp files: the .bin one holds every token
written so far. The next writer of the same pair removes those of writers that no longer run on this host."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from peft_rwkv7.data import binidx
from peft_rwkv7.data.binidx import BinIdxWriter, MMapIndexedDataset

_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from peft_rwkv7.data.binidx import BinIdxWriter, temp_name

    w = BinIdxWriter(sys.argv[1], np.uint16)
    w.add(np.arange(1000, dtype=np.uint16), np.array([1000]))
    w._bin.flush()
    mask = Path(sys.argv[1] + ".mask")
    open(temp_name(mask.parent, mask.stem, ".mask"), "wb").write(b"mask")  # as tokenize_file names its mask's
    print("ready", flush=True)
    time.sleep(120)
""")


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_killed_writers_temp_files_are_removed_by_the_next_writer(tmp_path):
    prefix = str(tmp_path / "corpus.v2")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, prefix], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()
        proc.wait()
    left = _temps(tmp_path)
    assert len(left) == 2 and all(f".{proc.pid}." in n for n in left), left  # the .bin's and the mask's
    # beside them: a live writer's, another host's, another pair's (a name that starts the same), a user's file
    live = tmp_path / f".corpus.v2.{binidx._host()}.{os.getpid() + 0}.0123abcd.bin.tmp"
    elsewhere = tmp_path / f".corpus.v2.another-host.{proc.pid}.0123abcd.bin.tmp"
    other = tmp_path / f".corpus.v2.b.{binidx._host()}.{proc.pid}.0123abcd.bin.tmp"
    mine = tmp_path / ".corpus.v2.notes.tmp"
    keep = [live, elsewhere, other, mine]
    for p in keep:
        p.write_bytes(b"x")
    with BinIdxWriter(prefix, np.uint16) as w:
        w.add(np.array([5, 6, 7], dtype=np.uint16), np.array([3]))
    assert _temps(tmp_path) == sorted(p.name for p in keep)
    assert MMapIndexedDataset(prefix)[0].tolist() == [5, 6, 7]


def test_a_pid_that_runs_or_cannot_be_asked_is_taken_as_running():
    assert binidx._running(os.getpid()) and binidx._running(1)  # pid 1: another user's, or init
    assert binidx._running(2**70)  # no process can have it: never removed on a guess
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert binidx._running(child.pid)
        with pytest.raises(subprocess.TimeoutExpired):  # asked, not signalled: it goes on running
            child.wait(timeout=0.5)
    finally:
        child.kill()
        child.wait()
    assert not binidx._running(child.pid)


def test_temp_names_hold_the_host_and_the_pid(tmp_path, monkeypatch):
    import socket

    name = Path(binidx.temp_name(tmp_path, "c", ".bin")).name
    assert name.startswith(f".c.{socket.gethostname()}.{os.getpid()}.") and name.endswith(".bin.tmp")
    monkeypatch.setattr(socket, "gethostname", lambda: "rack/7")
    assert Path(binidx.temp_name(tmp_path, "c", ".idx")).name.startswith(f".c.rack_7.{os.getpid()}.")
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert Path(binidx.temp_name(tmp_path, "c", ".idx")).name.startswith(f".c.host.{os.getpid()}.")


def test_a_killed_builds_mask_temp_is_named_so_the_next_writer_removes_it(tmp_path, world, monkeypatch):
    """tokenize_file's own mask temp, renamed as a dead writer's, goes with the pair's next write."""
    import peft_rwkv7.data.build as B
    from peft_rwkv7.data.formats import SftFormat
    from tests.data.conftest import write_jsonl

    opened = []

    def recording_open(path, *args, **kwargs):
        opened.append(Path(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(B, "open", recording_open, raising=False)
    src = write_jsonl(tmp_path / "s.jsonl", [{"q": "Hi", "a": "Hello"}])
    out = tmp_path / "out"
    B.tokenize_file(src, out / "s", SftFormat(("q",), "a"), world, workers=1, progress=False, mask_path=out / "s.mask")
    (mask_temp,) = [p for p in opened if p.name.endswith(".tmp")]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = out / mask_temp.name.replace(f".{os.getpid()}.", f".{int(dead.stdout)}.")
    assert left != out / mask_temp.name
    left.write_bytes(b"mask")
    with BinIdxWriter(str(out / "s"), np.uint16) as w:
        w.add(np.array([1], dtype=np.uint16), np.array([1]))
    assert not left.exists()
