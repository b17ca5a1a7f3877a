"""The kernels' build cache (ops/build.py) without a compiler, part two: the OS lock several processes share and
the build itself in its private temp folder, with a fake `torch.utils.cpp_extension.load` (test_mut_build.py says
why, and holds the key's and the marker's tests). Written against the mutants `scripts/mutation.sh build` left
(docs/mutation.md).
"""

from __future__ import annotations

import errno
import json
import os
import sysconfig
import threading
import time
import types
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from peft_rwkv7.ops import build
from tests.ops.test_mut_build import _built, _write

fcntl = pytest.importorskip("fcntl")  # POSIX: the lock tests hold real locks


# --- the lock --------------------------------------------------------------------------------------------------

def test_a_lock_is_taken_refused_while_held_elsewhere_or_missing(tmp_path, monkeypatch):
    path = tmp_path / "l"
    path.touch()
    a, b = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    try:
        assert build._try_lock(a) is True
        assert build._try_lock(b) is False  # another open file: another process, to flock
        os.close(a)
        a = -1
        assert build._try_lock(b) is True
    finally:
        for fd in (a, b):
            if fd >= 0:
                os.close(fd)

    def raising(exc):
        def flock(fd, op):
            assert op == fcntl.LOCK_EX | fcntl.LOCK_NB  # never a blocking call
            raise exc
        return types.SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB)

    monkeypatch.setattr(build, "fcntl", raising(BlockingIOError(errno.EWOULDBLOCK, "held")))
    assert build._try_lock(0) is False
    monkeypatch.setattr(build, "fcntl", raising(PermissionError(errno.EACCES, "held")))
    assert build._try_lock(0) is False
    monkeypatch.setattr(build, "fcntl", raising(OSError(errno.ENOLCK, "no locks on this file system")))
    assert build._try_lock(0) is None
    monkeypatch.setattr(build, "fcntl", raising(OSError(errno.EDEADLK, "deadlock")))
    assert build._try_lock(0) is None  # EDEADLK means "held" only to Windows' msvcrt

    monkeypatch.setattr(build, "fcntl", None)
    monkeypatch.setattr(build, "msvcrt", None)
    assert build._try_lock(0) is None

    calls = []

    def locking(exc):
        def lock(fd, mode, n):
            calls.append((fd, mode, n))
            if exc:
                raise exc
        return types.SimpleNamespace(locking=lock, LK_NBLCK=2)

    monkeypatch.setattr(build, "msvcrt", locking(None))
    assert build._try_lock(7) is True and calls == [(7, 2, 1)]
    monkeypatch.setattr(build, "msvcrt", locking(OSError(errno.EDEADLK, "held")))
    assert build._try_lock(7) is False
    monkeypatch.setattr(build, "msvcrt", locking(OSError(errno.EACCES, "held")))  # PermissionError's errno
    assert build._try_lock(7) is False
    monkeypatch.setattr(build, "msvcrt", locking(OSError(errno.EIO, "broken")))
    assert build._try_lock(7) is None


def _free(lock: Path) -> bool | None:
    """Whether another open file (another process, to flock) could take `lock` now; it is let go at once."""
    fd = os.open(lock, os.O_RDWR)
    try:
        return build._try_lock(fd)
    finally:
        os.close(fd)


def test_the_lock_holder_writes_its_pid_and_releases_the_lock_on_exit(tmp_path, capsys):
    lock = tmp_path / "deep" / "er" / "x.lock"
    with build._exclusive(lock, "the kernels") as held:
        assert held is True and lock.read_text() == f"{os.getpid()}\n"
        assert _free(lock) is False
    assert _free(lock) is True  # checked before this process asks again: a lock kept would make it wait forever
    lock.write_text("123456789012345\n")  # a longer pid from an earlier holder: replaced, not overwritten in part
    with build._exclusive(lock, "the kernels") as held:
        assert held is True and lock.read_text() == f"{os.getpid()}\n"
    assert _free(lock) is True
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError), build._exclusive(lock, "the kernels"):
        raise ValueError("a failed build")
    assert _free(lock) is True  # released on an exception too


def test_the_lock_file_is_readable_by_all_and_writable_by_its_owner(tmp_path):
    lock = tmp_path / "x.lock"
    umask = os.umask(0o022)
    try:
        with build._exclusive(lock, "the kernels"):
            pass
    finally:
        os.umask(umask)
    assert lock.stat().st_mode & 0o777 == 0o644


def _wait_for_lock(lock: Path, holder: str | bytes, capsys, hold_s: float = 0.3) -> tuple[list[bool], str, float]:
    """Hold `lock` (its file holding `holder`) while another thread asks for it; release after `hold_s`."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    got, when = [], []
    with open(lock, "wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(holder.encode() if isinstance(holder, str) else holder)
        f.flush()

        def waiter():
            with build._exclusive(lock, "the kernels") as held:
                when.append(time.monotonic())
                got.append(held)

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(hold_s)
        assert not got  # still waiting
        released = time.monotonic()
    t.join(timeout=30)
    assert not t.is_alive()
    return got, capsys.readouterr().err, when[0] - released


def test_a_process_waiting_for_the_lock_says_once_who_holds_it(tmp_path, capsys):
    lock = tmp_path / "x.lock"
    got, err, waited = _wait_for_lock(lock, "4242\n", capsys)
    assert got == [True] and lock.read_text() == f"{os.getpid()}\n"
    assert err == (f"peft_rwkv7: another process (pid 4242) is building the kernels; waiting for it to finish "
                   f"(lock file {lock})\n")
    assert waited < 5.0
    anonymous = f"peft_rwkv7: another process is building the kernels; waiting for it to finish (lock file {lock})\n"
    for holder in ("not a pid\n", b"\xff\xfe\n", ""):  # not a number, not text, nothing yet
        got, err, _ = _wait_for_lock(lock, holder, capsys)
        assert got == [True] and err == anonymous, holder


def test_an_unreadable_lock_file_still_waits_for_its_holder(tmp_path, capsys, monkeypatch):
    lock, real = tmp_path / "x.lock", Path.read_text

    def read_text(self, *a, **k):
        if self == lock:
            raise PermissionError(errno.EACCES, "denied")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    got, err, _ = _wait_for_lock(lock, "4242\n", capsys)
    assert got == [True] and "another process is building" in err and "pid" not in err


def test_a_released_lock_is_taken_within_a_poll(tmp_path, capsys):
    """Polled every 0.05 s at first, doubling up to 0.5 s: a short build's waiter goes on almost at once."""
    _, _, waited = _wait_for_lock(tmp_path / "x.lock", "1\n", capsys, hold_s=0.1)
    assert waited < 0.6


def test_without_a_lock_the_build_goes_on_unlocked(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "_try_lock", lambda fd: None)
    lock = tmp_path / "x.lock"
    with build._exclusive(lock, "the kernels") as held:
        assert held is False and lock.read_text() == ""  # nothing claimed


# --- the build itself, with a fake compiler ---------------------------------------------------------------------

@pytest.fixture
def fake_load(monkeypatch, tmp_path):
    """torch's load replaced: it writes `<build_directory>/<name>.py` (ANSWER = 42) and imports it from there.
    The default extensions root is a temporary folder too, so that no mistake writes into the real cache."""
    calls = []
    scripts = sysconfig.get_path("scripts")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "default-root"))

    def load(name, sources, build_directory, **kwargs):
        folder = Path(build_directory)
        calls.append({"name": name, "sources": sources, "dir": folder, "kwargs": kwargs,
                      "contents": sorted(p.name for p in folder.iterdir()),
                      "path_first": os.environ["PATH"].split(os.pathsep)[0] == scripts})
        if fake.fail:
            raise RuntimeError("compiler error")
        lib = _write(folder / f"{name}.py", f"ANSWER = {fake.answer}\n")
        _write(folder / "build.ninja", "# torch's build files stay behind\n")
        spec = build.importlib.util.spec_from_file_location(name, lib)
        module = build.importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return fake.returns(module)

    fake = types.SimpleNamespace(calls=calls, fail=False, answer=42, returns=lambda m: m)
    monkeypatch.setattr(cpp_extension, "load", load)
    return fake


def _sources(tmp_path: Path) -> list[Path]:
    return [_write(tmp_path / "src" / "a.cpp", "int a;\n"), _write(tmp_path / "src" / "b.cpp", "int b;\n")]


def test_a_first_load_builds_in_a_private_folder_and_a_second_reads_the_marker(tmp_path, fake_load):
    srcs, root = _sources(tmp_path), tmp_path / "root"
    folder = build.extension_folder("ext", srcs, root=root, extra_cflags=["-O3"])
    before = time.strftime("%Y-%m-%d %H:%M:%S")
    module = build.load_extension("ext", srcs, "the test kernels", root=root, extra_cflags=["-O3"])
    (call,) = fake_load.calls
    assert call["name"] == "ext" and call["sources"] == [str(p) for p in srcs]
    assert call["dir"] == folder.with_name(f"{folder.name}.tmp-{os.getpid()}") and call["contents"] == []
    assert call["kwargs"] == {"verbose": False, "extra_cflags": ["-O3"]} and call["path_first"]
    assert module.ANSWER == 42 and Path(module.__file__) == folder / "ext.py"
    assert sorted(p.name for p in folder.iterdir()) == [build.MARKER, "ext.py"]
    marker = json.loads((folder / build.MARKER).read_text())
    assert {k: marker[k] for k in ("module", "library", "sources")} == {
        "module": "ext", "library": "ext.py", "sources": [str(p) for p in srcs]}
    assert before <= marker["built_at"] <= time.strftime("%Y-%m-%d %H:%M:%S")
    assert sorted(p.name for p in root.joinpath("peft_rwkv7").iterdir()) == [folder.name, folder.name + ".lock"]

    fake_load.answer = 43  # a rebuild would say so
    again = build.load_extension("ext", srcs, "the test kernels", root=root, extra_cflags=["-O3"], verbose=False)
    assert again.ANSWER == 42 and len(fake_load.calls) == 1
    build.load_extension("ext", srcs, "the test kernels", root=root, extra_cflags=["-O3"], verbose=True)
    assert len(fake_load.calls) == 1  # verbose is not part of the key
    other = build.load_extension("ext", srcs, "the test kernels", root=root, extra_cflags=["-O2"], verbose=True)
    assert other.ANSWER == 43 and fake_load.calls[-1]["kwargs"] == {"verbose": True, "extra_cflags": ["-O2"]}


def test_a_build_replaces_leftovers_of_killed_builds(tmp_path, fake_load):
    srcs, root = _sources(tmp_path), tmp_path / "root"
    folder = build.extension_folder("ext", srcs, root=root)
    _write(folder / "ext.py", "ANSWER = 0\n")  # moved in, then killed before the marker
    _write(folder / "junk", "")
    mine = _write(folder.with_name(f"{folder.name}.tmp-{os.getpid()}") / "lock", "")  # torch's baton
    dead = _write(folder.with_name(f"{folder.name}.tmp-999999") / "lock", "")
    other = _write(folder.with_name("ext-0123456789abcdef.tmp-999999") / "lock", "")  # another build's
    assert build.load_extension("ext", srcs, "the test kernels", root=root).ANSWER == 42
    assert fake_load.calls[0]["contents"] == []  # torch's stale baton is gone before torch looks
    assert sorted(p.name for p in folder.iterdir()) == [build.MARKER, "ext.py"]
    assert not mine.parent.exists() and not dead.parent.exists() and other.exists()


def test_without_a_lock_other_builds_temp_folders_are_left_alone(tmp_path, fake_load, monkeypatch):
    monkeypatch.setattr(build, "_try_lock", lambda fd: None)
    srcs, root = _sources(tmp_path), tmp_path / "root"
    folder = build.extension_folder("ext", srcs, root=root)
    live = _write(folder.with_name(f"{folder.name}.tmp-999999") / "lock", "")  # perhaps a live build
    assert build.load_extension("ext", srcs, "the test kernels", root=root).ANSWER == 42
    assert live.exists()


def test_a_failed_build_leaves_nothing_behind_and_keeps_its_error(tmp_path, fake_load):
    srcs, root = _sources(tmp_path), tmp_path / "root"
    folder = build.extension_folder("ext", srcs, root=root)
    fake_load.fail = True
    with pytest.raises(RuntimeError, match="^compiler error$"):
        build.load_extension("ext", srcs, "the test kernels", root=root)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name + ".lock"]
    fake_load.fail = False
    fake_load.returns = lambda m: types.SimpleNamespace(__file__=m.__file__)
    with pytest.raises(TypeError, match="^load_extension builds Python extension modules only$"):
        build.load_extension("ext", srcs, "the test kernels", root=root)

    def no_file(m):
        m.__file__ = ""
        return m

    fake_load.returns = no_file
    with pytest.raises(TypeError, match="^load_extension builds Python extension modules only$"):
        build.load_extension("ext", srcs, "the test kernels", root=root)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name + ".lock"]


def test_a_build_finished_by_the_process_waited_for_is_loaded_not_redone(tmp_path, fake_load, monkeypatch):
    srcs, root = _sources(tmp_path), tmp_path / "root"
    folder = build.extension_folder("ext", srcs, root=root)
    real = build._exclusive
    seen = []

    def exclusive(lock, what):
        seen.append((lock, what))
        _built(folder, module="ext", library="ext.py", code="ANSWER = 7\n")  # the other process finished
        return real(lock, what)

    monkeypatch.setattr(build, "_exclusive", exclusive)
    assert build.load_extension("ext", srcs, "the test kernels", root=root).ANSWER == 7
    assert seen == [(folder.with_name(folder.name + ".lock"), "the test kernels")] and fake_load.calls == []


def test_a_built_folder_loads_without_taking_the_lock(tmp_path, fake_load, monkeypatch):
    """A finished build is read even while another process holds the lock (another build of the same name)."""
    srcs, root = _sources(tmp_path), tmp_path / "root"
    _built(build.extension_folder("ext", srcs, root=root), module="ext", library="ext.py", code="ANSWER = 5\n")

    def no_lock(lock, what):
        raise AssertionError("the lock was asked for")

    monkeypatch.setattr(build, "_exclusive", no_lock)
    assert build.load_extension("ext", srcs, "the test kernels", root=root).ANSWER == 5


def test_an_unlocked_build_clears_its_own_temp_folder_first(tmp_path, fake_load, monkeypatch):
    monkeypatch.setattr(build, "_try_lock", lambda fd: None)
    srcs, root = _sources(tmp_path), tmp_path / "root"
    folder = build.extension_folder("ext", srcs, root=root)
    mine = _write(folder.with_name(f"{folder.name}.tmp-{os.getpid()}") / "lock", "")  # a killed build's, same pid
    assert build.load_extension("ext", srcs, "the test kernels", root=root).ANSWER == 42
    assert fake_load.calls[0]["contents"] == [] and not mine.parent.exists()


def test_the_notice_waits_three_seconds_on_a_timer_that_never_keeps_a_process_alive(monkeypatch):
    timers = []

    class Timer:
        def __init__(self, interval, fn):
            self.interval, self.fn, self.daemon, self.started, self.cancelled = interval, fn, False, False, False
            timers.append(self)

        def start(self):
            self.started = True

        def cancel(self):
            self.cancelled = True

    monkeypatch.setattr(build.threading, "Timer", Timer)
    with build.build_notice("the kernels"):
        (timer,) = timers
        assert timer.interval == 3.0 and timer.daemon is True and timer.started and not timer.cancelled
    assert timer.cancelled


def test_the_build_is_announced_under_the_callers_name(tmp_path, fake_load, monkeypatch):
    said = []
    monkeypatch.setattr(build, "build_notice", lambda what: said.append(what) or build.contextlib.nullcontext())
    build.load_extension("ext", _sources(tmp_path), "the CPU kernels", root=tmp_path / "root")
    assert said == ["the CPU kernels"]


def test_missing_sources_and_a_chosen_build_folder_are_refused(tmp_path, fake_load):
    srcs = _sources(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        build.load_extension("ext", [srcs[0], tmp_path / "x.cpp", tmp_path / "y.cpp"], "k", root=tmp_path)
    assert str(e.value) == f"kernel sources not found: {tmp_path / 'x.cpp'}, {tmp_path / 'y.cpp'}"
    with pytest.raises(FileNotFoundError):
        build.load_extension("ext", [tmp_path / "src"], "k", root=tmp_path)  # a folder is not a source
    with pytest.raises(TypeError, match="^load_extension chooses the build directory itself$"):
        build.load_extension("ext", srcs, "k", root=tmp_path, build_directory=str(tmp_path))
    assert fake_load.calls == []


