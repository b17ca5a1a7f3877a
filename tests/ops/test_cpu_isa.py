"""The CPU kernels on CPUs this machine is not: the AVX2 and baseline code paths under QEMU's user-mode emulator.

The extension compiles each hot loop three times (GCC target_clones: AVX-512, AVX2+FMA, baseline) and picks one
at load time from the CPU's CPUID; torch picks its own vector paths the same way. On an AVX-512 machine the op
tests only ever run the AVX-512 clone, yet most 2-core machines users have (AMD EPYC Rome/Milan, older Xeons) take
the AVX2 clone. Here the op tests run again under `qemu-x86_64 -cpu MODEL`, whose CPUID says MODEL: the same
library, the resolver choosing the AVX2 clone (EPYC-Rome) or the baseline one (Westmere), against the same oracles.

Needs qemu-user (Debian: apt-get install qemu-user; .ci/run installs it as root); skipped with the reason where
it is absent or the machine is not x86-64. About 2.5 minutes per CPU model on 2 cores (TCG is ~50x slower).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_rwkv7.ops import cpu

ROOT = Path(__file__).resolve().parents[2]
QEMU = shutil.which("qemu-x86_64")
TESTS = ["tests/ops/test_cpu_backend.py", "tests/ops/test_timemix.py", "tests/ops/test_gates.py",
         "tests/ops/test_pointwise.py", "tests/ops/test_matvec.py", "tests/ops/test_decay.py",
         "tests/ops/test_loss_cpu.py", "tests/ops/test_thin.py"]
# What torch reports under each emulated model: proof that the child saw that CPU (GCC's clone resolver reads the
# same CPUID bits: AVX2+FMA+BMI+MOVBE... selects x86-64-v3, SSE4.2 alone the baseline). QEMU's TCG has no AVX-512.
MODELS = {"EPYC-Rome": "AVX2", "Westmere": "DEFAULT"}
CHILD = """
import sys, torch, pytest
print("capability", torch.backends.cpu.get_cpu_capability(), flush=True)
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-x", *sys.argv[1:]]))
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine() != "x86_64", reason="the clones are x86-64 code"),
    pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 not installed (Debian: apt-get install qemu-user)"),
]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_cpu_kernels_pass_their_tests_on_another_cpu(model):
    assert cpu.is_available(torch.device("cpu")), "the CPU extension did not build (see the warning above)"
    proc = subprocess.run([QEMU, "-cpu", model, sys.executable, "-c", CHILD, *TESTS], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    out = proc.stdout
    assert f"capability {MODELS[model]}\n" in out, f"the child did not run on an emulated {model}: {out[-3000:]}"
    assert proc.returncode == 0, f"op tests on an emulated {model}:\n{out[-6000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in out and " failed" not in out
