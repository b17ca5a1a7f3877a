"""The kernels' build cache (ops/build.py) without a compiler: what its key holds, when a folder counts as built,
the OS lock several processes share, and the private temp folder a build runs in.

test_build.py compiles a real extension in child processes (~60 s, and mutmut cannot see a child's calls); these
tests put a fake `torch.utils.cpp_extension.load` in its place, which writes a Python module where torch would put
the shared library, so every branch of load_extension runs in milliseconds. Written against the mutants
`scripts/mutation.sh build` left (docs/mutation.md).
"""

from __future__ import annotations

import json
import os
import re
import sys
import sysconfig
import types
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from peft_rwkv7.ops import build

fcntl = pytest.importorskip("fcntl")  # POSIX: the lock tests hold real locks


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _tool(tmp_path: Path, name: str, stdout: str, stderr: str = "") -> str:
    """An executable that prints `stdout` (and `stderr`) when asked `--version`, and "usage" otherwise."""
    out, err = _write(tmp_path / f"{name}.out", stdout), _write(tmp_path / f"{name}.err", stderr)
    script = _write(tmp_path / name, f'#!/bin/sh\n[ "$*" = --version ] || {{ echo usage; exit 1; }}\n'
                                     f'cat "{out}"\ncat "{err}" >&2\n')
    script.chmod(0o755)
    return str(script)


# --- the tools' and the CPU's identities ---------------------------------------------------------------------

def test_a_tools_identity_is_its_first_or_last_non_blank_line_of_stdout(tmp_path):
    ident = build._tool_identity.__wrapped__
    cc = _tool(tmp_path, "cc", "\n  cc (Debian 12.2) 12.2.0  \nCopyright\n\n  Built on 2024  \n\n")
    assert ident(cc) == "cc (Debian 12.2) 12.2.0"
    assert ident(cc, last_line=True) == "Built on 2024"
    assert ident(cc, True) == "Built on 2024"
    assert ident(_tool(tmp_path, "quiet", "", "version 1 on stderr\n")) == "no version"  # stderr is not read
    assert ident(_tool(tmp_path, "blank", "\n  \n")) == "no version"
    assert ident(str(tmp_path / "absent")) == "unavailable (FileNotFoundError)"
    assert build._tool_identity(cc) == build._tool_identity(cc)  # cached per process


def test_the_cpus_features_are_the_flags_line_else_the_processor_name(monkeypatch):
    real = Path.read_text

    def fake(text):
        return lambda self, *a, **k: text if str(self) == "/proc/cpuinfo" else real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", fake("processor\t: 0\nflags\t\t: fpu sse avx2 x:y \nflags\t: later\n"))
    assert build._cpu_features() == "fpu sse avx2 x:y"
    monkeypatch.setattr(Path, "read_text", fake("processor\t: 0\nFeatures\t: fp asimd\n"))  # arm64
    assert build._cpu_features() == "fp asimd"

    def unreadable(self, *a, **k):
        raise PermissionError("no /proc here")

    monkeypatch.setattr(Path, "read_text", unreadable)
    monkeypatch.setattr(build.platform, "processor", lambda: "some cpu")
    assert build._cpu_features() == "some cpu"
    monkeypatch.setattr(Path, "read_text", fake("processor\t: 0\nmodel name\t: X\n"))  # no flags line
    assert build._cpu_features() == "some cpu"


# --- the files a build reads -----------------------------------------------------------------------------------

def test_headers_included_with_quotes_are_followed_from_the_sources_folder_then_the_include_paths(tmp_path):
    src = _write(tmp_path / "src" / "k.cpp",
                 '#include <vector>\n  #  include "a.h"\n#include "inc.h"\n#include "missing.h"\n')
    a = _write(tmp_path / "src" / "a.h", '#include "b.h"\n#include "k.cpp"\n')
    b = _write(tmp_path / "src" / "b.h", '#include "a.h"\n')
    _write(tmp_path / "inc" / "a.h", "// shadowed by the source's own a.h\n")
    inc = _write(tmp_path / "inc" / "inc.h", "// found in the include path\n")
    other = _write(tmp_path / "src" / "other.cpp", '#include "b.h"\n')
    _write(tmp_path / "src" / "vector", "// an angle-bracket include is not followed\n")
    files = build._with_headers([tmp_path / "src" / ".." / "src" / "k.cpp", other], [tmp_path / "inc"])
    assert files == [src, other, a, inc, b]  # breadth first, each once, resolved
    assert build._with_headers([b], []) == [b, a, src.parent / "k.cpp"]


# --- the build key ---------------------------------------------------------------------------------------------

@pytest.fixture
def ident(monkeypatch):
    """_tool_identity replaced by a recorder: (command, last_line) of every call; answers `answers[command]`."""
    calls, answers = [], {}

    def fake(command, last_line=False):
        calls.append((command, last_line))
        return answers.get(command, "tool 1.0")

    monkeypatch.setattr(build, "_tool_identity", fake)
    return types.SimpleNamespace(calls=calls, answers=answers)


def _key(src, name="ext", **kwargs):
    return build._build_key(name, [src], kwargs)


def test_the_key_is_a_sha256_that_changes_with_each_input_a_build_reads(tmp_path, monkeypatch, ident):
    src = _write(tmp_path / "s" / "k.cpp", '#include "k.h"\nint x;\n')
    header = _write(tmp_path / "s" / "k.h", "// v1\n")
    base = _key(src)
    assert re.fullmatch(r"[0-9a-f]{64}", base) and _key(src) == base
    changed = {"name": _key(src, name="ext2"), "flags": _key(src, extra_cflags=["-O2"])}
    assert _key(src, extra_cflags=["-O2"], with_cuda=False) == _key(src, with_cuda=False, extra_cflags=["-O2"])
    header.write_text("// v2\n")
    changed["header"] = _key(src)
    header.write_text("// v1\n")
    src.write_text('#include "k.h"\nint y;\n')
    changed["source"] = _key(src)
    src.write_text('#include "k.h"\nint x;\n')
    renamed = _write(tmp_path / "s" / "j.cpp", src.read_text())
    changed["source's name"] = _key(renamed)
    assert _key(src) == base
    for attr, value in [("_LAYOUT", 2), ("_PACKAGE", tmp_path / "other-install")]:
        with monkeypatch.context() as m:
            m.setattr(build, attr, value)
            changed[attr] = _key(src)
    for obj, attr in [(torch, "__version__"), (torch.version, "git_version"), (torch.version, "cuda"),
                      (torch.version, "hip"), (sys, "version"), (sys, "platform")]:
        with monkeypatch.context() as m:
            m.setattr(obj, attr, "something else")
            changed[attr] = _key(src)
    with monkeypatch.context() as m:
        m.setattr(build.platform, "machine", lambda: "riscv64")
        changed["machine"] = _key(src)
    with monkeypatch.context() as m:
        m.setattr(build.sysconfig, "get_config_var",
                  lambda v: ".other.so" if v == "EXT_SUFFIX" else sysconfig.get_config_var(v))
        changed["EXT_SUFFIX"] = _key(src)
    for var in build._TORCH_BUILD_ENV:
        with monkeypatch.context() as m:
            m.setenv(var, "/somewhere/else")
            changed[var] = _key(src)
    with monkeypatch.context() as m:
        m.setenv("PEFT_RWKV7_UNRELATED", "1")
        assert _key(src) == base  # only the variables torch's build reads
    assert _key(src) == base
    assert [k for k, v in changed.items() if v == base] == []
    assert len(set(changed.values())) == len(changed)


def test_headers_from_the_include_paths_and_bytes_that_are_not_utf8_are_in_the_key(tmp_path, ident):
    src = _write(tmp_path / "s" / "k.cpp", '#include "inc.h"\n')
    header = _write(tmp_path / "inc" / "inc.h", "// v1\n")
    header.write_bytes(b"// \xff\xfe latin-1 comment\n")  # not UTF-8: still read, as bytes are hashed
    for paths in ([str(tmp_path / "inc")], [tmp_path / "inc"]):  # str or Path, as torch takes either
        before = _key(src, extra_include_paths=paths)
        header.write_bytes(b"// \xff\xfe latin-1 comment, edited\n")
        assert _key(src, extra_include_paths=paths) != before
        header.write_bytes(b"// \xff\xfe latin-1 comment\n")
        assert _key(src, extra_include_paths=paths) == before


def test_the_key_holds_the_compilers_identity(tmp_path, monkeypatch, ident):
    src = _write(tmp_path / "k.cpp", "int x;\n")
    monkeypatch.setattr(cpp_extension, "get_cxx_compiler", lambda: "/opt/cc")
    ident.answers["/opt/cc"] = "cc 12"
    base = _key(src)
    assert ident.calls == [("/opt/cc", False)]  # a .cpp source alone: no nvcc asked
    ident.answers["/opt/cc"] = "cc 13"
    assert _key(src) != base
    monkeypatch.delattr(cpp_extension, "get_cxx_compiler")  # older torch: CXX, else c++
    monkeypatch.delenv("CXX", raising=False)
    ident.calls.clear()
    _key(src)
    assert ident.calls == [("c++", False)]
    monkeypatch.setenv("CXX", "/opt/cxx")
    ident.calls.clear()
    _key(src)
    assert ident.calls == [("/opt/cxx", False)]


def test_cuda_sources_add_nvccs_identity_and_the_visible_gpus(tmp_path, monkeypatch, ident):
    cu, cpp = _write(tmp_path / "k.cu", "int x;\n"), _write(tmp_path / "k.cpp", "int x;\n")
    monkeypatch.setattr(cpp_extension, "get_cxx_compiler", lambda: "cxx")
    for var in ("PYTORCH_NVCC", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/cuda")
    nvcc = str(Path("/cuda", "bin", "nvcc"))
    ident.answers[nvcc] = "Build cuda_12.4"
    base = _key(cu)
    assert (nvcc, True) in ident.calls
    ident.answers[nvcc] = "Build cuda_12.6"
    assert _key(cu) != base
    ident.calls.clear()
    _key(cpp, with_cuda=True)
    assert (nvcc, True) in ident.calls
    ident.calls.clear()
    _key(cu, with_cuda=False)  # as torch: with_cuda=False compiles no .cu with nvcc
    assert ident.calls == [("cxx", False)]
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    ident.calls.clear()
    _key(cu)
    assert ("nvcc", True) in ident.calls
    monkeypatch.setenv("PYTORCH_NVCC", "/my/nvcc")
    ident.calls.clear()
    _key(cu)
    assert ("/my/nvcc", True) in ident.calls

    # without TORCH_CUDA_ARCH_LIST torch compiles for the visible GPUs
    monkeypatch.delenv("PYTORCH_NVCC")
    caps = [(8, 0), (9, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    two, cpu_two = _key(cu), _key(cpp)
    caps[1] = (8, 0)
    one = _key(cu)
    caps[:] = [(8, 0)]
    assert one != two and _key(cu) == one  # the set of architectures, not the count
    assert _key(cpp) == cpu_two  # no GPU in a CPU build's key
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    listed = _key(cu)
    caps[:] = [(9, 0)]
    assert _key(cu) == listed  # the list decides, not the GPUs


def test_native_flags_add_the_cpus_features(tmp_path, monkeypatch, ident):
    src = _write(tmp_path / "k.cpp", "int x;\n")
    cpu = ["avx2"]
    monkeypatch.setattr(build, "_cpu_features", lambda: cpu[0])
    portable, native = _key(src, extra_cflags=["-O3"]), _key(src, extra_cflags=["-march=native"])
    cpu[0] = "avx512f"
    assert _key(src, extra_cflags=["-march=native"]) != native
    assert _key(src, extra_cflags=["-O3"]) == portable  # portable code does not depend on this CPU


# --- where a build lives ---------------------------------------------------------------------------------------

def test_the_folder_is_named_by_the_key_under_the_roots_peft_rwkv7(tmp_path, monkeypatch):
    src = _write(tmp_path / "k.cpp", "int x;\n")
    folder = build.extension_folder("ext", [src], root=tmp_path / "r", extra_cflags=["-O3"])
    assert folder.parent == tmp_path / "r" / "peft_rwkv7" and re.fullmatch(r"ext-[0-9a-f]{16}", folder.name)
    assert folder.name[4:] == build._build_key("ext", [src], {"extra_cflags": ["-O3"]})[:16]
    same = build.extension_folder("ext", [src], root=str(tmp_path / "r"), extra_cflags=["-O3"], verbose=True)
    assert same == folder  # verbose changes what is printed, not what is built
    assert build.extension_folder("ext", [src], root=tmp_path / "r") != folder
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "env"))
    assert build.extensions_root() == tmp_path / "env"
    assert build.extension_folder("ext", [src], extra_cflags=["-O3"]) == tmp_path / "env" / "peft_rwkv7" / folder.name
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")
    assert build.extensions_root() == Path(cpp_extension.get_default_build_root())
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert build.extensions_root() == Path(cpp_extension.get_default_build_root())


# --- when a folder counts as built -----------------------------------------------------------------------------

def _built(folder: Path, module: str = "ext_mod", library: str = "ext_mod.py", code: str = "ANSWER = 42\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / library, code)
    (folder / build.MARKER).write_text(json.dumps({"module": module, "library": library}))
    return folder


def test_a_folder_is_built_only_with_a_marker_naming_a_library_inside_it(tmp_path):
    folder = _built(tmp_path / "f")
    module = build._import_built(folder)
    assert module.ANSWER == 42 and module.__name__ == "ext_mod" and Path(module.__file__) == folder / "ext_mod.py"
    marker = folder / build.MARKER
    for bad in ["{not json", "[]", '{"module": "ext_mod"}', '{"library": "ext_mod.py"}', "null"]:
        marker.write_text(bad)
        assert build._import_built(folder) is None, bad
    _write(tmp_path / "outside.py", "ANSWER = 1\n")
    marker.write_text(json.dumps({"module": "ext_mod", "library": "../outside.py"}))
    assert build._import_built(folder) is None  # a marker never points outside its folder
    marker.write_text(json.dumps({"module": "ext_mod", "library": "gone.py"}))
    assert build._import_built(folder) is None
    (folder / "sub").mkdir()
    marker.write_text(json.dumps({"module": "ext_mod", "library": "sub"}))
    assert build._import_built(folder) is None  # a folder is not a library
    marker.unlink()
    assert build._import_built(folder) is None
    assert build._import_built(tmp_path / "nothing") is None


def test_a_library_that_does_not_load_says_which_folder_to_delete(tmp_path):
    folder = _built(tmp_path / "f", code="raise RuntimeError('undefined symbol: foo')\n")
    with pytest.raises(ImportError) as e:
        build._import_built(folder)
    assert str(e.value) == f"{folder / 'ext_mod.py'}: undefined symbol: foo (delete {folder} to rebuild it)"
    folder = _built(tmp_path / "g", library="ext_mod.txt")  # no loader for this suffix
    with pytest.raises(ImportError) as e:
        build._import_built(folder)
    assert str(e.value) == (f"{folder / 'ext_mod.txt'}: not a loadable extension: {folder / 'ext_mod.txt'} "
                            f"(delete {folder} to rebuild it)")


# --- the interpreter's own tools --------------------------------------------------------------------------------

def test_the_interpreters_scripts_folder_comes_first_once_and_path_is_restored(monkeypatch):
    scripts = sysconfig.get_path("scripts")
    monkeypatch.setenv("PATH", os.pathsep.join([scripts, "/usr/bin"]))
    with build._interpreter_tools_first():
        assert os.environ["PATH"] == os.pathsep.join([scripts, "/usr/bin"])  # already first: not added twice
    monkeypatch.setenv("PATH", "")
    with build._interpreter_tools_first():
        assert os.environ["PATH"] == scripts  # no empty entry (the current folder) after it
    assert os.environ["PATH"] == ""
    monkeypatch.setenv("PATH", "/usr/bin")
    with pytest.raises(KeyError), build._interpreter_tools_first():
        assert os.environ["PATH"] == os.pathsep.join([scripts, "/usr/bin"])
        raise KeyError("a failed build")
    assert os.environ["PATH"] == "/usr/bin"
    monkeypatch.delenv("PATH")
    with build._interpreter_tools_first():
        assert os.environ["PATH"] == scripts
