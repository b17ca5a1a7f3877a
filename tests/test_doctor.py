"""`rwkv-peft doctor`: exit 0, every section on screen, clean --json, and exit 1 when a kernel computes
wrong (a wrong CPU kernel put in place of the real one). The CPU-machine screen is checked with CUDA
hidden (so it holds on a GPU machine too), with and without nvcc; the CUDA kernels' compile-only check
runs for real where nvcc exists; a GPU machine's own screen is checked where there is one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_rwkv7 import doctor
from peft_rwkv7.cli import main
from peft_rwkv7.ops import cpu, dispatch, precision, thin_check, wkv7_reference

ROOT = Path(__file__).resolve().parents[1]
COMPILED = {"ok": True, "arch": "sm_80", "seconds": 1.5, "error": None}
BROKEN = {"ok": False, "arch": "sm_80", "seconds": 0.5, "error": "wkv7_cuda.cu(1): error: expected a ';'"}
SLOW_BF16 = {"fast": False, "ratio": 0.2, "seconds": 0.05, "gflops": {"F.linear x[16,768] W[3072,768]":
                                                                      {"fp32": 27.0, "bf16": 5.5}}}
FAST_BF16 = {"fast": True, "ratio": 2.5, "seconds": 0.8, "gflops": {"F.linear x[512,768] W[3072,768]":
                                                                    {"fp32": 60.0, "bf16": 180.0},
                                                                    "g[512,3072] @ W[3072,768]":
                                                                    {"fp32": 60.0, "bf16": 150.0}},
             "row_chunks": True, "row_chunks_speedup": 1.27}


def wrong_output(r, w, k, v, a, b, state=None):
    y, s = wkv7_reference(r, w, k, v, a, b, state)
    return y + 0.01 * y.detach(), s


def measured_as(monkeypatch, tmp_path, record: dict) -> None:
    """This CPU's bf16 check measures `record` now (the cache in tmp_path: never the user's)."""
    monkeypatch.setattr(precision, "default_cache_dir", lambda: tmp_path / "bf16-cache")
    monkeypatch.setattr(precision, "measure_bf16", lambda: dict(record))
    monkeypatch.setattr(thin_check, "measure_thin", lambda: dict(THIN))  # the same cache folder


THIN = {"speedup": {"nt": {"8": 0.9, "16": 1.2, "32": 1.0, "64": 0.8},
                    "tn": {"8": 3.0, "16": 2.5, "32": 2.0, "64": 1.05}}, "seconds": 0.3}


@pytest.fixture
def cpu_machine(monkeypatch, tmp_path):
    """This machine as one without a CUDA device (whatever it has), without nvcc, and with a CPU whose bf16
    matmuls measure slow; returns monkeypatch."""
    measured_as(monkeypatch, tmp_path, SLOW_BF16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(doctor, "_nvcc", lambda: None)
    monkeypatch.setattr(doctor, "_compile_cuda", lambda: pytest.fail("compiled although there is no nvcc"))
    return monkeypatch


def _screen(capsys, status: int = 0) -> tuple[str, dict[str, str]]:
    assert main(["doctor"]) == status
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    return out, lines


def test_doctor_screen_without_gpu_or_nvcc(cpu_machine, capsys):
    out, lines = _screen(capsys)
    for label in ("python", "torch", "GPU", "bf16", "cpu-bf16", "cpu-thin", "precision", "nvcc", "cpu", "cuda",
                  "triton", "reference", "auto", "peft", "bitsandbytes", "deepspeed", "wandb"):
        assert label in lines, f"no {label} line in:\n{out}"
    assert "  cpu          fp32 PASS" in out and "bf16 PASS" in out
    assert lines["cuda"] == "  cuda         skipped: no CUDA device; no nvcc, so not compiled"  # not a failure
    assert lines["nvcc"].startswith("  nvcc         not found")
    assert "auto picks   fp32 -> cpu, bf16 -> cpu" in out
    assert out.rstrip().splitlines()[-1].startswith("verdict: OK - ready to train on CPU")


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "slow"])
def test_doctor_shows_the_bf16_check_and_what_auto_picks(cpu_machine, tmp_path, capsys, fast):
    measured_as(cpu_machine, tmp_path, FAST_BF16 if fast else SLOW_BF16)
    out, lines = _screen(capsys)
    if fast:
        assert lines["cpu-bf16"].startswith("  cpu-bf16     fast: bf16 matmuls run at 2.5x fp32's speed on this CPU "
                                            "at worst (measured now in 0.80 s)")
        assert "                 F.linear x[512,768] W[3072,768]: fp32 60.0, bf16 180.0 GFLOP/s\n" in out
        assert "                 g[512,3072] @ W[3072,768]: fp32 60.0, bf16 150.0 GFLOP/s\n" in out
        assert ("                 products of 600-1792 rows: in row chunks (chunks 1.27x the whole calls' "
                "speed)\n") in out
    else:
        assert lines["cpu-bf16"].startswith("  cpu-bf16     slow: bf16 matmuls run at 0.2x fp32's speed")
        assert "                 F.linear x[16,768] W[3072,768]: fp32 27.0, bf16 5.5 GFLOP/s\n" in out
        assert "row chunks" not in out and "products of" not in out  # not measured where bf16 is slow
    picks = "bf16" if fast else "fp32"
    assert lines["precision"] == f"  precision    auto (train.precision, --dtype) picks {picks} on this CPU"
    assert lines["cpu-thin"] == ("  cpu-thin     LoRA's fp32 thin products, kernel's speed over BLAS's: nt: r8 0.90x "
                                 "(BLAS), r16 1.20x, r32 1.00x (BLAS), r64 0.80x (BLAS); tn: r8 3.00x, r16 2.50x, "
                                 "r32 2.00x, r64 1.05x (BLAS) (needs 1.1x; measured now in 0.30 s)")
    _, lines = _screen(capsys)  # a second run reads the cache
    assert "(cached measurement)" in lines["cpu-bf16"] and "; cached measurement)" in lines["cpu-thin"]


def test_doctor_names_the_libraries_instruction_caps_it_measured_under(cpu_machine, tmp_path, capsys, monkeypatch):
    measured_as(cpu_machine, tmp_path, SLOW_BF16)
    for var in precision.LIBRARY_ISA_CAPS:
        monkeypatch.delenv(var, raising=False)
    out, _ = _screen(capsys)
    assert "instruction caps" not in out
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    out, _ = _screen(capsys)
    assert ("                 measured under the libraries' instruction caps MKL_ENABLE_INSTRUCTIONS=AVX2, "
            "ONEDNN_MAX_CPU_ISA=AVX2\n") in out


@pytest.mark.parametrize("result", [COMPILED, BROKEN], ids=["compiles", "broken"])
def test_doctor_reports_the_cuda_compile_where_nvcc_is_but_no_gpu(cpu_machine, capsys, result):
    cpu_machine.setattr(doctor, "_nvcc", lambda: "/opt/cuda/bin/nvcc (CUDA 13.0)")
    cpu_machine.setattr(doctor, "_compile_cuda", lambda: result)
    out, lines = _screen(capsys)  # a CUDA kernel that does not compile on a CPU machine is a warning only
    if result["ok"]:
        assert lines["cuda"] == ("  cuda         skipped: no CUDA device; its kernels compile "
                                 "(nvcc -c for sm_80 in 1.5 s, compile-only: nothing ran)")
        assert "warning: the CUDA kernels" not in out
    else:
        assert lines["cuda"] == ("  cuda         skipped: no CUDA device; its kernels do NOT compile "
                                 "(nvcc -c for sm_80): wkv7_cuda.cu(1): error: expected a ';'")
        assert "warning: the CUDA kernels do not compile with this nvcc (sm_80): wkv7_cuda.cu(1)" in out
    assert out.rstrip().splitlines()[-1].startswith("verdict: OK")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_compile_check_compiles_the_kernels_and_names_an_error(tmp_path):
    # The kernels compile with this nvcc (tests/ops/test_cuda_compile.py compiles them for sm_90/sm_80 too).
    got = doctor._compile_cuda()
    assert got["ok"] and got["error"] is None and got["arch"] == "sm_80", got
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void k() { int x = ; }\n")
    got = doctor._compile_cuda((broken,))
    assert not got["ok"] and "broken.cu" in got["error"] and "error" in got["error"], got


def test_doctor_fails_on_a_wrong_kernel(cpu_machine, capsys):
    cpu_machine.setattr(dispatch, "_VERDICTS", {})  # fresh verdicts, restored after the test
    cpu_machine.setattr(cpu, "wkv7_cpu", wrong_output)
    out, _ = _screen(capsys, status=1)
    assert "  cpu          fp32 FAIL err 1.0e-02 > 1e-04 (y)" in out
    assert "auto picks   fp32 -> reference" in out
    assert out.rstrip().splitlines()[-1].startswith("verdict: FAIL - cpu kernel is WRONG in fp32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_doctor_screen_on_a_gpu_machine(capsys):
    assert main(["doctor"]) in (0, 1)
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert torch.cuda.get_device_name(0) in lines["GPU"]
    for name in ("cuda", "triton"):  # built and checked, or not built with the reason: never skipped
        assert "skipped" not in lines[name] and ("PASS" in lines[name] or "FAIL" in lines[name]
                                                 or "NOT BUILT" in lines[name]), lines[name]
    assert "cuda tensors" in lines["auto"]


@pytest.mark.slow  # 15-30 s on a 2-core machine: CI runs it
def test_doctor_json_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "peft_rwkv7.cli", "doctor", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    report = json.loads(proc.stdout)  # stdout holds the JSON object only (import chatter is swallowed)
    assert proc.returncode == (0 if report["ok"] else 1), proc.stderr
    backends = {b["name"]: b for b in report["backends"]}
    cpu_line = f"cpu backend: {backends['cpu']}; doctor's stderr ends: {proc.stderr[-2000:]}"
    assert backends["cpu"]["built"] and all(c["ok"] for c in backends["cpu"]["checks"].values()), cpu_line
    assert set(report["packages"]) >= {"peft", "bitsandbytes", "deepspeed", "wandb"}
    assert report["device"]["cuda"] is torch.cuda.is_available()
    check = report["precision"]["cpu_bf16"]  # this machine's real measurement (or its cached one)
    assert report["precision"]["auto"]["cpu"] == ("bf16" if check["fast"] else "fp32")
    assert check["fast"] == (check["ratio"] >= precision.FAST_MARGIN) and check["gflops"]
    thin = report["precision"]["cpu_thin"]  # this machine's real routing of LoRA's thin products (or its cached one)
    assert set(thin["speedup"]) == {"nt", "tn"} and all(len(v) == 4 for v in thin["speedup"].values())
    assert thin["nt"] == sorted(int(r) for r, x in thin["speedup"]["nt"].items() if x >= thin_check.MARGIN)
    if report["device"]["cuda"]:  # the real build and checks, no compile-only check
        assert backends["cuda"]["built"] is not None and backends["cuda"]["compile"] is None
        return
    assert report["ok"] and report["problems"] == []
    assert backends["cuda"]["built"] is None and backends["triton"]["built"] is None
    assert report["auto"] == {"fp32": "cpu", "bf16": "cpu"}
    compiled = backends["cuda"]["compile"]
    if shutil.which("nvcc") is None:
        assert compiled is None and report["nvcc"] is None
    else:  # the kernels compile with this nvcc (as tests/ops/test_cuda_compile.py checks)
        assert compiled["ok"] and compiled["error"] is None, compiled


def test_doctor_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["doctor", "--help"])
    assert e.value.code == 0 and "--json" in capsys.readouterr().out
