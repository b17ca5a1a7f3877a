"""The kernel sources must ship inside the package (wheels and non-editable installs compile them)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

import peft_rwkv7
from peft_rwkv7.ops import cpu, cuda

ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_source_is_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["peft_rwkv7.ops"]
    ops_dir = Path(peft_rwkv7.__file__).parent / "ops"
    for source in (*cpu._SOURCES, *cuda.SOURCES):
        assert source.is_file(), source
        rel = source.relative_to(ops_dir).as_posix()  # inside the package, not beside it
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not matched by package-data {globs}"
