"""The CUDA WKV7 backend without a GPU: the kernels compile (nvcc, compile-only) for Hopper and
Ampere with every head size and dtype instantiated, the torch binding compiles, and the Python
side never tries to build for CPU tensors, and ptxas reports no register spills up to head size 64.
The kernel source's numerics run on the CPU in test_cuda_emu.py; on the device, scripts/gpu_check.sh.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

from peft_rwkv7.ops import cuda as wkv_cuda

REPO = Path(__file__).resolve().parents[2]
KERNEL = REPO / "cuda" / "wkv7_cuda.cu"
BINDING = REPO / "cuda" / "wkv7_cuda_op.cpp"
ARCHS = ("90", "80")
NVCC = shutil.which("nvcc")


def _mangled(kind: str, n: int, dtype: str) -> str:
    # wkv7::{kind}_kernel<n, dtype>: Itanium mangling of the template arguments.
    targ = {"float": "f", "bf16": "13__nv_bfloat16"}[dtype]
    return f"_ZN4wkv7{len(kind) + 7}{kind}_kernelILi{n}E{targ}EEv"


@pytest.fixture(scope="module")
def ptxas_report(tmp_path_factory) -> str:
    """nvcc's stderr for the kernels with -Xptxas -v: entry functions, registers, spills."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    out = tmp_path_factory.mktemp("nvcc") / "wkv7_cuda.o"
    # With torch's own nvcc flags (no implicit half/bf16 conversions), as cpp_extension.load builds it.
    cmd = [NVCC, "-c", "-O3", "-std=c++17", *COMMON_NVCC_FLAGS, *gencode, "-Xptxas", "-v",
           "-Werror", "all-warnings", str(KERNEL), "-o", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def _kernel_usage(report: str) -> dict[tuple[str, int, str, str], tuple[int, int, int]]:
    """(kind, N, dtype, arch) -> (registers, spill store bytes, spill load bytes) from ptxas -v."""
    usage = {}
    entry = re.compile(
        r"Compiling entry function '(\w+)' for 'sm_(\d+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
        r".*?Used (\d+) registers",
        re.S,
    )
    for name, arch, stores, loads, regs in entry.findall(report):
        m = re.match(r"_ZN4wkv7\d+(forward|backward)_kernelILi(\d+)E(f|13__nv_bfloat16)E", name)
        if m:
            dtype = "float" if m.group(3) == "f" else "bf16"
            usage[(m.group(1), int(m.group(2)), dtype, arch)] = (int(regs), int(stores), int(loads))
    return usage


def test_kernels_compile_for_every_head_size_and_dtype(ptxas_report):
    compiled = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", ptxas_report)
    missing = [
        (kind, n, dtype, arch)
        for kind in ("forward", "backward")
        for n in wkv_cuda.HEAD_SIZES
        for dtype in ("float", "bf16")
        for arch in ARCHS
        if not any(name.startswith(_mangled(kind, n, dtype)) and a == arch for name, a in compiled)
    ]
    assert not missing, f"kernels not compiled: {missing}"


def test_no_register_spills_up_to_head_size_64(ptxas_report):
    # A spill is local memory (L1/L2 traffic) inside the per-step loop. Up to N = 64 both kernels keep their
    # per-thread state (S row, G row) in registers; N = 128 may spill (the backward does: a few hundred bytes).
    usage = _kernel_usage(ptxas_report)
    assert len(usage) == 2 * len(wkv_cuda.HEAD_SIZES) * 2 * len(ARCHS), sorted(usage)
    spills = {key: u for key, u in usage.items() if key[1] <= 64 and (u[1] or u[2])}
    assert not spills, f"register spills (registers, store bytes, load bytes): {spills}"


def _cuda_include() -> Path | None:
    for root in ([Path(NVCC).resolve().parents[1]] if NVCC else []) + [Path("/usr/local/cuda")]:
        if (root / "include" / "cuda_runtime_api.h").is_file():
            return root / "include"
    return None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None, reason="g++ or CUDA headers missing")
def test_binding_compiles_against_torch_headers():
    from torch.utils.cpp_extension import include_paths

    # A CPU-only torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h (it only sets export macros).
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           "-DTORCH_EXTENSION_NAME=wkv7_compile_check"]  # fmt: skip
    for inc in [*include_paths(), str(_cuda_include()), sysconfig.get_paths()["include"]]:
        cmd += ["-isystem", inc]
    proc = subprocess.run([*cmd, str(BINDING)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_not_available_for_cpu_tensors_and_never_builds():
    assert not wkv_cuda.is_available(torch.device("cpu"))
    assert not wkv_cuda.is_available("cpu")
    if not torch.cuda.is_available():
        assert not wkv_cuda.is_available("cuda")
        assert wkv_cuda._extension.cache_info().currsize == 0, "is_available tried to build without a GPU"


def test_unsupported_head_size_is_a_clear_error():
    x = torch.zeros(1, 4, 1, 48)
    with pytest.raises(ValueError, match="head size 48"):
        wkv_cuda.wkv7_cuda(x, x, x, x, x, x)


def test_sources_ship_with_the_module():
    assert all(p.is_file() for p in wkv_cuda.SOURCES), wkv_cuda.SOURCES
