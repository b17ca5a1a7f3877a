"""GPU check of the WKV7 backends: build, correctness against the reference, speed and memory.

    bash scripts/gpu_check.sh [OUT.json]        (from the repo root; writes gpu_check.json by default)

Sections (each in its own try/except, so one failure still reports the others):
  env          torch / CUDA / GPU / triton / fla versions
  build        compiles the CUDA extension (torch.utils.cpp_extension, cached) and times it
  correctness  CUDA and Triton (and fla when importable) vs the reference on the GPU: y, final
               state and the gradients of r, w, k, v, a, b and the initial state, with random
               upstream gradients on y and the final state; fp32 and bf16, odd T
  speed        fwd and fwd+bwd at B=8, T=4096, H=12, N=64, bf16, with a trainable initial state
               and gradients on y and the final state; peak memory (torch.cuda.max_memory_allocated)
               above the inputs. The reference runs at a smaller T and is extrapolated linearly.
  vram         measure_state_tuning_vram(): 0.1B state tuning peak VRAM at ctx 1024, batch 1, bf16
Needs no network: everything comes from the repo and the installed torch/triton (fla optional).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peft_rwkv7.ops import cuda as wkv_cuda  # noqa: E402
from peft_rwkv7.ops.reference import wkv7_reference  # noqa: E402

START = time.monotonic()
DEVICE = torch.device("cuda")
BUDGET_S = 270  # stop starting new timings after this (the whole check should stay < 5 min)
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


# ----------------------------------------------------------------------------------------------
# HOOK: 0.1B state-tuning peak VRAM at ctx 1024 (to be filled in later, by the model/train owners).
# Expected to build the 0.1B RWKV-7 model (L12, C768, N64; bundled or randomly initialised),
# freeze everything but the per-layer initial states, run forward+backward at ctx_len 1024 and
# return {"ctx_len": 1024, "peak_mib": ..., "backend": ..., "ms_per_step": ...}.
# ----------------------------------------------------------------------------------------------
def measure_state_tuning_vram(ctx_len: int = 1024) -> dict:
    """0.1B World shape (random weights), state tuning, batch 1, bf16 autocast, as the trainer runs it
    (frozen weights stored bf16, trainable state fp32). Goal: peak <= 1.5 GB (RWKV-PEFT reports 2.6 GB)."""
    from peft_rwkv7.adapters import MethodConfig, attach, trainable_parameters
    from peft_rwkv7.model import RWKV7Config, new_model
    from peft_rwkv7.train.loop import sequence_loss

    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = new_model(RWKV7Config.new(12, 768, 65536, head_size=64)).to(dev, torch.bfloat16)
    adapted = attach(model, MethodConfig(kind="state"))
    named = trainable_parameters(adapted)
    for _, p in named:
        p.data = p.data.float()
    opt = torch.optim.AdamW([p for _, p in named], lr=1.0, fused=True)
    idx = torch.randint(0, 65536, (1, ctx_len + 1), device=dev)
    times = []
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sequence_loss(adapted, idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20
    return {"ctx_len": ctx_len, "peak_mib": round(peak, 1), "goal_mib": 1536, "pass": peak <= 1536,
            "ms_per_step": round(min(times[1:]) * 1e3, 2), "backend": "auto"}


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
    print("\n== state tuning VRAM ==\n ", report.get("state_tuning_vram"))
    for err in report.get("errors", []):
        print("\nERROR in", err["section"], ":", err["error"])


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
    report: dict = {"errors": []}
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device", file=sys.stderr)
        return 2
    sections = [("env", section_env), ("build", section_build), ("correctness", section_correctness),
                ("speed", section_speed), ("state_tuning_vram", measure_state_tuning_vram)]  # fmt: skip
    for name, fn in sections:
        try:
            report[name] = fn()
        except Exception as e:
            report["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-3000:]})  # fmt: skip
        report["elapsed_s"] = round(time.monotonic() - START, 1)
        _write_json(args.out, report)  # after every section: a later crash keeps the earlier ones
    _print_table(report)
    print(f"\nwrote {args.out} ({report['elapsed_s']} s)")
    failed = report["errors"] or not all(r["pass"] for r in report.get("correctness", []) if r["backend"] != "fla")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
