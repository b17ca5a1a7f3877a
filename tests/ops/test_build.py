"""Native builds never hang and never evict each other (ops.build.load_extension).

Each test builds a one-function pybind module (a few seconds) in fresh processes under a temporary
extensions root, so the real cache is never touched. Every subprocess has a timeout, so a build that
would wait forever (as torch's own stale `lock` file made it do) fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peft_rwkv7.ops.build import MARKER, _import_built, extension_folder

NAME = "peft_rwkv7_build_test"
TIMEOUT = 180  # seconds for one subprocess build; a hang fails the test instead of blocking it
REPO = Path(__file__).resolve().parents[2]

_SOURCE = """#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", [] { return ANSWER; }); }
"""

# Loads the extension from argv[1] under root argv[2] ("-": torch's default root) and prints
# "<answer> <seconds spent in load_extension> <library path>".
_LOAD = """
import sys, time
from pathlib import Path
import torch
from peft_rwkv7.ops.build import load_extension
root = None if sys.argv[2] == "-" else Path(sys.argv[2])
t = time.perf_counter()
m = load_extension(sys.argv[3], [Path(sys.argv[1])], "the test extension", root=root)
print(m.answer(), time.perf_counter() - t, m.__file__)
"""


def _source(tmp_path: Path, answer: int = 42) -> Path:
    src = tmp_path / "src" / "answer.cpp"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(_SOURCE.replace("ANSWER", str(answer)))
    return src


def _start(src: Path, root: Path | None, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-c", _LOAD, str(src), str(root) if root else "-", NAME]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _load(src: Path, root: Path | None, env: dict[str, str] | None = None) -> tuple[int, float, Path, str]:
    """Run one loading process to completion: (answer, seconds in load_extension, library, stderr)."""
    proc = _start(src, root, env)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"load_extension did not finish in {TIMEOUT} s (hung?); stderr: {err[-2000:]}")
    assert proc.returncode == 0, err[-4000:]
    answer, seconds, library = out.split()[-3:]
    return int(answer), float(seconds), Path(library), err


def _folders(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "peft_rwkv7").iterdir())


def _without_ninja(tmp_path: Path) -> dict[str, str]:
    """A PATH whose first ninja fails: torch's load cannot compile anything in a process that gets it."""
    bin_dir = tmp_path / "broken-ninja"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ninja").write_text("#!/bin/sh\necho 'ninja must not run here' >&2\nexit 1\n")
    (bin_dir / "ninja").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_second_process_loads_without_compiling(tmp_path):
    src, root = _source(tmp_path), tmp_path / "root"
    answer, _, library, _ = _load(src, root)
    assert answer == 42
    folder = extension_folder(NAME, [src], root=root)
    assert library == folder / library.name and (folder / MARKER).is_file()
    built = library.stat()

    answer, seconds, library2, err = _load(src, root, env=_without_ninja(tmp_path))
    assert answer == 42 and library2 == library
    assert seconds < 2.0, f"the second process spent {seconds:.2f} s loading a finished build"
    assert "compiling" not in err and "waiting" not in err
    assert (library.stat().st_mtime_ns, library.stat().st_ino) == (built.st_mtime_ns, built.st_ino)
    assert _folders(root) == sorted([folder.name, folder.name + ".lock"])  # no temporary folders left


def test_killed_build_leaves_nothing_loadable_and_next_build_completes(tmp_path, monkeypatch):
    src, root = _source(tmp_path), tmp_path / "root"
    # A compiler that stalls while the gate file exists, so the build can be killed mid-compile.
    gate, started = tmp_path / "gate", tmp_path / "started"
    cxx = tmp_path / "slow-c++"
    cxx.write_text(f'#!/bin/sh\ncase " $* " in *" -c "*) touch "{started}"; '
                   f'while [ -f "{gate}" ]; do sleep 0.1; done;; esac\nexec c++ "$@"\n')
    cxx.chmod(0o755)
    gate.touch()
    monkeypatch.setenv("CXX", str(cxx))
    folder = extension_folder(NAME, [src], root=root)

    proc = _start(src, root, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not started.exists():
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "the build never reached the compiler"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process, ninja and the compiler
        proc.communicate()
    leftovers = list(folder.parent.glob(folder.name + ".tmp-*"))
    assert leftovers and (leftovers[0] / "lock").exists()  # torch's baton, left behind by the kill
    assert not (folder / MARKER).exists() and _import_built(folder) is None

    gate.unlink()
    answer, _, library, _ = _load(src, root)
    assert answer == 42 and library.parent == folder
    assert not list(folder.parent.glob(folder.name + ".tmp-*"))  # the dead build's folder is gone

    # A library without its marker (killed between the move and the marker) is never loaded.
    half = folder.with_name(folder.name + "-copy")
    half.mkdir()
    (half / library.name).write_bytes(library.read_bytes())
    assert _import_built(half) is None


def test_stale_torch_lock_does_not_hang(tmp_path):
    """torch's FileBaton `lock` left by an interrupted build made every later load wait forever."""
    src, root = _source(tmp_path), tmp_path / "root"
    folder = extension_folder(NAME, [src], root=root)
    dead_tmp = folder.with_name(folder.name + ".tmp-999999999")
    for where in (root / NAME, folder, dead_tmp):  # torch's build folder and ours
        where.mkdir(parents=True)
        (where / "lock").touch()

    # torch's default root: the old implementation then builds in root/NAME and waits on its lock
    answer, _, library, _ = _load(src, None, env={"TORCH_EXTENSIONS_DIR": str(root)})
    assert answer == 42 and library.parent == folder
    assert not dead_tmp.exists()


def test_waiting_process_names_the_lock(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    src, root = _source(tmp_path), tmp_path / "root"
    folder = extension_folder(NAME, [src], root=root)
    lock = folder.with_name(folder.name + ".lock")
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live builder
        held.write(f"{os.getpid()}\n")
        held.flush()
        proc = _start(src, root)
        try:
            ready, _, _ = select.select([proc.stderr], [], [], TIMEOUT)
            assert ready, "no message while waiting for the lock"
            line = proc.stderr.readline()
            assert "another process" in line and str(lock) in line and f"pid {os.getpid()}" in line, line
            time.sleep(1.0)
            assert proc.poll() is None and not (folder / MARKER).exists()  # it waits, and builds nothing
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
    out, err = proc.communicate(timeout=TIMEOUT)  # lock released: it builds
    assert proc.returncode == 0, err[-4000:]
    assert out.split()[0] == "42" and "another process" not in err  # the message came once


@pytest.mark.slow  # 15-30 s on a 2-core machine: CI runs it
def test_changed_source_builds_beside_the_old_one(tmp_path):
    src, root = _source(tmp_path), tmp_path / "root"
    answer, _, old, _ = _load(src, root)
    assert answer == 42
    old_built = old.stat().st_mtime_ns

    _source(tmp_path, answer=43)
    answer, _, new, _ = _load(src, root)
    assert answer == 43 and new.parent != old.parent and old.is_file()

    _source(tmp_path, answer=42)  # back to the first source: its build is still there and loads as is
    answer, seconds, again, _ = _load(src, root, env=_without_ninja(tmp_path))
    assert answer == 42 and again == old and seconds < 2.0
    assert old.stat().st_mtime_ns == old_built


def test_builds_find_the_interpreters_own_tools(monkeypatch):
    import os
    import sysconfig

    from peft_rwkv7.ops.build import _interpreter_tools_first

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with _interpreter_tools_first():
        assert os.environ["PATH"].split(os.pathsep)[0] == sysconfig.get_path("scripts")
    assert os.environ["PATH"] == "/usr/bin:/bin"


def test_each_installed_package_builds_its_own_and_copies_of_a_source_share_one(tmp_path, monkeypatch):
    """Another install of the package (a wheel in a venv, another checkout) never loads this one's build,
    even of identical sources; within one install, identical sources anywhere share a build."""
    from peft_rwkv7.ops import build

    root = tmp_path / "root"
    a, b = _source(tmp_path / "a"), _source(tmp_path / "b")
    assert extension_folder(NAME, [a], root=root) == extension_folder(NAME, [b], root=root)
    here = extension_folder(NAME, [a], root=root)
    monkeypatch.setattr(build, "_PACKAGE", tmp_path / "venv" / "site-packages" / "peft_rwkv7", raising=False)
    assert extension_folder(NAME, [a], root=root) != here


def test_only_the_binding_source_includes_torchs_python_headers():
    """A first run compiles the CPU kernels (cpu.py's sources) while the user waits. <torch/extension.h> costs
    ~22 s of compile per source on a 2-core machine and <torch/python.h> ~15 s, against ~2 s for the ATen
    headers the kernels need (cuda/cpu_aten.h): only cpu_module.cpp, which binds to Python, may include
    either, so the build stays at about half a minute instead of a minute and a half."""
    import re

    from peft_rwkv7.ops import cpu

    heavy = re.compile(r'#\s*include\s*[<"]torch/(extension|python|torch|all)\.h[>"]')
    names = [s.name for s in cpu._SOURCES]
    assert names[-1] == "cpu_module.cpp" and len(names) >= 5
    checked = set()
    for src in cpu._SOURCES:
        todo = [src]
        while todo:  # the source and the headers it includes with quotes
            path = todo.pop()
            if path in checked:
                continue
            checked.add(path)
            text = path.read_text()
            if src.name != "cpu_module.cpp":
                assert not heavy.search(text), f"{path.name} (compiled for {src.name}) includes a torch Python header"
            todo += [path.parent / h for h in re.findall(r'#\s*include\s*"([^"]+)"', text)]
    assert any(p.name == "cpu_aten.h" for p in checked)
