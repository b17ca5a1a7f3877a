"""ops/cpu.py's thin switches around the extension that a mutation run had left out (their real tests start a
process each, tests/train/test_block_cache.py): the block cache's install, uninstall, trim and counters against a
fake extension, and the build's flag sets. Expectations: the contracts their docstrings state (8 MiB blocks by
default; False, 0 and zero counters without the extension; the counters' names in cpu_alloc.cpp's order) and
what an OpenMP build needs (-fopenmp to compile and to link; the serial build only `omp simd`)."""

from __future__ import annotations

import sys

import pytest
import torch

from peft_rwkv7.ops import cpu


class _FakeExt:
    def __init__(self, uninstalled=1, trimmed=3 << 20, stats=(1, 2, 3, 4, 5, 6, 7)):
        self.calls, self.uninstalled, self.trimmed, self.stats = [], uninstalled, trimmed, stats

    def cpu_cache_install(self, min_bytes):
        self.calls.append(("install", min_bytes, type(min_bytes)))

    def cpu_cache_uninstall(self):
        self.calls.append("uninstall")
        return self.uninstalled

    def cpu_cache_trim(self):
        self.calls.append("trim")
        return self.trimmed

    def cpu_cache_stats(self):
        self.calls.append("stats")
        return list(self.stats)


@pytest.fixture
def ext(monkeypatch):
    fake = _FakeExt()
    monkeypatch.setattr(cpu, "_extension", lambda: fake)
    return fake


def test_the_block_cache_is_installed_for_blocks_of_8_mib_by_default(ext):
    assert cpu.cache_large_blocks() is True
    assert cpu.cache_large_blocks(1.5e6) is True  # a size in bytes reaches C++ as an integer
    assert ext.calls == [("install", 8 * 1024 * 1024, int), ("install", 1500000, int)]


def test_uninstall_says_whether_the_cache_was_installed(ext):
    assert cpu.uncache_large_blocks() is True
    ext.uninstalled = 0
    assert cpu.uncache_large_blocks() is False
    assert ext.calls == ["uninstall", "uninstall"]


def test_trim_and_the_counters_come_from_the_extension(ext):
    assert cpu.trim_block_cache() == 3 << 20 and type(cpu.trim_block_cache()) is int
    assert cpu.block_cache_stats() == {"live": 1, "free": 2, "mapped": 3, "peak_live": 4, "hits": 5, "misses": 6,
                                       "returned": 7}
    assert ext.calls == ["trim", "trim", "stats"]


def test_without_the_extension_nothing_is_cached_and_the_counters_are_zero(monkeypatch):
    monkeypatch.setattr(cpu, "_extension", lambda: None)
    assert cpu.cache_large_blocks() is False
    assert cpu.uncache_large_blocks() is False
    assert cpu.trim_block_cache() == 0
    assert cpu.block_cache_stats() == dict.fromkeys(("live", "free", "mapped", "peak_live", "hits", "misses",
                                                     "returned"), 0)


@pytest.mark.parametrize("openmp, platform", [(True, "linux"), (False, "linux"), (True, "darwin")])
def test_an_openmp_build_is_tried_first_on_linux_where_torch_runs_on_openmp(monkeypatch, openmp, platform):
    monkeypatch.setattr(torch.backends.openmp, "is_available", lambda: openmp)
    monkeypatch.setattr(sys, "platform", platform)
    sets = cpu._build_flags()
    serial = sets[-1]
    # the serial build vectorises `omp simd` loops without OpenMP's runtime; both are optimised and errno-free
    assert list(serial) == ["extra_cflags"] and "-fopenmp-simd" in serial["extra_cflags"]
    assert "-fopenmp" not in serial["extra_cflags"]
    for flags in sets:
        assert {"-O3", "-fno-math-errno"} <= set(flags["extra_cflags"])
    if openmp and platform == "linux":
        assert len(sets) == 2
        assert "-fopenmp" in sets[0]["extra_cflags"] and sets[0]["extra_ldflags"] == ["-fopenmp"]
    else:
        assert len(sets) == 1
