"""The CUDA WKV7 backend without a GPU: the kernels compile (nvcc, compile-only) for Hopper and
Ampere with every head size and dtype instantiated, the torch binding compiles, and the Python
side never tries to build for CPU tensors. Numerical checks of the kernel need a GPU:
scripts/gpu_check.sh runs them.
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


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_kernels_compile_for_every_head_size_and_dtype(tmp_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    # With torch's own nvcc flags (no implicit half/bf16 conversions), as cpp_extension.load builds it.
    cmd = [NVCC, "-c", "-O3", "-std=c++17", *COMMON_NVCC_FLAGS, *gencode, "-Xptxas", "-v",
           "-Werror", "all-warnings", str(KERNEL), "-o", str(tmp_path / "wkv7_cuda.o")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", proc.stderr)
    missing = [
        (kind, n, dtype, arch)
        for kind in ("forward", "backward")
        for n in wkv_cuda.HEAD_SIZES
        for dtype in ("float", "bf16")
        for arch in ARCHS
        if not any(name.startswith(_mangled(kind, n, dtype)) and a == arch for name, a in compiled)
    ]
    assert not missing, f"kernels not compiled: {missing}"


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
