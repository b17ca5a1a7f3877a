"""WKV7 kernels for the GPU check: correctness against the reference, and speed beside fla's chunk_rwkv7.

scripts/gpu_check.py runs each part in its own process, so a kernel that hangs or breaks the CUDA
context stops only that part (and its time cap can be enforced from outside):

    python scripts/gpu_check_kernels.py {correctness,speed} --out PART.json [--backends cuda,triton,fla]
                                        [--budget-s 60] [--dry-run]

correctness  each backend vs wkv7_reference on the device: y, final state and the gradients of r, w, k,
             v, a, b and the initial state, random upstream gradients on y and the final state; fp32 and
             bf16, odd T, B > 1, head sizes 32/64/128
speed        fwd and fwd+bwd at B=8, T=4096, H=12, N=64, bf16, trainable initial state, gradients on y and
             the final state; the first call (compile / autotune) is timed apart as warm-up; peak memory
             above the inputs. The reference runs at T=256 and is extrapolated linearly. fla runs last
             (its first call compiles and autotunes many Triton kernels) and is skipped with a line where
             it does not import.
Writes {"rows": [...], "done": bool} after every row: rows finished before a time cap are kept. A row
starts only while the part's budget (--budget-s) lasts. --dry-run: the CPU kernel on the CPU at a tiny
shape, the same code paths (tests/ops/test_gpu_check_script.py runs it).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from gpu_check_report import one_line, write_json  # noqa: E402

from peft_rwkv7.ops.reference import wkv7_reference  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |err| / max |ref|, per tensor
PENDING = "not run: the part stopped before it"
GRAD_NAMES = ("dr", "dw", "dk", "dv", "da", "db", "dstate")
# (B, T, H, N, dtype, with_state): odd T, B > 1, each head size family
GPU_CASES = ((2, 37, 3, 64, torch.float32, True), (2, 37, 3, 64, torch.bfloat16, True),
             (1, 16, 2, 128, torch.float32, True), (2, 5, 2, 32, torch.bfloat16, False),
             (1, 300, 1, 64, torch.float32, True))  # fmt: skip
PLANS = {
    # iters: timed repetitions (median) after one warm-up call of each of fwd and fwd+bwd. fla is only in
    # speed: its first call compiles and autotunes many Triton kernels per dtype and head size (it could
    # spend the correctness part's whole cap); there it is compared with our first kernel on the bench inputs.
    "gpu": {"device": "cuda", "cases": GPU_CASES, "bench": {"B": 8, "T": 4096, "H": 12, "N": 64}, "ref_T": 256,
            "iters": 5, "backends": {"correctness": ("cuda", "triton"), "speed": ("cuda", "triton", "fla")}},
    "dry": {"device": "cpu", "cases": GPU_CASES[1:2] + GPU_CASES[3:4], "bench": {"B": 1, "T": 64, "H": 2, "N": 64},
            "ref_T": 16, "iters": 2, "backends": {"correctness": ("cpu",), "speed": ("cpu", "fla")}},
}  # fmt: skip


class Rows:
    """A part's rows, planned up front as not run and saved (--out) after every change: a part stopped at
    its time cap leaves what it finished and, for the rest, a row saying it did not run."""

    def __init__(self, path: Path | None = None):
        self.path, self.rows = path, []

    def plan(self, row: dict) -> int:
        self.rows.append(row)
        return len(self.rows) - 1

    def set(self, slot: int, row: dict) -> None:
        self.rows[slot] = row
        self.save()

    def save(self, done: bool = False) -> None:
        if self.path is not None:
            write_json(self.path, {"rows": self.rows, "done": done})


def inputs(B, T, H, N, dtype, device, seed=0):
    """Realistic inputs as an RWKV-7 layer makes them (decay in (0.545, 1)) and a random state."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (B, T, H, N)
    r, x, k, v, n, z = (torch.randn(shape, generator=g, device=device) for _ in range(6))
    w = -F.softplus(-(x - 0.5)) - 0.5
    kk = F.normalize(n, dim=-1)
    xs = [t.to(dtype) for t in (r * 0.5, w, k * 0.5, v, -kk, kk * torch.sigmoid(z))]
    return xs, torch.randn(B, H, N, N, generator=g, device=device) * 0.5


def fla_fn(chunk_rwkv7=None):
    """fla's chunk_rwkv7 adapted to our convention, or None when fla is not importable (`chunk_rwkv7`:
    a stand-in with fla's signature, for tests)."""
    if chunk_rwkv7 is None:
        try:
            from fla.ops.rwkv7 import chunk_rwkv7
        except Exception:
            return None

    # fla takes the log decay (ours is log-log: decay = exp(-exp(w))) and a key-major state. Its keyword
    # for the log decay changed between versions: `log_w` where present (`w` is then our raw w), else `w`.
    decay_kw = "log_w" if "log_w" in inspect.signature(chunk_rwkv7).parameters else "w"

    def run(r, w, k, v, a, b, state=None):
        log_w = -torch.exp(w.float()).to(w.dtype)
        s0 = None if state is None else state.transpose(-1, -2).contiguous()
        y, s = chunk_rwkv7(r=r, k=k, v=v, a=a, b=b, **{decay_kw: log_w}, scale=1.0, initial_state=s0,
                           output_final_state=True)  # fmt: skip
        return y, s.transpose(-1, -2)

    return run


def backend_fns(names, device: str = "cuda") -> tuple[dict, dict]:
    """({name: fn} for the backends that load, {name: why not} for the others)."""
    fns, missing = {}, {}
    for name in names:
        try:
            if name == "cuda":
                from peft_rwkv7.ops.cuda import wkv7_cuda as fn
            elif name == "triton":
                from peft_rwkv7.ops.triton_wkv import wkv7_triton as fn
            elif name == "cpu":
                from peft_rwkv7.ops.cpu import wkv7_cpu as fn
            else:
                fn = fla_fn()
                if fn is None or device != "cuda":
                    missing[name] = "fla not importable: skipped" if fn is None else "fla runs on a GPU: skipped"
                    continue
            fns[name] = fn
        except Exception as e:
            missing[name] = one_line(f"{type(e).__name__}: {e}")
    return fns, missing


def _run_case(fn, B, T, H, N, dtype, with_state, seed, device) -> dict:
    xs, state = inputs(B, T, H, N, dtype, device, seed)
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


def correctness(plan: dict, names, deadline: float, rows: Rows) -> None:
    fns, _ = backend_fns(names, plan["device"])  # a backend that does not load has no rows here (speed names why)
    cases = [(name, fn, seed, case) for name, fn in fns.items() for seed, case in enumerate(plan["cases"])]
    slots = []
    for name, _, _, (B, T, H, N, dtype, with_state) in cases:
        row = {"backend": name, "B": B, "T": T, "H": H, "N": N, "dtype": str(dtype).split(".")[-1],
               "state": with_state, "tol": TOL[dtype]}  # fmt: skip
        slots.append(rows.plan({**row, "pass": False, "error": PENDING}))
    rows.save()
    for slot, (_, fn, seed, (B, T, H, N, dtype, with_state)) in zip(slots, cases):
        row = {k: v for k, v in rows.rows[slot].items() if k != "error"}
        if time.monotonic() > deadline:
            rows.set(slot, {**row, "error": "not run: the part's time budget was spent"})
            continue
        try:
            errs = _run_case(fn, B, T, H, N, dtype, with_state, seed, plan["device"])
            row["max_rel_err"] = {k: float(f"{v:.2e}") for k, v in errs.items()}
            row["pass"] = all(v <= TOL[dtype] for v in errs.values())
        except Exception as e:
            row["error"], row["pass"] = one_line(f"{type(e).__name__}: {e}", 300), False
        rows.set(slot, row)


def time_ms(step, iters: int, device: str) -> float:
    """Median wall time of `step` in ms: CUDA events on the GPU, perf_counter on the CPU."""
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(fn, plan: dict, T: int) -> dict:
    """fwd (no grad) and fwd+bwd (trainable initial state, gradients on y and the final state)."""
    device, b = plan["device"], plan["bench"]
    cuda = device == "cuda"
    xs, state = inputs(b["B"], T, b["H"], b["N"], torch.bfloat16, device, seed=123)
    leaves = [x.requires_grad_() for x in xs] + [state.requires_grad_()]

    def fwd():
        with torch.no_grad():
            fn(*xs, state=state)

    def fwd_bwd():
        y, s = fn(*leaves[:6], state=leaves[6])
        (y.float().sum() + s.float().sum()).backward()
        for x in leaves:
            x.grad = None

    t0 = time.perf_counter()
    fwd_bwd()  # warm-up: compiles / autotunes
    fwd()
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    fwd_ms = time_ms(fwd, plan["iters"], device)
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fwd_bwd_ms = time_ms(fwd_bwd, plan["iters"], device)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "warmup_s": round(warmup_s, 1),
            "peak_mib": None if peak is None else peak / 2**20,
            "peak_above_inputs_mib": None if peak is None else (peak - base) / 2**20}  # fmt: skip


def _agreement(fn, base_fn, plan: dict) -> dict:
    """max |err| / max |base| of y and the final state, `fn` against `base_fn` on the bench inputs (fwd)."""
    b = plan["bench"]
    xs, state = inputs(b["B"], b["T"], b["H"], b["N"], torch.bfloat16, plan["device"], seed=123)
    with torch.no_grad():
        got, want = fn(*xs, state=state), base_fn(*xs, state=state)
    return {name: float(f"{float((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-6)):.2e}")
            for name, g, w in zip(("y", "state_out"), got, want)}  # fmt: skip


def speed(plan: dict, names, deadline: float, rows: Rows, fns: dict | None = None) -> None:
    """Each backend timed at the bench shape (fla last), the reference at ref_T scaled; fla's outputs are
    also compared with the first of our kernels timed. `fns`: backends to use as given (tests)."""
    b = plan["bench"]
    shape = f"B{b['B']} T{b['T']} H{b['H']} N{b['N']} bf16"
    found, missing = backend_fns([n for n in names if n not in (fns or {})], plan["device"])
    fns = {**found, **(fns or {})}
    order = [n for n in names if n != "fla"] + ["reference"] + [n for n in names if n == "fla"]
    slots = [rows.plan({"backend": name, "shape": shape, "skipped": PENDING}) for name in order]
    rows.save()
    base = None  # (name, fn) of the first of our kernels timed
    for slot, name in zip(slots, order):
        row = {"backend": name, "shape": shape}
        if name in missing:
            rows.set(slot, {**row, "skipped": missing[name]})
            continue
        if time.monotonic() > deadline:
            rows.set(slot, {**row, "skipped": "not run: the part's time budget was spent"})
            continue
        try:
            if name == "reference":  # a Python loop over steps: timed at ref_T, scaled to T
                scale = b["T"] / plan["ref_T"]
                res = bench(wkv7_reference, plan, plan["ref_T"])
                above = res["peak_above_inputs_mib"]
                row["note"] = f"measured at T={plan['ref_T']}, time and memory above inputs scaled x{scale:g}"
                res.update(fwd_ms=res["fwd_ms"] * scale, fwd_bwd_ms=res["fwd_bwd_ms"] * scale, peak_mib=None,
                           peak_above_inputs_mib=None if above is None else above * scale)  # fmt: skip
            else:
                res = bench(fns[name], plan, b["T"])
                row["note"] = f"warm-up (compile) {res['warmup_s']} s"
                if name == "fla":
                    row["note"] += "; times include our -exp(w) and state transposes"
                    if base is not None:
                        agree = _agreement(fns[name], base[1], plan)
                        within = max(agree.values()) <= TOL[torch.bfloat16]
                        row["vs"] = {"backend": base[0], "max_rel_err": agree, "within_bf16_tol": within}
                        row["note"] += f"; vs {base[0]}: y {agree['y']:.1e}, state {agree['state_out']:.1e}"
                elif base is None:
                    base = (name, fns[name])
            rows.set(slot, {**row, **res})
        except Exception as e:
            rows.set(slot, {**row, "error": one_line(f"{type(e).__name__}: {e}", 300)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("correctness", "speed"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backends", help="comma-separated (default: correctness cuda,triton, speed cuda,triton,fla; "
                        "dry run: cpu, and cpu,fla)")
    parser.add_argument("--budget-s", type=float, default=600.0, help="start no row after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="the CPU kernel on the CPU at a tiny shape")
    args = parser.parse_args(argv)
    plan = PLANS["dry" if args.dry_run else "gpu"]
    names = tuple(args.backends.split(",")) if args.backends else plan["backends"][args.part]
    deadline = time.monotonic() + args.budget_s
    rows = Rows(args.out)
    rows.save()
    (correctness if args.part == "correctness" else speed)(plan, names, deadline, rows)
    rows.save(done=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
