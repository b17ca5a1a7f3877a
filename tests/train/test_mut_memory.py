"""What mutation testing of train/memory.py found untested (issue 23, rounds 7 and 10: where a CPU run's memory
comes from). glibc's malloc and ops.cpu's block cache are faked; the expectations are mallopt(3)'s parameter
numbers (glibc's malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_MAX -4), the calls each switch must make, and the give-up
rule's threshold by hand. The real allocator's behaviour is tests/train/test_memory.py's and test_block_cache.py's."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from peft_rwkv7.train import memory
from peft_rwkv7.train.memory import CpuBlocks, keep_freed_memory
from tests.train.test_block_cache import _FakeCpu as _StepsFake


class _Mallopt:
    def __init__(self, answers):
        self.answers, self.calls, self.argtypes, self.restype = list(answers), [], None, None

    def __call__(self, param, value):
        self.calls.append((param, value))
        return self.answers.pop(0)


class _Libc:
    def __init__(self, answers=(1, 1), glibc=True, has_mallopt=True):
        if glibc:
            self.gnu_get_libc_version = lambda: b"2.36"
        if has_mallopt:
            self.mallopt = _Mallopt(answers)


def _with_libc(monkeypatch, libc, platform="linux"):
    opened = []

    def cdll(name):
        opened.append(name)
        if isinstance(libc, Exception):
            raise libc
        return libc

    monkeypatch.setattr(memory.ctypes, "CDLL", cdll)
    monkeypatch.setattr(sys, "platform", platform)
    return opened


def test_glibc_is_told_no_mmap_and_no_trimming(monkeypatch):
    libc = _Libc()
    opened = _with_libc(monkeypatch, libc)
    assert keep_freed_memory() is True
    assert opened == [None]  # the process's own C library
    assert libc.mallopt.calls == [(-4, 0), (-1, -1)]  # M_MMAP_MAX 0, M_TRIM_THRESHOLD -1
    assert libc.mallopt.argtypes == [ctypes.c_int, ctypes.c_int] and libc.mallopt.restype is ctypes.c_int


@pytest.mark.parametrize("answers, calls", [((0, 1), 1), ((1, 0), 2)])
def test_a_refused_setting_is_not_applied(monkeypatch, answers, calls):
    libc = _Libc(answers)
    _with_libc(monkeypatch, libc)
    assert keep_freed_memory() is False
    assert len(libc.mallopt.calls) == calls


@pytest.mark.parametrize("libc, platform", [
    (_Libc(), "darwin"),  # another OS: its own allocator
    (OSError("no C library"), "linux"),
    (_Libc(glibc=False), "linux"),  # musl: mallopt is a stub
    (_Libc(has_mallopt=False), "linux"),
], ids=["macos", "no-libc", "musl", "no-mallopt"])
def test_not_glibc_changes_nothing(monkeypatch, libc, platform):
    opened = _with_libc(monkeypatch, libc, platform)
    assert keep_freed_memory() is False
    assert opened == ([] if platform == "darwin" else [None])
    if isinstance(libc, _Libc) and hasattr(libc, "mallopt"):
        assert libc.mallopt.calls == []


class _FakeCpu(_StepsFake):
    """test_block_cache's fake ops.cpu (each step adds the given hits and misses) that also records the
    availability asked and the counts read, and can be unavailable or refuse to install."""

    def __init__(self, per_step=(), available=True, installs=True):
        super().__init__(per_step)
        self.available, self.installs = available, installs

    def is_available(self, device):
        self.calls.append(("available", device))
        return self.available

    def cache_large_blocks(self):
        super().cache_large_blocks()
        return self.installs

    def block_cache_stats(self):
        self.calls.append("stats")
        return super().block_cache_stats()


def test_it_is_on_only_where_the_extension_installs_it():
    fake = _FakeCpu()
    assert CpuBlocks(True, ops_cpu=fake).on is True
    assert fake.calls == [("available", torch.device("cpu")), "install"]
    for fake in (_FakeCpu(available=False), _FakeCpu(installs=False)):
        blocks = CpuBlocks(True, ops_cpu=fake)
        assert blocks.on is False
        with blocks.step():  # off: a step is left alone, no counts read
            pass
        blocks.close()
        assert "stats" not in fake.calls and "uninstall" not in fake.calls and "trim" not in fake.calls
    assert CpuBlocks(False, ops_cpu=_FakeCpu()).on is False


def test_the_real_extension_is_the_default():
    from peft_rwkv7.ops import cpu

    with CpuBlocks(True) as blocks:
        assert blocks._cpu is cpu and blocks.on == cpu.is_available(torch.device("cpu"))
    assert blocks.on is False  # the context's end gave it up


@pytest.mark.parametrize("second, kept", [((95, 5), True), ((94, 6), False), ((0, 0), True)],
                         ids=["5%-kept", "6%-given-up", "no-large-requests"])
def test_more_than_5_percent_misses_after_the_first_step_gives_it_up(second, kept):
    fake = _FakeCpu([(40, 40), second])  # the first step misses half: it is always kept
    blocks = CpuBlocks(True, ops_cpu=fake)
    for _ in range(2):
        with blocks.step():
            fake.run_step()
    assert blocks.steps == 2
    switches = [c for c in fake.calls if c in ("trim", "uninstall")]
    assert switches == (["trim", "trim"] if kept else ["trim", "uninstall"])
    assert blocks.on is kept


def test_close_gives_it_up_once():
    fake = _FakeCpu([(10, 0)])
    with CpuBlocks(True, ops_cpu=fake) as blocks:
        with blocks.step():
            fake.run_step()
        blocks.close()
        assert blocks.on is False
    assert fake.calls.count("uninstall") == 1
