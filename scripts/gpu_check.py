"""GPU check: WKV7 kernels vs the reference, their speed, training VRAM and speed, the doctor's verdict.

Kernel build, correctness and speed, training through the real trainer and `rwkv-peft doctor`, summed up
in one table of figures against goals.

    bash scripts/gpu_check.sh [OUT.json]        (from the repo root; writes gpu_check.json by default)
    python scripts/gpu_check.py [--out OUT.json]

Sections (each in its own try/except, so one failure still reports the others):
  env          torch / CUDA / GPU / triton / fla versions
  build        compiles the CUDA extension (torch.utils.cpp_extension, cached) and times it; the CPU
               kernel (for the doctor) builds meanwhile in a separate process
  correctness  CUDA and Triton (and fla when importable) vs the reference on the GPU: y, final
               state and the gradients of r, w, k, v, a, b and the initial state, with random
               upstream gradients on y and the final state; fp32 and bf16, odd T
  training     gpu_check_train.py: state tuning and LoRA on a random 0.1B-shape model at ctx 1024,
               batch 1, bf16, through peft_rwkv7.train.loop.train: peak VRAM and tokens/s
  speed        fwd and fwd+bwd at B=8, T=4096, H=12, N=64, bf16, with a trainable initial state
               and gradients on y and the final state; peak memory (torch.cuda.max_memory_allocated)
               above the inputs. The reference runs at a smaller T and is extrapolated linearly.
  doctor       peft_rwkv7.doctor.collect(): every backend on this machine vs the reference, packages
Goals: our CUDA fwd+bwd <= 0.8x fla's chunk_rwkv7; 0.1B state tuning <= 1.5 GiB peak VRAM. Exit status 1
on any correctness failure (a kernel, the doctor) or a crashed section, 2 without a CUDA device; missed
speed / memory goals show in the table only. Whole run: under 5 minutes on an H200 once the CUDA
extension is cached (its first build adds a minute or two). Needs no network (fla optional).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))  # gpu_check_train

from peft_rwkv7.ops import cuda as wkv_cuda  # noqa: E402
from peft_rwkv7.ops.reference import wkv7_reference  # noqa: E402

START = time.monotonic()
DEVICE = torch.device("cuda")
BUDGET_S = 270  # stop starting new timings after this (the whole check should stay < 5 min)
TRAINING_S = 90  # what the training section needs at most (model setup, two short runs)
GOAL_VS_FLA = 0.8  # our CUDA fwd+bwd time / fla chunk_rwkv7's
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |err| / max |ref|, per tensor
BENCH = dict(B=8, T=4096, H=12, N=64)
REF_T = 256  # the reference's T for timing (a Python loop over steps), extrapolated to BENCH["T"]
GRAD_NAMES = ("dr", "dw", "dk", "dv", "da", "db", "dstate")


def _inputs(B, T, H, N, dtype, seed=0):
    """Realistic inputs as an RWKV-7 layer makes them (decay in (0.545, 1)) and a random state."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (B, T, H, N)
    r, x, k, v, n, z = (torch.randn(shape, generator=g, device=DEVICE) for _ in range(6))
    w = -F.softplus(-(x - 0.5)) - 0.5
    kk = F.normalize(n, dim=-1)
    xs = [t.to(dtype) for t in (r * 0.5, w, k * 0.5, v, -kk, kk * torch.sigmoid(z))]
    return xs, torch.randn(B, H, N, N, generator=g, device=DEVICE) * 0.5


def _fla_fn():
    """fla's chunk_rwkv7 adapted to our convention, or None when fla is not importable."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception:
        return None

    # fla takes the log decay (ours is log-log: decay = exp(-exp(w))) and a key-major state. Its
    # keyword for the log decay changed between versions: `log_w` where present, else `w`.
    decay_kw = "log_w" if "log_w" in inspect.signature(chunk_rwkv7).parameters else "w"

    def run(r, w, k, v, a, b, state=None):
        log_w = -torch.exp(w.float()).to(w.dtype)
        s0 = None if state is None else state.transpose(-1, -2).contiguous()
        y, s = chunk_rwkv7(r=r, k=k, v=v, a=a, b=b, **{decay_kw: log_w}, scale=1.0, initial_state=s0,
                           output_final_state=True)  # fmt: skip
        return y, s.transpose(-1, -2)

    return run


def _backends() -> dict:
    from peft_rwkv7.ops.triton_wkv import wkv7_triton

    fns = {"cuda": wkv_cuda.wkv7_cuda, "triton": wkv7_triton}
    fla = _fla_fn()
    if fla is not None:
        fns["fla"] = fla
    return fns


def section_env() -> dict:
    import triton

    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "triton": triton.__version__,
    }
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "unknown")
    except Exception as e:
        info["fla"] = f"not importable ({type(e).__name__}); its rows are skipped"
    return info


def section_build() -> dict:
    t0 = time.monotonic()
    ok = wkv_cuda.is_available(torch.device("cuda"))
    from peft_rwkv7.ops import available_backends

    return {"cuda_extension": ok, "seconds": round(time.monotonic() - t0, 1),
            "auto_candidates": available_backends("cuda")}  # fmt: skip


def _run_case(fn, B, T, H, N, dtype, with_state, seed) -> dict:
    xs, state = _inputs(B, T, H, N, dtype, seed)
    ours = [x.clone().requires_grad_() for x in xs]
    ref = [x.detach().float().requires_grad_() for x in xs]
    s_ours = state.clone().requires_grad_() if with_state else None
    s_ref = state.clone().requires_grad_() if with_state else None
    y, s = fn(*ours, state=s_ours)
    y_ref, s_out_ref = wkv7_reference(*ref, state=s_ref)
    gy, gs = torch.randn_like(y_ref), torch.randn_like(s_out_ref)
    ((y.float() * gy).sum() + (s.float() * gs).sum()).backward()
    ((y_ref * gy).sum() + (s_out_ref * gs).sum()).backward()
    pairs = {"y": (y, y_ref), "state_out": (s, s_out_ref)}
    pairs.update({n: (o.grad, q.grad) for n, o, q in zip(GRAD_NAMES, ours, ref)})
    if with_state:
        pairs["dstate"] = (s_ours.grad, s_ref.grad)
    errs = {}
    for name, (got, want) in pairs.items():
        if got is None:
            errs[name] = float("inf")
            continue
        got, want = got.detach().float(), want.detach().float()
        errs[name] = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
    return errs


def section_correctness() -> list:
    cases = [  # (B, T, H, N, dtype, with_state): odd T, B > 1, each head size family
        (2, 37, 3, 64, torch.float32, True),
        (2, 37, 3, 64, torch.bfloat16, True),
        (1, 16, 2, 128, torch.float32, True),
        (2, 5, 2, 32, torch.bfloat16, False),
        (1, 300, 1, 64, torch.float32, True),
    ]
    rows = []
    for name, fn in _backends().items():
        for seed, (B, T, H, N, dtype, with_state) in enumerate(cases):
            row = {"backend": name, "B": B, "T": T, "H": H, "N": N, "dtype": str(dtype).split(".")[-1],
                   "state": with_state, "tol": TOL[dtype]}  # fmt: skip
            if time.monotonic() - START > BUDGET_S - 60:  # leave time for the speed section
                rows.append({**row, "pass": False, "error": "skipped: time budget spent"})
                continue
            try:
                errs = _run_case(fn, B, T, H, N, dtype, with_state, seed)
                row["max_rel_err"] = {k: float(f"{v:.2e}") for k, v in errs.items()}
                row["pass"] = all(v <= TOL[dtype] for v in errs.values())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                row["pass"] = False
            rows.append(row)
    return rows


def _time_ms(step, iters: int) -> float:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _bench(fn, T: int, iters: int) -> dict:
    """fwd (no grad) and fwd+bwd (trainable initial state, gradients on y and the final state)."""
    B, H, N = BENCH["B"], BENCH["H"], BENCH["N"]
    xs, state = _inputs(B, T, H, N, torch.bfloat16, seed=123)
    leaves = [x.requires_grad_() for x in xs] + [state.requires_grad_()]

    def fwd():
        with torch.no_grad():
            fn(*xs, state=state)

    def fwd_bwd():
        y, s = fn(*leaves[:6], state=leaves[6])
        (y.float().sum() + s.float().sum()).backward()
        for x in leaves:
            x.grad = None

    fwd_bwd()  # warm-up: compiles / autotunes
    fwd()
    torch.cuda.synchronize()
    fwd_ms = _time_ms(fwd, iters)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd_ms = _time_ms(fwd_bwd, iters)
    peak = torch.cuda.max_memory_allocated()
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "peak_mib": peak / 2**20,
            "peak_above_inputs_mib": (peak - base) / 2**20}  # fmt: skip


def section_speed() -> list:
    rows = []
    shape = f"B={BENCH['B']} T={BENCH['T']} H={BENCH['H']} N={BENCH['N']} bf16"
    notes = {"fla": "times include our -exp(w) and state transposes"}
    fns = _backends()
    for name, fn in fns.items():
        row = {"backend": name, "shape": shape, **({"note": notes[name]} if name in notes else {})}
        if time.monotonic() - START > BUDGET_S:
            rows.append({**row, "skipped": "time budget spent"})
            continue
        try:
            rows.append({**row, **_bench(fn, BENCH["T"], iters=5)})
        except Exception as e:
            rows.append({**row, "error": f"{type(e).__name__}: {e}"[:300]})
    if "fla" not in fns:
        rows.append({"backend": "fla", "shape": shape, "skipped": "fla not importable"})
    row = {"backend": "reference", "shape": shape}
    try:
        scale = BENCH["T"] / REF_T
        res = _bench(wkv7_reference, REF_T, iters=2)
        rows.append({**row, "note": f"measured at T={REF_T}; time and memory above inputs extrapolated x{scale:g}",
                     "fwd_ms": res["fwd_ms"] * scale, "fwd_bwd_ms": res["fwd_bwd_ms"] * scale,
                     "peak_above_inputs_mib": res["peak_above_inputs_mib"] * scale})  # fmt: skip
    except Exception as e:
        rows.append({**row, "error": f"{type(e).__name__}: {e}"[:300]})
    return rows


def section_training() -> dict:
    if time.monotonic() - START > BUDGET_S - TRAINING_S:
        return {"skipped": "time budget spent"}
    from gpu_check_train import run_all

    return run_all(ctx=1024, steps=12)


def section_doctor(cpu_build: subprocess.Popen | None = None) -> dict:
    """`rwkv-peft doctor` in this process (its CUDA/Triton verdicts are the ones auto uses here)."""
    if cpu_build is not None:  # the CPU kernel's build started at the beginning: let it finish first
        cpu_build.wait()
    from peft_rwkv7 import doctor

    report = doctor.collect()
    return {"ok": report.ok, "problems": report.problems, "warnings": report.warnings,
            "auto": report.auto, "screen": doctor.render(report)}  # fmt: skip


def _start_cpu_build() -> subprocess.Popen | None:
    """Build (or load) the CPU kernel in another process while the GPU sections run; the build's file lock
    makes the doctor's load later wait for it or reuse it."""
    code = "import torch; from peft_rwkv7.ops import cpu; cpu.is_available(torch.device('cpu'))"
    try:
        return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL)
    except OSError:
        return None


def _print_table(report: dict) -> None:
    print("\n== env ==")
    for k, v in report.get("env", {}).items():
        print(f"  {k:12s} {v}")
    print("\n== build ==\n ", report.get("build"))
    print("\n== correctness (max |err| / max |ref| over y, state_out and every gradient) ==")
    for row in report.get("correctness", []):
        worst = max(row["max_rel_err"].items(), key=lambda kv: kv[1]) if "max_rel_err" in row else None
        what = f"worst {worst[0]}={worst[1]:.1e}" if worst else row.get("error", "")
        print(f"  {'PASS' if row['pass'] else 'FAIL'}  {row['backend']:9s} {row['dtype']:9s} B={row['B']} "
              f"T={row['T']:<4d} H={row['H']} N={row['N']:<4d} state={row['state']!s:5s} {what}")  # fmt: skip
    print("\n== speed ==")
    for row in report.get("speed", []):
        if "fwd_bwd_ms" in row:
            peak = f"peak {row['peak_mib']:8.0f} MiB, " if "peak_mib" in row else ""
            print(f"  {row['backend']:9s} fwd {row['fwd_ms']:9.2f} ms  fwd+bwd {row['fwd_bwd_ms']:9.2f} ms  "
                  f"{peak}above inputs {row['peak_above_inputs_mib']:8.0f} MiB  {row.get('note', '')}")  # fmt: skip
        else:
            print(f"  {row['backend']:9s} {row.get('error') or row.get('skipped')}")
    print("\n== training (real trainer, random 0.1B shape, ctx 1024, batch 1, bf16) ==")
    for method in ("state", "lora"):
        row = report.get("training", {}).get(method)
        if row:
            print(f"  {method:6s} peak {row['peak_mib']:7.0f} MiB (reserved {row['reserved_mib']:.0f})  "
                  f"{row['tokens_per_s']} tok/s  loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}  "
                  f"wkv {', '.join(row['wkv_checks'])}")  # fmt: skip
    if "doctor" in report:
        print("\n== doctor ==\n" + report["doctor"]["screen"])
    for err in report.get("errors", []):
        print("\nERROR in", err["section"], ":", err["error"])


def _summary(report: dict) -> list[tuple[str, str, str, str]]:
    """(check, figure, goal, status) rows. FAIL: something computes wrong or crashed (exit 1); MISS: a
    speed / memory goal not met; info: a figure without a goal."""
    rows = []
    for name in ("cuda", "triton", "fla"):
        cases = [r for r in report.get("correctness", []) if r["backend"] == name]
        if cases:
            passed = sum(r["pass"] for r in cases)
            ok = passed == len(cases)
            status = "PASS" if ok else ("differs" if name == "fla" else "FAIL")
            rows.append((f"{name} vs reference", f"{passed}/{len(cases)} cases", "all pass", status))
    speed = {r["backend"]: r for r in report.get("speed", []) if "fwd_bwd_ms" in r}
    fla_ms = speed["fla"]["fwd_bwd_ms"] if "fla" in speed else None
    for name in ("cuda", "triton"):
        if name in speed:
            ms = speed[name]["fwd_bwd_ms"]
            ratio = f" = {ms / fla_ms:.2f}x fla" if fla_ms else " (fla not timed)"
            goal, status = ("-", "info") if name != "cuda" else (f"<= {GOAL_VS_FLA}x fla", "info")
            if name == "cuda" and fla_ms:
                status = "PASS" if ms <= GOAL_VS_FLA * fla_ms else "MISS"
            rows.append((f"{name} fwd+bwd B8 T4096 H12 N64 bf16", f"{ms:.2f} ms{ratio}", goal, status))
    training = report.get("training", {})
    for method in ("state", "lora"):
        if method in training:
            t = training[method]
            goal = f"<= {t['goal_mib']} MiB" if "goal_mib" in t else "-"
            status = ("PASS" if t["pass_goal"] else "MISS") if "goal_mib" in t else "info"
            figure = f"{t['peak_mib']:.0f} MiB, {t['tokens_per_s']} tok/s"
            what = "state tuning" if method == "state" else "LoRA r16"
            rows.append((f"0.1B {what} ctx1024 bs1 bf16", figure, goal, status))
    if "doctor" in report:
        d = report["doctor"]
        rows.append(("doctor verdict", "OK" if d["ok"] else "; ".join(d["problems"])[:60], "OK",
                     "PASS" if d["ok"] else "FAIL"))  # fmt: skip
    for err in report.get("errors", []):
        rows.append((f"section {err['section']}", err["error"][:60], "runs", "FAIL"))
    return rows


def _print_summary(rows: list[tuple[str, str, str, str]]) -> None:
    print("\n== summary ==")
    print(f"  {'check':38s} {'figure':34s} {'goal':16s} status")
    for check, figure, goal, status in rows:
        print(f"  {check:38s} {figure:34s} {goal:16s} {status}")


def _write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__} sees none); run it on a GPU machine",
              file=sys.stderr)  # fmt: skip
        return 2
    report: dict = {"errors": []}
    cpu_build = _start_cpu_build()
    sections = [("env", section_env), ("build", section_build), ("correctness", section_correctness),
                ("training", section_training), ("speed", section_speed),
                ("doctor", lambda: section_doctor(cpu_build))]  # fmt: skip
    for name, fn in sections:
        try:
            report[name] = fn()
        except Exception as e:
            report["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-3000:]})  # fmt: skip
        report["elapsed_s"] = round(time.monotonic() - START, 1)
        _write_json(args.out, report)  # after every section: a later crash keeps the earlier ones
    _print_table(report)
    rows = _summary(report)
    report["summary"] = [dict(zip(("check", "figure", "goal", "status"), row)) for row in rows]
    _write_json(args.out, report)
    _print_summary(rows)
    print(f"\nwrote {args.out} ({report['elapsed_s']} s)")
    return 1 if any(status == "FAIL" for *_, status in rows) else 0

if __name__ == "__main__":
    sys.exit(main())
