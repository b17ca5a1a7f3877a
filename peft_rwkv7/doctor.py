"""`rwkv-peft doctor`: what this machine can run, on one screen.

Python / torch, the CUDA device, bf16 support and whether this CPU's bf16 matmuls are fast (the measured,
cached check behind `train.precision: auto` and `--dtype auto`), which of LoRA's thin products run in the CPU kernel
(ops/thin_check.py, measured and cached the same way), nvcc, which WKV7 backends build here and which pass
the check against the reference op (`ops.verify`, the same cached verdicts `wkv_backend: auto`
uses), what auto picks, and the optional packages. Without a CUDA device but with nvcc, the CUDA
kernels are compiled (compile-only, `nvcc -c` for sm_80, nothing runs) to tell whether they build.
The last line is the verdict; the exit status is 0 when everything this machine's device needs works
and 1 when a correctness check fails (or the device has no working fused kernel). A missing GPU on a
CPU machine is not a failure, nor is a CUDA kernel that does not compile there (a warning).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .ops import dispatch, precision, rowsplit, thin_check
from .ops.reference import wkv7_reference
from .ops.verify import PROBLEM

HEAD_SIZE = 64  # the head size of every released RWKV-7 World model
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PACKAGES = ("peft", "bitsandbytes", "deepspeed", "wandb", "triton")
REQUIRED = {"peft": "LoRA, PiSSA and DiSHA need it"}
COMPILE_ARCH = "80"  # sm_80 (Ampere): the oldest architecture with the bf16 kernels


@dataclass
class Backend:
    name: str
    device: str
    built: bool | None  # None: not for this machine (skipped)
    note: str = ""
    checks: dict[str, dict] = field(default_factory=dict)  # "fp32" / "bf16" -> {ok, max_err, worst, tol, error}
    compile: dict | None = None  # cuda without a GPU, with nvcc: {ok, arch, seconds, error} of `nvcc -c`

    @property
    def passed(self) -> bool:
        return bool(self.built) and all(c["ok"] for c in self.checks.values())


@dataclass
class Report:
    python: str
    torch: str
    device: dict
    bf16: dict
    nvcc: str | None
    backends: list[Backend]
    auto: dict[str, str]
    packages: dict[str, str | None]
    precision: dict = field(default_factory=dict)  # the CPU bf16 check and what precision auto picks
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _device_info() -> dict:
    if not torch.cuda.is_available():
        return {"cuda": False, "torch_cuda": torch.version.cuda}
    props = torch.cuda.get_device_properties(0)
    return {"cuda": True, "torch_cuda": torch.version.cuda, "count": torch.cuda.device_count(), "gpu": props.name,
            "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1)}


def _bf16_info(cuda: bool) -> dict:
    """CPU: a bf16 autocast matmul (what train.precision: bf16 runs on CPU) gives bf16 close to fp32."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 64, generator=g), torch.randn(32, 64, generator=g)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = F.linear(x, w)
        err = ((y.float() - F.linear(x, w)).abs().max() / F.linear(x, w).abs().max()).item()
        cpu = "ok" if y.dtype == torch.bfloat16 and err < 1e-2 else f"wrong result (dtype {y.dtype}, error {err:.1e})"
    except Exception as e:
        cpu = f"fails ({type(e).__name__}: {_first_line(str(e))})"
    gpu = None
    if cuda:
        gpu = "ok" if precision.cuda_bf16_native() else "emulated on this GPU (slow): precision auto takes fp32"
    return {"cpu_autocast": cpu, "gpu": gpu}


def _precision_info(cuda: bool) -> dict:
    """The CPU bf16 check (precision.cpu_bf16_check: cached, else measured now), what auto picks, and the check that
    routes LoRA's fp32 thin products (thin_check.cpu_thin_check, likewise)."""
    check = precision.cpu_bf16_check()
    cpu = "bf16" if check.fast else "fp32"
    thin = thin_check.cpu_thin_check()
    return {"cpu_bf16": {"fast": check.fast, "ratio": check.ratio, "gflops": check.gflops, "cpu": check.cpu,
                         "cached": check.cached, "seconds": check.seconds, "summary": check.summary(),
                         "row_chunks": check.row_chunks, "row_chunks_speedup": check.row_chunks_speedup,
                         "isa_caps": check.isa_caps},
            "cpu_thin": {"nt": sorted(thin.nt), "tn": sorted(thin.tn), "cached": thin.cached, "seconds": thin.seconds,
                         "speedup": {k: {str(r): x for r, x in v.items()} for k, v in thin.speedup.items()},
                         "summary": thin.summary()},
            "auto": {"cuda": ("bf16" if precision.cuda_bf16_native() else "fp32") if cuda else None, "cpu": cpu}}


def _nvcc() -> str | None:
    path = shutil.which("nvcc")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{path} (does not run: {type(e).__name__})"
    release = re.search(r"release ([\d.]+)", out)
    return f"{path} (CUDA {release.group(1)})" if release else path


def _compile_cuda(sources: tuple[Path, ...] | None = None, arch: str = COMPILE_ARCH) -> dict:
    """Compile the CUDA kernels (default: ops.cuda's .cu sources) with nvcc, compile-only, with the
    flags torch's build adds; {ok, arch, seconds, error: the first error line or None}."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    from .ops import cuda

    nvcc = shutil.which("nvcc")
    if sources is None:
        sources = tuple(p for p in cuda.SOURCES if p.suffix == ".cu")
    result: dict = {"ok": False, "arch": f"sm_{arch}", "seconds": 0.0, "error": None}
    if nvcc is None:
        result["error"] = "nvcc not found"
        return result
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rwkv-peft-doctor-") as tmp:
        for i, src in enumerate(sources):
            cmd = [nvcc, "-c", "-O3", "-std=c++17", *COMMON_NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}",
                   str(src), "-o", str(Path(tmp) / f"{i}.o")]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.SubprocessError) as e:
                result["error"] = f"{Path(src).name}: nvcc did not run ({type(e).__name__})"
                break
            if proc.returncode != 0:
                errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()] or proc.stderr.splitlines()
                result["error"] = errors[0].strip() if errors else f"nvcc exited with {proc.returncode}"
                break
        else:
            result["ok"] = True
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _build(name: str, device: torch.device) -> tuple[bool, str]:
    """Build / load one backend for `device`; the build's own warning becomes the note when it fails."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod, _ = dispatch.load(name)
        if mod is None:
            return False, "its module does not import (is triton installed?)"
        built = mod.is_available(device)
    reasons = [_first_line(str(w.message)) for w in caught]
    return built, "" if built else (reasons[-1] if reasons else "not available on this machine")


def _backend(name: str, device: torch.device | None, why_skipped: str = "") -> Backend:
    if device is None:
        return Backend(name, "-", None, why_skipped)
    built, note = _build(name, device)
    b = Backend(name, device.type, built, note)
    if built:
        fn = dispatch.load(name)[1]
        for label, dtype in DTYPES.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the doctor reports failures itself
                v = dispatch.verdict(name, fn, HEAD_SIZE, dtype, device)
            err = v.max_err if math.isfinite(v.max_err) else None  # None: a gradient missing or non-finite output
            b.checks[label] = {"ok": v.ok, "max_err": err, "worst": v.worst, "tol": v.tol, "error": v.error}
    return b


def _auto(device: torch.device) -> dict[str, str]:
    """What wkv7(backend="auto") uses for head size 64 in each dtype on this device."""
    names = {id(dispatch.load(n)[1]): n for n in dispatch.FUSED if dispatch.load(n)[0] is not None}
    names[id(wkv7_reference)] = "reference"
    picked = {}
    for label, dtype in DTYPES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn = dispatch.resolve("auto", device, HEAD_SIZE, dtype)
        picked[label] = names.get(id(fn), getattr(fn, "__name__", "?"))
    return picked


def _packages() -> dict[str, str | None]:
    """Version of each package that imports, else None. Their import-time chatter (DeepSpeed's accelerator
    notice, bitsandbytes' optional kernels) is swallowed so that the screen and --json stay clean."""
    found: dict[str, str | None] = {}
    out, err = io.StringIO(), io.StringIO()
    real_out, real_err = sys.stdout, sys.stderr
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PACKAGES:
            try:
                found[name] = str(getattr(importlib.import_module(name), "__version__", "installed"))
            except Exception:
                found[name] = None
    # Loggers set up during those imports would keep writing into the swallowed buffers: point them back.
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    for logger in loggers:
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and h.stream in (out, err):
                h.setStream(real_out if h.stream is out else real_err)
    return found


def collect() -> Report:
    t0 = time.perf_counter()
    dev = _device_info()
    gpu = torch.device("cuda") if dev["cuda"] else None
    no_gpu = "no CUDA device"
    nvcc = _nvcc()
    backends = [
        _backend("cpu", torch.device("cpu")),
        _backend("cuda", gpu, no_gpu),
        _backend("triton", gpu, f"{no_gpu} (Triton is the GPU path)"),
    ]
    if gpu is None and nvcc is not None:  # with a GPU, the real build above says whether it builds
        backends[1].compile = _compile_cuda()
    report = Report(
        python=platform.python_version(),
        torch=torch.__version__,
        device=dev,
        bf16=_bf16_info(dev["cuda"]),
        nvcc=nvcc,
        backends=backends,
        auto=_auto(gpu or torch.device("cpu")),
        packages=_packages(),
        precision=_precision_info(dev["cuda"]),
    )
    _judge(report)
    report.seconds = round(time.perf_counter() - t0, 1)
    return report


def _judge(r: Report) -> None:
    """Problems (exit 1): a backend that builds but computes wrong, no working fused kernel for the device,
    a required package missing. Everything else that is off is a warning."""
    by_name = {b.name: b for b in r.backends}
    for b in r.backends:
        for dtype, c in b.checks.items():
            if not c["ok"]:
                r.problems.append(f"{b.name} kernel is WRONG in {dtype} ({_describe(c)})")
    main = ("cuda", "triton") if r.device["cuda"] else ("cpu",)
    if not any(by_name[n].passed for n in main):
        r.problems.append(f"no verified fused WKV kernel for {'the GPU' if r.device['cuda'] else 'CPU'} "
                          "(training would run on the slow reference op)")
    if r.device["cuda"]:
        for n in ("cuda", "triton", "cpu"):
            if not by_name[n].built:
                r.warnings.append(f"{n} kernel unavailable: {by_name[n].note}")
        if r.bf16["gpu"] != "ok":
            r.warnings.append("this GPU has no bf16: train with train.precision=fp32")
    compiled = by_name["cuda"].compile
    if compiled is not None and not compiled["ok"]:
        r.warnings.append(f"the CUDA kernels do not compile with this nvcc ({compiled['arch']}): {compiled['error']}")
    if r.bf16["cpu_autocast"] != "ok":
        r.warnings.append(f"CPU bf16 autocast {r.bf16['cpu_autocast']}: keep train.precision fp32 on CPU")
    for name, version in r.packages.items():
        if version is None and name in REQUIRED:
            r.problems.append(f"{name} does not import ({REQUIRED[name]})")


def _describe(check: dict) -> str:
    if check["error"]:
        return f"FAIL: raised {check['error']}"
    if check["max_err"] is None:
        return f"FAIL: {check['worst']} missing or not finite"
    verdict, cmp = ("PASS", "<=") if check["ok"] else ("FAIL", ">")
    return f"{verdict} err {check['max_err']:.1e} {cmp} {check['tol']:.0e} ({check['worst']})"


def _compiled(b: Backend, nvcc: str | None) -> str:
    """What the compile-only check of the CUDA kernels found, for the skipped cuda line."""
    if b.name != "cuda":
        return ""
    if b.compile is None:
        return "; no nvcc, so not compiled" if nvcc is None else ""
    c = b.compile
    if c["ok"]:
        return f"; its kernels compile (nvcc -c for {c['arch']} in {c['seconds']} s, compile-only: nothing ran)"
    return f"; its kernels do NOT compile (nvcc -c for {c['arch']}): {c['error']}"


def _line(label: str, text: str) -> str:
    return f"  {label:<13}{text}"


def _precision_lines(p: dict) -> list[str]:
    """The CPU bf16 check (verdict, then GFLOP/s per op), the thin products' routing, and what train.precision /
    --dtype auto pick."""
    c, auto = p["cpu_bf16"], p["auto"]
    lines = [_line("cpu-bf16", f"{'fast' if c['fast'] else 'slow'}: {c['summary']}; {c['cpu']}")]
    lines += [f"  {'':<15}{op}: fp32 {r['fp32']:.1f}, bf16 {r['bf16']:.1f} GFLOP/s" for op, r in c["gflops"].items()]
    if c["isa_caps"]:  # the math libraries told to use fewer instructions than the CPU has: measured under them
        caps = ", ".join(f"{k}={v}" for k, v in sorted(c["isa_caps"].items()))
        lines.append(f"  {'':<15}measured under the libraries' instruction caps {caps}")
    if c["row_chunks_speedup"] is not None:  # measured where bf16 is fast (ops/rowsplit.py)
        verdict = "in row chunks" if c["row_chunks"] else "whole"
        lo, hi = rowsplit.ZONE
        lines.append(f"  {'':<15}products of {lo}-{hi} rows: {verdict} (chunks {c['row_chunks_speedup']:.2f}x "
                     "the whole calls' speed)")
    lines.append(_line("cpu-thin", f"LoRA's fp32 thin products, {p['cpu_thin']['summary']}"))
    picks = f"{auto['cpu']} on this CPU" + (f", {auto['cuda']} on the GPU" if auto["cuda"] else "")
    lines.append(_line("precision", f"auto (train.precision, --dtype) picks {picks}"))
    return lines


def render(r: Report) -> str:
    d = r.device
    if d["cuda"]:
        gpu = f"{d['gpu']} x{d['count']}, compute capability {d['capability']}, {d['memory_gib']} GiB"
    else:
        gpu = "none (torch sees no CUDA device" + ("; CPU-only torch build)" if d["torch_cuda"] is None else ")")
    lines = [
        "rwkv-peft doctor",
        _line("python", r.python),
        _line("torch", f"{r.torch} (CUDA {d['torch_cuda'] or 'none'})"),
        _line("GPU", gpu),
        _line("bf16", f"CPU autocast {r.bf16['cpu_autocast']}; GPU {r.bf16['gpu'] or 'n/a'}"),
        *_precision_lines(r.precision),
        _line("nvcc", r.nvcc or "not found (the CUDA kernel cannot build; Triton needs no nvcc)"),
        f"WKV7 backends (checked against the reference: B{PROBLEM['B']} T{PROBLEM['T']} H{PROBLEM['H']} "
        f"N{HEAD_SIZE}, y, final state, every gradient)",
    ]
    for b in r.backends:
        if b.built is None:
            lines.append(_line(b.name, f"skipped: {b.note}{_compiled(b, r.nvcc)}"))
        elif not b.built:
            lines.append(_line(b.name, f"NOT BUILT: {b.note}"))
        else:
            lines.append(_line(b.name, "   ".join(f"{dt} {_describe(c)}" for dt, c in b.checks.items())))
    lines.append(_line("reference", "the oracle (pure PyTorch, always available)"))
    picks = ", ".join(f"{dt} -> {name}" for dt, name in r.auto.items())
    lines.append(_line("auto picks", f"{picks} (head size {HEAD_SIZE}, {'cuda' if d['cuda'] else 'cpu'} tensors)"))
    lines.append("packages")
    for name, version in r.packages.items():
        lines.append(_line(name, version or ("MISSING" if name in REQUIRED else "not installed / does not import")))
    for w in r.warnings:
        lines.append(f"warning: {w}")
    if r.ok:
        where = "GPU" if d["cuda"] else "CPU (no GPU on this machine)"
        lines.append(f"verdict: OK - ready to train on {where}; checked in {r.seconds} s")
    else:
        lines.append(f"verdict: FAIL - {'; '.join(r.problems)}")
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    report = collect()
    if as_json:
        data = asdict(report)
        data["ok"] = report.ok
        print(json.dumps(data, default=str))
    else:
        print(render(report))
    return 0 if report.ok else 1
