"""Building the native kernels with torch's cpp_extension, cached so that builds never hang and never evict
each other, with a notice while one compiles (the first use on a machine takes a minute or more).

Each build gets its own folder, `<torch extensions root>/peft_rwkv7/<name>-<key>/`, where the key hashes
everything that changes the binary: the sources and the headers they include with quotes, the torch, CUDA
and Python versions, the load arguments (compile flags), the compilers' identities and the platform; and
where this package is installed. So checkouts, venvs and torch versions on one machine each keep their own
build: an install never loads a library compiled from another install's files, even identical ones (a
fresh install compiles once, and a wheel provably builds from the sources it ships). Within one install,
identical sources share a build wherever they lie (a copy in a temporary folder reuses it).

A folder counts as built once its marker (`built.json`, written last by an atomic rename) names the library
beside it; such a folder is imported directly, with no compiler, ninja or lock involved. Otherwise the
build runs under an OS file lock (`<folder>.lock`; the OS drops it when its holder dies, so a killed build
never blocks later ones) in a private temporary folder, `<folder>.tmp-<pid>`, whose library is then moved
into place. Waiting for another process's build prints one line naming the lock file. Temporary folders
left by killed builds (with torch's own `lock` file in them) are removed by the next build.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]

MARKER = "built.json"
_PACKAGE = Path(__file__).resolve().parents[1]  # this install of peft_rwkv7: part of every build key
_LAYOUT = 1  # bump when the folder layout or the way builds run changes
_QUOTED_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.MULTILINE)
_CUDA_SUFFIXES = (".cu", ".cuh")
# Environment variables torch's cpp_extension reads that change what it compiles.
_TORCH_BUILD_ENV = ("CXX", "TORCH_CUDA_ARCH_LIST", "PYTORCH_ROCM_ARCH", "PYTORCH_NVCC", "CUDA_INC_PATH", "CUDNN_HOME")


@contextlib.contextmanager
def build_notice(what: str, after_s: float = 3.0) -> Iterator[None]:
    """Print one line to stderr if the body is still running after `after_s` seconds."""

    def say() -> None:
        print(f"peft_rwkv7: compiling {what} (first use on this machine; cached afterwards)...",
              file=sys.stderr, flush=True)

    timer = threading.Timer(after_s, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@functools.cache
def _tool_identity(command: str, last_line: bool = False) -> str:
    """First (or last) line of `command --version`, cached per process; a short error text if it fails."""
    try:
        out = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({type(e).__name__})"
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return (lines[-1] if last_line else lines[0]) if lines else "no version"


def _cpu_features() -> str:
    """The CPU's feature flags (Linux), else its processor name: what `-march=native` compiles for."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[-1].strip()
    return platform.processor()


def _with_headers(sources: Sequence[Path], include_dirs: Sequence[Path]) -> list[Path]:
    """`sources` followed by the files they `#include "..."` (recursively) from their own folder or
    `include_dirs`; angle-bracket includes (system, torch) are covered by the versions in the key."""
    seen: dict[Path, None] = {}
    todo = [Path(p).resolve() for p in sources]
    while todo:
        path = todo.pop(0)
        if path in seen:
            continue
        seen[path] = None
        text = path.read_text(errors="replace")
        for include in _QUOTED_INCLUDE.findall(text):
            for folder in (path.parent, *include_dirs):
                candidate = (folder / include).resolve()
                if candidate.is_file():
                    todo.append(candidate)
                    break
    return list(seen)


def _build_key(name: str, sources: Sequence[Path], load_kwargs: dict[str, Any]) -> str:
    """sha256 hex of everything that changes the compiled library (see the module docstring)."""
    import torch
    from torch.utils import cpp_extension

    h = hashlib.sha256()

    def add(label: str, value: object) -> None:
        h.update(f"{label}={value}\n".encode())

    add("layout", _LAYOUT)
    add("name", name)
    add("package", _PACKAGE)
    include_dirs = [Path(p) for p in load_kwargs.get("extra_include_paths") or ()]
    files = _with_headers(sources, include_dirs)
    for path in files:
        add("file", f"{path.name} {hashlib.sha256(path.read_bytes()).hexdigest()}")
    flags = json.dumps(load_kwargs, sort_keys=True, default=str)
    add("load", flags)
    add("torch", f"{torch.__version__} {torch.version.git_version} cuda={torch.version.cuda} hip={torch.version.hip}")
    add("python", f"{sys.version} {sysconfig.get_config_var('EXT_SUFFIX')}")
    add("platform", f"{sys.platform} {platform.machine()}")
    add("env", [(k, os.environ.get(k)) for k in _TORCH_BUILD_ENV])
    get_cxx = getattr(cpp_extension, "get_cxx_compiler", None)
    cxx = get_cxx() if get_cxx else os.environ.get("CXX", "c++")
    add("cxx", f"{cxx}: {_tool_identity(cxx)}")
    with_cuda = load_kwargs.get("with_cuda")
    if with_cuda or (with_cuda is None and any(Path(p).suffix in _CUDA_SUFFIXES for p in sources)):  # as torch
        cuda_home = cpp_extension.CUDA_HOME
        nvcc = os.environ.get("PYTORCH_NVCC") or (str(Path(cuda_home, "bin", "nvcc")) if cuda_home else "nvcc")
        add("nvcc", f"{cuda_home} {nvcc}: {_tool_identity(nvcc, last_line=True)}")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.is_available():
            # torch compiles for the visible GPUs' architectures when no list is given
            add("gpus", sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))
    if "native" in flags:
        add("cpu", _cpu_features())
    return h.hexdigest()


def extensions_root() -> Path:
    """Where torch's own cpp_extension.load builds: TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def extension_folder(name: str, sources: Sequence[Path], root: Path | None = None, **load_kwargs: Any) -> Path:
    """The folder `load_extension` builds `name` from `sources` with `load_kwargs` into; its lock file is
    the same path plus ".lock". `root` defaults to torch's extensions root (TORCH_EXTENSIONS_DIR or
    ~/.cache/torch_extensions)."""
    if root is None:
        root = extensions_root()
    kwargs = {k: v for k, v in load_kwargs.items() if k != "verbose"}
    return Path(root) / "peft_rwkv7" / f"{name}-{_build_key(name, sources, kwargs)[:16]}"


def _import_built(folder: Path) -> ModuleType | None:
    """The finished library in `folder`, imported from its file; None unless the marker and library exist."""
    try:
        info = json.loads((folder / MARKER).read_text())
        module_name, library = str(info["module"]), folder / str(info["library"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if library.parent != folder or not library.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(module_name, library)
        if spec is None or spec.loader is None:
            raise ImportError(f"not a loadable extension: {library}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:
        raise ImportError(f"{library}: {e} (delete {folder} to rebuild it)") from e
    return module


def _try_lock(fd: int) -> bool | None:
    """Take the exclusive lock on `fd` without waiting: True if taken, False if another process holds
    it, None if this platform or file system has no such lock."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            return None
    except OSError as e:
        if isinstance(e, (BlockingIOError, PermissionError)) or (fcntl is None and e.errno == errno.EDEADLK):
            return False
        return None  # e.g. a file system without locks: build unlocked (private temp folders keep it safe)
    return True


@contextlib.contextmanager
def _exclusive(lock: Path, what: str) -> Iterator[bool]:
    """Hold the OS lock on the file `lock` for the body; yields False where no lock is available.

    The OS releases it when its holder exits or is killed, so a dead holder never blocks anyone. While
    another live process holds it, one line on stderr says so and names the lock file."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        held = _try_lock(fd)
        if held is False:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = lock.read_text().strip()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            print(f"peft_rwkv7: another process{pid} is building {what}; waiting for it to finish "
                  f"(lock file {lock})", file=sys.stderr, flush=True)
            delay = 0.05
            while held is False:
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                held = _try_lock(fd)
        if held:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, f"{os.getpid()}\n".encode())
        yield bool(held)
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _interpreter_tools_first() -> Iterator[None]:
    """PATH with the running interpreter's scripts folder first, for the duration of a build.

    torch's cpp_extension runs `ninja` by name, so `.venv/bin/rwkv-peft` started without activating the
    venv would otherwise use whatever ninja the shell finds first (or none), not the venv's own."""
    scripts = sysconfig.get_path("scripts")
    old = os.environ.get("PATH", "")
    if not scripts or old.split(os.pathsep)[:1] == [scripts]:
        yield
        return
    os.environ["PATH"] = os.pathsep.join([scripts, old]) if old else scripts
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _build(name: str, sources: Sequence[Path], what: str, folder: Path, load_kwargs: dict[str, Any]) -> ModuleType:
    """Compile in `<folder>.tmp-<pid>`, move the library into `folder`, then write the marker. Called
    with the lock held (or where none exists: then concurrent builds only duplicate work)."""
    from torch.utils.cpp_extension import load

    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a dead build's, torch's stale `lock` file included
    tmp.mkdir(parents=True)
    try:
        with build_notice(what), _interpreter_tools_first():
            module = load(name=name, sources=[str(p) for p in sources], build_directory=str(tmp), **load_kwargs)
        if not isinstance(module, ModuleType) or not module.__file__:
            raise TypeError("load_extension builds Python extension modules only")
        built = Path(module.__file__)
        with open(built, "rb") as f:  # on disk before the marker says it is there
            os.fsync(f.fileno())
        shutil.rmtree(folder, ignore_errors=True)  # an attempt killed between the move and the marker
        folder.mkdir(parents=True)
        library = folder / built.name
        os.replace(built, library)
        marker = folder / f"{MARKER}.tmp-{os.getpid()}"
        with open(marker, "w") as f:
            json.dump({"module": module.__name__, "library": library.name, "sources": [str(p) for p in sources],
                       "built_at": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker, folder / MARKER)
        module.__file__ = str(library)
        return module
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_extension(
    name: str, sources: Sequence[Path], what: str, *, root: Path | None = None, **load_kwargs: Any
) -> ModuleType:
    """The extension `name` built from `sources` (all must exist) with torch.utils.cpp_extension.load's
    `load_kwargs`, announced as `what` if it compiles for more than 3 s.

    Loads the cached build for exactly these inputs when there is one (see the module docstring), else
    builds it once per machine, whatever the number of processes asking. `root` replaces torch's
    extensions root (tests). Raises on any failure; callers turn that into "not available". Call once per
    process per extension (callers cache the module)."""
    missing = [str(p) for p in sources if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"kernel sources not found: {', '.join(missing)}")
    if "build_directory" in load_kwargs:
        raise TypeError("load_extension chooses the build directory itself")
    load_kwargs = {"verbose": False, **load_kwargs}
    folder = extension_folder(name, sources, root, **load_kwargs)
    module = _import_built(folder)  # fast path: no lock, no compiler
    if module is not None:
        return module
    with _exclusive(folder.with_name(folder.name + ".lock"), what) as locked:
        module = _import_built(folder)  # built by the process we waited for
        if module is not None:
            return module
        if locked:  # every build holds the lock, so other temp folders are dead builds' leftovers
            for stale in folder.parent.glob(glob.escape(folder.name) + ".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        return _build(name, sources, what, folder, load_kwargs)
