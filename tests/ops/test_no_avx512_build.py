"""The CPU kernels' AVX2-only build (`-DPEFT_RWKV7_NO_AVX512`, which scripts/bench_train.py --isa avx2 builds to time
an AVX2-only CPU's code on an AVX-512 one) has no AVX-512 code and never picks the AVX-512 tiles; the default
build keeps both. Checked in the preprocessed sources (about a second each; no compile): what the clone markers
expand to, and what the WKV kernel's and the thin products' "does this CPU have AVX-512F" questions become.
Where the extension itself runs on the AVX2 clone is test_cpu_isa.py's (an emulated AVX2 CPU)."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

from peft_rwkv7.ops import cpu

CXX = shutil.which("c++") or shutil.which("g++")
pytestmark = [pytest.mark.skipif(CXX is None, reason="no C++ compiler"),
              pytest.mark.skipif(platform.machine() != "x86_64", reason="the clones are x86-64 code")]


def _preprocessed(source: str, *defines: str) -> str:
    from torch.utils.cpp_extension import include_paths

    cmd = [CXX, "-E", "-dD", "-std=c++17", *(f"-I{p}" for p in include_paths()), *defines,
           str(cpu._KERNELS / source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _define(text: str, name: str) -> str:
    lines = re.findall(rf"^#define {name}(?!\w)(.*)$", text, re.MULTILINE)
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("no_avx512", [False, True])
def test_the_avx2_only_build_drops_every_avx512_clone(no_avx512):
    defines = ["-DPEFT_RWKV7_NO_AVX512"] if no_avx512 else []
    wkv = _preprocessed("wkv7_cpu.cpp", *defines)
    clones = _define(wkv, "WKV_CLONES")
    assert "arch=x86-64-v3" in clones and ("arch=x86-64-v4" in clones) is not no_avx512
    tiles = re.search(r"bool wide_tiles\(int64_t tiles\) \{(.*?)\n\}", wkv, re.DOTALL).group(1)
    asks = "if (tiles == 0) return __builtin_cpu_supports(\"avx512f\");"
    assert (asks in tiles) is not no_avx512
    assert ("if (tiles == 0) return false;" in tiles) is no_avx512

    thin = _preprocessed("thin_cpu.cpp", *defines)
    clones = _define(thin, "THIN_CLONES")
    assert "arch=x86-64-v3" in clones and ("arch=x86-64-v4" in clones) is not no_avx512
    wide = _define(thin, r"THIN_WIDE_CPU\(\)").strip()
    assert wide == ("false" if no_avx512 else '__builtin_cpu_supports("avx512f")')
    # no source of the extension has an AVX-512 clone left in that build
    for source in ("wkv7_cpu.cpp", "thin_cpu.cpp", "token_mix_cpu.cpp", "timemix_cpu.cpp", "gate_cpu.cpp",
                   "decay_cpu.cpp", "loss_cpu.cpp", "rnn_step_cpu.cpp"):
        text = {"wkv7_cpu.cpp": wkv, "thin_cpu.cpp": thin}.get(source) or _preprocessed(source, *defines)
        assert "target_clones" in text or source == "rnn_step_cpu.cpp", source
        assert not no_avx512 or "x86-64-v4" not in text, source
