"""train/memory.keep_freed_memory: after it, memory a step frees is reused by the next one instead of being
faulted in from the OS again (glibc). Each case runs in its own process: the setting is process-wide."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = r"""
import json, resource, sys
import torch
from peft_rwkv7.train.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def step():  # a training step's pattern: activations of a few sizes kept for backward, then all freed
    xs = []
    for i in range(6):
        xs.append(torch.empty((12 << 20) + i * 4096).fill_(1.0))  # 48 MiB: above glibc's largest mmap threshold
        xs.append(torch.empty(3 << 20).fill_(1.0))
    for x in reversed(xs):
        x.mul_(2)
for _ in range(3):
    step()
faults = []
for _ in range(3):  # the fewest of three steps: page faults that are not allocations (the kernel's NUMA balancing
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # marks pages to fault) come and go between steps
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": min(faults)}))
"""


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only (other C libraries keep their behaviour)")
def test_a_step_reuses_the_memory_the_last_one_freed():
    pages = 6 * (48 + 12) * 256  # 4 KiB pages of the step's tensors
    default, kept = _probe("default"), _probe("keep")
    assert default["faults"] > pages // 2  # without it each step faults its memory in again: the test can fail
    assert kept["applied"] is True
    assert kept["faults"] < pages // 20  # CI once saw 3072 faults (one 12 MiB tensor) on a step with it: not 1/50


def test_training_applies_it(tiny_world, tmp_path, monkeypatch):
    """The trainer (CLI, API, UI's process) calls it before its first step."""
    from peft_rwkv7.train import loop
    from peft_rwkv7.train.runner import train_from_cli
    from tests.train.conftest import tiny_overrides

    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append(1) or True)
    lora = Path(__file__).resolve().parents[2] / "recipes" / "lora.yaml"
    train_from_cli(lora, tiny_overrides(tiny_world, tmp_path / "run", steps=1))
    assert calls == [1]
