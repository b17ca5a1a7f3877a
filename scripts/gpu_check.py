"""GPU check: WKV7 kernels vs the reference and vs fla, 0.1B training VRAM and speed beside the field's figures.

    bash scripts/gpu_check.sh [OUT.json] [--dry-run] [--skip PART]   (from anywhere; default gpu_check.json)
    python scripts/gpu_check.py [--out OUT.json] [--dry-run] [--skip PART ...]

Parts, in order (each prints one line with its time as it ends, then its screen; one that fails prints
its error in one line and the rest still run):
  env          torch / CUDA / GPU / triton / fla versions
  build        compiles the CUDA extension (torch.utils.cpp_extension, cached) and times it; the CPU
               kernel (for the doctor) builds meanwhile in a separate process
  correctness  gpu_check_kernels.py: CUDA and Triton vs the reference on the GPU, fp32 and bf16, every
               gradient (fla is compared with our CUDA kernel in speed, where it compiles only once)
  training     gpu_check_train.py: state tuning and LoRA r16 on a random 0.1B-shape model through the
               real trainer, bf16, at ctx 1024 batch 1 and ctx 512 batch 16: peak VRAM and tokens/s
  speed        gpu_check_kernels.py: our CUDA vs Triton vs fla's chunk_rwkv7, fwd and fwd+bwd at B8
               T4096 H12 N64 bf16, in the summary beside each other (fla skipped with a line where it
               does not import)
  doctor       peft_rwkv7.doctor.collect(): every backend on this machine vs the reference, packages
correctness, training and speed run in their own processes under a time cap each, so a hang or a broken
CUDA context stops only that part; the rows a part finished before its cap are kept. One summary table
puts our figures beside goals and the field's anchors (gpu_check_report.ANCHORS: RWKV-PEFT's RTX 4090
VRAM table, RWKV-LM's tokens/s; other hardware, for orientation).

Time on an H200 (estimated, never run there yet; see BUDGETS): env ~5 s; build ~40 s fresh (nvcc of the
kernels took 8 s and a torch-extension binding 40 s on a loaded 2-core CPU, built in parallel) or ~1 s
cached; correctness ~20-45 s (Triton JIT per head size and dtype; cap 60); training ~35-50 s (0.1B init
and save ~8 s, four runs of a few seconds each: load, 12 steps, save; cap 90); speed ~20 s, up to its cap
of 80 where fla compiles and autotunes on first use; doctor ~15 s. About 3 minutes expected, 5 when every
cap is hit; nothing starts when it could run past 9 minutes (the device call's limit is 10).
Exit status: 0 = every correctness check passed and nothing crashed, 1 = something computes wrong or
crashed (a kernel unverified because its part stopped counts), 2 = no CUDA device. Missed speed /
memory goals (MISS) and parts stopped at their cap (TIME) show in the table only. --dry-run runs every
part on the CPU at tiny stand-in shapes (the CPU kernel in place of CUDA/Triton, fp32 training) to test
this script without a GPU. Needs no network (fla optional).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check_report as rep  # noqa: E402

CHILD_PARTS = ("correctness", "training", "speed")
PARTS = ("env", "build", *CHILD_PARTS, "doctor")
# cap_s: a child part's time cap; min_s: what it needs to be worth starting; hard_s: no part starts
# when it could run past this; doctor_s: kept for the doctor at the end (in-process, not capped);
# inline_s: the estimate for the in-process parts on an H200 (env, a fresh CUDA build, the doctor).
BUDGETS = {
    "gpu": {"cap_s": {"correctness": 60, "training": 90, "speed": 80},
            "min_s": {"correctness": 20, "training": 40, "speed": 20}, "hard_s": 540, "doctor_s": 30,
            "inline_s": {"env": 5, "build": 45, "doctor": 20}},
    # The CPU dry run: generous caps (a shared 2-core machine), only a guard against a hang.
    "dry": {"cap_s": {"correctness": 300, "training": 300, "speed": 300},
            "min_s": {"correctness": 10, "training": 10, "speed": 10}, "hard_s": 1500, "doctor_s": 60,
            "inline_s": {"env": 5, "build": 5, "doctor": 60}},
}  # fmt: skip


def exit_status(rows: list[tuple]) -> int:
    """1 when a summary row FAILs (something computes wrong, crashed, or a kernel went unverified), else 0."""
    return 1 if any(row[-1] == "FAIL" for row in rows) else 0


def part_timeout(name: str, elapsed: float, budget: dict, skip=()) -> float:
    """The cap for child part `name` started `elapsed` s into the run: its own cap, less whatever would
    leave the later parts their minimum before the hard limit."""
    later = [p for p in CHILD_PARTS[CHILD_PARTS.index(name) + 1:] if p not in skip]
    reserve = sum(budget["min_s"][p] for p in later) + (0 if "doctor" in skip else budget["doctor_s"])
    return min(budget["cap_s"][name], budget["hard_s"] - elapsed - reserve)


def run_child(argv: list[str], timeout_s: float, log_path: Path) -> dict:
    """Run `python argv...` in its own process group under `timeout_s`; stdout and stderr go to `log_path`.
    Returns the part's status: ok, error (one line: the exit status and the log's last line) or timeout."""
    part: dict = {"cap_s": round(timeout_s)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout_s)
            part["status"] = "ok" if rc == 0 else "error"
            if rc:
                part["error"] = f"exit status {rc}: {rep.one_line(log_path.read_text(errors='replace'))}"
        except subprocess.TimeoutExpired:
            part["status"] = "timeout"
            part["error"] = f"stopped at its {timeout_s:.0f} s cap; rows finished before it are kept"
        finally:
            if proc.poll() is None:  # the cap, or this process interrupted: the child and its children go too
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if part["status"] != "ok":
        part["log_tail"] = log_path.read_text(errors="replace")[-2000:]
    return part


def part_env(dry_run: bool) -> dict:
    info = {"mode": "dry run on the CPU" if dry_run else "GPU", "torch": torch.__version__,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}  # fmt: skip
    if not dry_run:
        info.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(0),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))  # fmt: skip
    for name in ("triton", "fla"):
        try:
            info[name] = getattr(__import__(name), "__version__", "unknown")
        except Exception as e:
            info[name] = f"not importable ({type(e).__name__})" + ("; its rows are skipped" if name == "fla" else "")
    return info


def part_build(dry_run: bool) -> dict:
    """The fused kernel this device uses, built (or loaded from the cache) here, with the build's warning."""
    t0 = time.monotonic()
    device = torch.device("cpu" if dry_run else "cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if dry_run:
            from peft_rwkv7.ops import cpu as kernel
        else:
            from peft_rwkv7.ops import cuda as kernel
        ok = kernel.is_available(device)
    from peft_rwkv7.ops import available_backends

    out = {f"{device.type}_extension": ok, "seconds": round(time.monotonic() - t0, 1),
           "auto_candidates": available_backends(device)}  # fmt: skip
    if not ok:
        out["warning"] = "; ".join(rep.one_line(str(w.message)) for w in caught) or "unavailable"
    return out


def part_doctor(cpu_build: subprocess.Popen | None = None) -> dict:
    """`rwkv-peft doctor` in this process (its CUDA/Triton verdicts are the ones auto uses here)."""
    if cpu_build is not None:  # the CPU kernel's build started at the beginning: let it finish first
        cpu_build.wait()
    from peft_rwkv7 import doctor

    report = doctor.collect()
    return {"ok": report.ok, "problems": report.problems, "warnings": report.warnings,
            "auto": report.auto, "screen": doctor.render(report)}  # fmt: skip


def _start_cpu_build() -> subprocess.Popen | None:
    """Build (or load) the CPU kernel in another process while the GPU parts run; the build's file lock
    makes the doctor's load later wait for it or reuse it."""
    code = "import torch; from peft_rwkv7.ops import cpu; cpu.is_available(torch.device('cpu'))"
    try:
        return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
    except OSError:
        return None


def child_argv(name: str, part_json: Path, budget_s: float, dry_run: bool, build: dict) -> list[str]:
    """The command line of a child part. Without a CUDA extension the children neither try to build it
    again nor time it: the kernels part runs Triton and fla, training asks for Triton."""
    cuda_ok = dry_run or build.get("cuda_extension", False)
    common = ["--out", str(part_json), "--budget-s", f"{max(budget_s - 5, 1):.0f}"] + (["--dry-run"] if dry_run else [])
    if name == "training":
        return ["scripts/gpu_check_train.py", *common, "--wkv-backend", "auto" if cuda_ok else "triton"]
    backends = [] if cuda_ok else ["--backends", "triton" if name == "correctness" else "triton,fla"]
    return ["scripts/gpu_check_kernels.py", name, *common, *backends]


def show(name: str, report: dict) -> None:
    """A part's screen, printed as soon as it ends."""
    if name == "env":
        rep.print_env(report.get("env", {}))
    elif name == "build":
        rep.print_build(report.get("build", {}))
    elif name == "correctness":
        rep.print_correctness(report.get("correctness", []))
    elif name == "training":
        rep.print_training(report.get("training", {}))
    elif name == "speed":
        rep.print_speed(report.get("speed", []))
    elif name == "doctor" and "doctor" in report:
        print("\n== doctor ==\n" + report["doctor"]["screen"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny shapes (no GPU)")
    parser.add_argument("--skip", action="append", default=[], choices=PARTS, help="leave a part out (repeatable)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__} sees none); run it on a GPU machine, "
              "or use --dry-run to test this script on the CPU", file=sys.stderr)  # fmt: skip
        return 2
    start = time.monotonic()
    out = args.out.resolve()
    work = out.parent / f"{out.stem}_parts"  # each child part's JSON and log
    budget = BUDGETS["dry" if args.dry_run else "gpu"]
    report: dict = {"mode": "dry-run" if args.dry_run else "gpu", "parts": {}}
    cpu_build = None if args.dry_run or "doctor" in args.skip else _start_cpu_build()
    for name in PARTS:
        if name in args.skip:
            report["parts"][name] = {"status": "skipped (--skip)"}
            continue
        t0 = time.monotonic()
        part: dict = {"status": "ok"}
        try:
            if name in CHILD_PARTS:
                timeout = part_timeout(name, t0 - start, budget, args.skip)
                if timeout < budget["min_s"][name]:
                    part = {"status": "timeout", "cap_s": 0, "error": f"not started: {timeout:.0f} s left before "
                            f"the {budget['hard_s']} s limit, it needs {budget['min_s'][name]}"}  # fmt: skip
                else:
                    part_json = work / f"{name}.json"
                    part_json.unlink(missing_ok=True)
                    argv_ = child_argv(name, part_json, timeout, args.dry_run, report.get("build", {}))
                    part = run_child(argv_, timeout, work / f"{name}.log")
                    result = rep.read_json(part_json)
                    if result is None and part["status"] == "ok":
                        part.update(status="error", error="the part wrote no results")
                    elif result is not None:
                        report[name] = result if name == "training" else result["rows"]
            elif name == "env":
                report["env"] = part_env(args.dry_run)
            elif name == "build":
                report["build"] = part_build(args.dry_run)
            else:
                report["doctor"] = part_doctor(cpu_build)
        except Exception as e:
            part = {"status": "error", "error": rep.one_line(f"{type(e).__name__}: {e}"),
                    "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
        part["seconds"] = round(time.monotonic() - t0, 1)
        report["parts"][name] = part
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        rep.write_json(out, report)  # after every part: a later crash keeps the earlier ones
        try:
            show(name, report)
        except Exception as e:  # a screen that cannot print its rows must not stop the later parts
            print(f"  (cannot print the {name} screen: {rep.one_line(f'{type(e).__name__}: {e}')})")
        print(rep.part_line(name, part), flush=True)
    rows = rep.summary_rows(report)
    if not args.dry_run and "build" in report and not report["build"].get("cuda_extension"):
        rows.insert(0, ("CUDA extension build", "not built (why: == build ==)", "builds", "-", "FAIL"))
    report["summary"] = [dict(zip(("check", "figure", "goal", "anchor", "status"), row)) for row in rows]
    rep.write_json(out, report)
    rep.print_summary(rows, dry_run=args.dry_run)
    rep.print_times(report)
    print(f"wrote {out} (parts' JSON and logs in {work})")
    return exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
