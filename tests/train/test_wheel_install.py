"""A non-editable wheel in a fresh venv: it builds the kernels from its own package data and trains;
without the `quant` extra a QLoRA recipe is refused in one line naming it.

The fresh venv gets the package only from the wheel; its third-party dependencies are borrowed from
the running environment through a plain path entry (no download, and the running environment's
editable install of this project is not visible through it). Its kernel cache is a private folder
that already holds this checkout's CPU build: the wheel must build its own beside it, from the
sources inside the venv (the cache key names the installed package's location), not load the
checkout's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("rwkv_peft-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    from peft_rwkv7.ops import cpu

    checkout_build = cpu._extension()  # this checkout's CPU kernel, from its own kernel cache
    if checkout_build is None:
        pytest.skip("the CPU kernel does not build on this machine")
    seeded = Path(checkout_build.__file__).parent
    shutil.copytree(seeded, tmp / "kernels" / "peft_rwkv7" / seeded.name)
    return venv, tmp, seeded.name


def run_in(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`args` run with the venv's executables, its kernel cache the private cwd/kernels."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["TORCH_EXTENSIONS_DIR"] = str(cwd / "kernels")
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_wheel_trains_two_steps_with_kernels_from_package_data(wheel_venv, tiny_world):
    venv, tmp, checkout_folder = wheel_venv
    where = run_in(venv, tmp, "python", "-c",
                   "import peft_rwkv7, torch; from peft_rwkv7.ops import cpu; "
                   "print(peft_rwkv7.__file__); print(cpu.is_available(torch.device('cpu'))); "
                   "print(cpu._extension().__file__)")
    assert where.returncode == 0, where.stderr[-2000:]
    file, ok, library = where.stdout.split()
    assert str(venv) in file and str(ROOT) not in file  # the wheel's copy, not this checkout
    assert ok == "True"
    # Built here, from the wheel's sources, beside (not from) the checkout's build of the same sources.
    library = Path(library)
    assert library.parent.parent == tmp / "kernels" / "peft_rwkv7" and library.parent.name != checkout_folder
    sources = json.loads((library.parent / "built.json").read_text())["sources"]
    assert sources and all(Path(s).is_relative_to(venv) for s in sources), sources
    assert "peft_rwkv7: compiling the CPU kernels" in where.stderr, where.stderr[-2000:]
    res = run_in(venv, tmp, "rwkv-peft", "train", str(ROOT / "recipes/state_tune.yaml"),
                 *tiny_overrides(tiny_world, tmp / "run", steps=2))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done: 2 steps" in res.stdout and (tmp / "run" / "state.pth").is_file()


BLOCK_BNB = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'bitsandbytes':
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
import importlib.util
importlib.util.find_spec = (lambda real: lambda n, *a: None if n == 'bitsandbytes' else real(n, *a))(
    importlib.util.find_spec)
from peft_rwkv7.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_missing_extra_is_one_line_naming_it(wheel_venv, tiny_world):
    venv, tmp, _ = wheel_venv
    res = run_in(venv, tmp, "python", "-c", BLOCK_BNB, "train", str(ROOT / "recipes/qlora.yaml"),
                 *tiny_overrides(tiny_world, tmp / "q", steps=1))
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "pip install 'rwkv-peft[quant]'" in lines[0] and "method.quant: nf4" in lines[0], lines[0]
