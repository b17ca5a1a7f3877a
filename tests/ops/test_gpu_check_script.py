"""scripts/gpu_check*.py without a GPU: everything the first device run depends on that a CPU can run.

The scripts compile and import; the no-CUDA exit path; the promised training configs built into the
Recipes the trainer would run; the anchors beside our figures in the summary, its statuses and exit code;
a part's time cap and one-line errors; fla's adapter against fla's own (key-major, log-decay) convention;
and (slow) the whole script end to end on the CPU with --dry-run. On a GPU machine these still run on the
CPU: none of them needs or assumes a device.
"""

from __future__ import annotations

import importlib
import json
import py_compile
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peft_rwkv7.ops import wkv7_reference
from tests.ops.conftest import assert_close, wkv_inputs, wkv_rtol

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
NAMES = ("gpu_check", "gpu_check_kernels", "gpu_check_report", "gpu_check_train")


@pytest.fixture(scope="module")
def mods():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield {name: importlib.import_module(name) for name in NAMES}
    finally:
        sys.path.remove(str(SCRIPTS))


def test_scripts_compile_and_import_on_cpu(mods):
    for name in NAMES:
        py_compile.compile(str(SCRIPTS / f"{name}.py"), doraise=True)
        assert callable(getattr(mods[name], "main", None)) or name == "gpu_check_report"


def test_without_cuda_the_check_exits_2_and_writes_nothing(mods, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu_check.json"
    assert mods["gpu_check"].main(["--out", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()
    assert mods["gpu_check_train"].main([]) == 2


def test_training_runs_are_the_promised_configs_as_recipes(mods, tmp_path):
    train = mods["gpu_check_train"]
    plan = train.PLANS["gpu"]
    # issue 23: 0.1B state tuning and LoRA at ctx 1024 batch 1 and ctx 512 batch 16, bf16, through the trainer
    assert train.SHAPES[plan["shape"]] == {"n_layer": 12, "n_embd": 768, "vocab_size": 65536, "head_size": 64}
    runs = train.plan_runs(plan)
    assert [(m, c, b) for m, c, b, _ in runs] == [("state", 1024, 1), ("lora", 1024, 1), ("state", 512, 16),
                                                  ("lora", 512, 16)]  # fmt: skip
    base, data = tmp_path / "base.pth", tmp_path / "train.jsonl"
    base.touch()
    data.write_text('{"text": "x"}\n')
    for method, ctx, batch, _ in runs:
        recipe = train.recipe_for(method, base, data, tmp_path / "out", ctx, plan["steps"], batch, plan["device"],
                                  plan["precision"])  # fmt: skip
        assert (recipe.data.ctx_len, recipe.train.micro_bsz, recipe.train.grad_accum) == (ctx, batch, 1)
        assert (recipe.train.precision, recipe.train.device, recipe.method.kind) == ("bf16", "cuda", method)
    # the CPU dry run stands in for the same roles, so the same anchors print beside it
    assert [r[3] for r in train.plan_runs(train.PLANS["dry"])] == [r[3] for r in runs]
    assert all((m, role) in mods["gpu_check_report"].ANCHORS for m, _, _, role in runs)


def _report() -> dict:
    """A GPU-shaped report with hand-picked figures."""
    train = [{"method": m, "ctx_len": c, "batch": b, "role": role, "shape": "0.1B", "precision": "bf16",
              "peak_mib": peak, "reserved_mib": peak + 100, "tokens_per_s": tps, "first_loss": 11.0, "last_loss": 9.0,
              "wall_s": 3.0, "wkv_checks": ["cuda N64 bfloat16: ok"]}
             for m, c, b, role, peak, tps in (("state", 1024, 1, "ctx1024_bs1", 1200.0, 25000.0),
                                              ("lora", 1024, 1, "ctx1024_bs1", 1700.0, 21000.0),
                                              ("state", 512, 16, "ctx512_bs16", 9000.0, 90000.0))]  # fmt: skip
    train[0].update(goal_mib=1536, pass_goal=True)
    train.append({"method": "lora", "ctx_len": 512, "batch": 16, "role": "ctx512_bs16", "shape": "0.1B",
                  "precision": "bf16", "skipped": "not run: the part stopped before it"})  # fmt: skip
    shape = "B8 T4096 H12 N64 bf16"
    speed = [{"backend": "cuda", "shape": shape, "fwd_ms": 4.0, "fwd_bwd_ms": 10.0},
             {"backend": "triton", "shape": shape, "fwd_ms": 9.0, "fwd_bwd_ms": 30.0},
             {"backend": "reference", "shape": shape, "fwd_ms": 900.0, "fwd_bwd_ms": 3000.0},
             {"backend": "fla", "shape": shape, "fwd_ms": 6.0, "fwd_bwd_ms": 20.0,
              "vs": {"backend": "cuda", "max_rel_err": {"y": 4e-3, "state_out": 1e-3}, "within_bf16_tol": True}}]
    case = {"B": 2, "T": 37, "H": 3, "N": 64, "dtype": "float32", "state": True, "tol": 1e-4}
    correctness = [{**case, "backend": "cuda", "pass": True, "max_rel_err": {"y": 1e-6}},
                   {**case, "backend": "triton", "pass": True, "max_rel_err": {"y": 2e-6}}]
    parts = {name: {"status": "ok", "seconds": 1.0} for name in ("env", "build", "correctness", "training")}
    parts["speed"] = {"status": "timeout", "cap_s": 80, "seconds": 80.0, "error": "stopped at its 80 s cap"}
    return {"mode": "gpu", "correctness": correctness, "training": {"setup_s": 8.0, "runs": train},
            "speed": speed, "parts": parts}  # fmt: skip


def test_summary_puts_the_anchors_beside_our_figures(mods):
    report, gc = mods["gpu_check_report"], mods["gpu_check"]
    rows = {r[0]: r[1:] for r in report.summary_rows(_report())}
    # training: our figure, the goal, the field's anchor (RWKV-PEFT's 4090 table; RWKV-LM's tokens/s)
    assert rows["0.1B state tuning ctx1024 bs1 bf16"] == ("1200 MiB, 25,000 tok/s", "<= 1536 MiB", "2.6 GB VRAM [a]",
                                                          "PASS")  # fmt: skip
    assert rows["0.1B LoRA r16 ctx1024 bs1 bf16"][2:] == ("2.7 GB VRAM (r64) [a]", "info")
    batched = rows["0.1B state tuning ctx512 bs16 bf16"]
    assert batched[0] == "9000 MiB, 90,000 tok/s" and "43k" in batched[2] and "34k" in batched[2]
    assert rows["0.1B LoRA r16 ctx512 bs16 bf16"][3] == "TIME"  # a run its part never reached
    # kernels in one table: 10 / 20 ms = 0.50x fla meets <= 0.8x; Triton 30 / 20 = 1.50x
    assert rows["cuda fwd+bwd B8 T4096 H12 N64 bf16"] == ("10.00 ms = 0.50x fla", "<= 0.8x fla", "-", "PASS")
    assert rows["triton fwd+bwd B8 T4096 H12 N64 bf16"][:1] == ("30.00 ms = 1.50x fla",)
    assert rows["fla chunk_rwkv7 fwd+bwd B8 T4096 H12 N64 bf16"] == ("20.00 ms", "-", "-", "info")
    assert rows["part speed"][-1] == "TIME"
    assert gc.exit_status(list(report.summary_rows(_report()))) == 0  # TIME and MISS are not failures


def test_statuses_that_fail_the_run_and_those_that_do_not(mods):
    report, gc = mods["gpu_check_report"], mods["gpu_check"]
    r = _report()
    fla = "fla chunk_rwkv7 fwd+bwd B8 T4096 H12 N64 bf16"
    r["speed"][3] = {"backend": "fla", "shape": "B8 T4096 H12 N64 bf16", "error": "CompilationError: x"}
    assert {row[0]: row for row in report.summary_rows(r)}[fla][-1] == "differs"  # fla's own failure is not ours
    assert gc.exit_status(report.summary_rows(r)) == 0
    r["speed"][3] = {"backend": "fla", "shape": "B8 T4096 H12 N64 bf16", "skipped": "fla not importable: skipped"}
    rows = {row[0]: row for row in report.summary_rows(r)}
    assert rows[fla][-1] == "skip"
    assert rows["cuda fwd+bwd B8 T4096 H12 N64 bf16"][-1] == "info"  # no fla time: no ratio, no goal verdict
    # a kernel case its part never reached is unverified: FAIL, exit 1
    r["correctness"].append({**r["correctness"][0], "pass": False, "error": "not run: the part stopped before it"})
    rows = {row[0]: row for row in report.summary_rows(r)}
    assert rows["cuda vs reference"][1:] == ("1/2 cases (1 not run: time)", "all pass", "-", "FAIL")
    assert gc.exit_status(report.summary_rows(r)) == 1


def test_summary_columns_align_and_cite_the_anchors(mods, capsys):
    report = mods["gpu_check_report"]
    rows = report.summary_rows(_report())
    # every field of the GPU run fits its column, so the columns line up
    widths = (report.CHECK_W, report.FIGURE_W, 13, 29)
    assert all(len(field) <= width for row in rows for field, width in zip(row, widths)), rows
    report.print_summary(rows)
    lines = capsys.readouterr().out.splitlines()
    notes = "\n".join(line for line in lines if line.startswith("  ["))
    assert "[a] RWKV-PEFT" in notes and "RTX 4090" in notes and "[b] RWKV-LM" in notes and "GPU not stated" in notes


def test_part_caps_fit_five_minutes_and_leave_later_parts_their_minimum(mods):
    gc = mods["gpu_check"]
    budget = gc.BUDGETS["gpu"]
    assert sum(budget["cap_s"].values()) + sum(budget["inline_s"].values()) <= 300  # the issue: under 5 minutes
    assert gc.part_timeout("correctness", 50.0, budget) == budget["cap_s"]["correctness"]
    # late in the run: the cap shrinks so that training, speed and the doctor still get their minimum
    late = budget["hard_s"] - 120.0
    assert gc.part_timeout("correctness", late, budget) == 120 - 40 - 20 - budget["doctor_s"]
    assert gc.part_timeout("speed", late, budget, skip=("doctor",)) == min(budget["cap_s"]["speed"], 120)


def test_a_child_past_its_cap_is_stopped_and_an_error_is_one_line(mods, tmp_path):
    gc = mods["gpu_check"]
    t0 = time.monotonic()
    part = gc.run_child(["-c", "import time; time.sleep(60)"], 1.0, tmp_path / "sleep.log")
    assert part["status"] == "timeout" and time.monotonic() - t0 < 30
    part = gc.run_child(["-c", "print('working'); raise ValueError('bad input\\nsecond line')"], 60.0,
                        tmp_path / "crash.log")  # fmt: skip
    assert part["status"] == "error" and part["error"] == "exit status 1: ValueError: bad input"


def test_children_skip_the_cuda_kernel_when_it_did_not_build(mods, tmp_path):
    gc = mods["gpu_check"]
    failed = {"cuda_extension": False}
    assert gc.child_argv("training", tmp_path / "t.json", 90, False, failed)[-2:] == ["--wkv-backend", "triton"]
    assert gc.child_argv("correctness", tmp_path / "c.json", 60, False, failed)[-2:] == ["--backends", "triton"]
    assert gc.child_argv("speed", tmp_path / "s.json", 80, False, failed)[-2:] == ["--backends", "triton,fla"]
    assert "--backends" not in gc.child_argv("speed", tmp_path / "s.json", 80, False, {"cuda_extension": True})


def _fake_fla(new_api: bool, wrong_state: bool = False):
    """chunk_rwkv7 in fla's convention, step by step: key-major state S[k, v], decay exp(log_w),
    S <- diag(exp(log_w)) S + b (a^T S) + k v^T, y = scale * r^T S. New API: (r, k, v, a, b, w=None,
    log_w=None, ...) with w the raw w (log_w = -exp(w)); old API: w is the log decay."""

    def core(r, k, v, a, b, log_w, scale, initial_state, output_final_state):
        B, T, H, N = r.shape
        S = torch.zeros(B, H, N, N) if initial_state is None else initial_state.float().clone()
        if wrong_state and initial_state is not None:
            S = S.transpose(-1, -2)
        ys = []
        for t in range(T):
            rt, kt, vt, at, bt, dt = (x[:, t].float() for x in (r, k, v, a, b, log_w.exp()))
            S = dt[..., :, None] * S + bt[..., :, None] * torch.einsum("bhk,bhkv->bhv", at, S)[..., None, :] \
                + kt[..., :, None] * vt[..., None, :]
            ys.append(scale * torch.einsum("bhk,bhkv->bhv", rt, S))
        return torch.stack(ys, 1).to(r.dtype), S

    if new_api:
        def chunk_rwkv7(r, k, v, a, b, w=None, log_w=None, scale=1.0, initial_state=None, output_final_state=True,
                        cu_seqlens=None, head_first=False):  # fmt: skip
            return core(r, k, v, a, b, -torch.exp(w) if log_w is None else log_w, scale, initial_state, True)
    else:
        def chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=True, cu_seqlens=None,
                        head_first=False):  # fmt: skip
            return core(r, k, v, a, b, w, scale, initial_state, True)

    return chunk_rwkv7


@pytest.mark.parametrize("new_api", [False, True], ids=["w-is-log-decay", "log_w-keyword"])
def test_fla_adapter_gives_our_convention(mods, new_api):
    B, T, H, N = 2, 9, 2, 8
    xs, state = wkv_inputs(B, T, H, N, seed=3, with_state=True)
    y, s = mods["gpu_check_kernels"].fla_fn(_fake_fla(new_api))(*xs, state=state)
    y_ref, s_ref = wkv7_reference(*xs, state=state)
    rtol = wkv_rtol(T, N, torch.float32)  # two fp32 implementations of the same recurrence
    assert_close(y, y_ref, rtol, "y")
    assert_close(s, s_ref, rtol, "state")


def test_speed_compares_fla_with_our_first_kernel(mods):
    kernels, report = mods["gpu_check_kernels"], mods["gpu_check_report"]
    plan = {"device": "cpu", "bench": {"B": 1, "T": 12, "H": 2, "N": 8}, "ref_T": 6, "iters": 1}
    for wrong, status in ((False, "info"), (True, "differs")):
        rows = kernels.Rows()
        fns = {"ours": wkv7_reference, "fla": kernels.fla_fn(_fake_fla(True, wrong_state=wrong))}
        kernels.speed(plan, ("ours", "fla"), time.monotonic() + 600, rows, fns=fns)
        assert [r["backend"] for r in rows.rows] == ["ours", "reference", "fla"]
        fla = rows.rows[-1]
        assert fla["vs"]["backend"] == "ours" and fla["fwd_bwd_ms"] > 0
        summary = {r[0]: r for r in report.summary_rows({"speed": rows.rows})}
        assert summary["fla chunk_rwkv7 fwd+bwd B1 T12 H2 N8 bf16"][-1] == status


@pytest.mark.slow
def test_dry_run_end_to_end_on_the_cpu(tmp_path):
    from peft_rwkv7.ops import cpu

    if not cpu.is_available(torch.device("cpu")):  # the dry run times the CPU kernel in place of CUDA's
        pytest.skip("the CPU WKV kernel does not build here")
    out = tmp_path / "check.json"
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), str(out), "--dry-run", "--skip", "doctor"],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {k: v["status"] for k, v in report["parts"].items()} == {
        "env": "ok", "build": "ok", "correctness": "ok", "training": "ok", "speed": "ok", "doctor": "skipped (--skip)"}
    runs = report["training"]["runs"]
    assert [(r["method"], r["role"]) for r in runs] == [("state", "ctx1024_bs1"), ("lora", "ctx1024_bs1"),
                                                        ("state", "ctx512_bs16"), ("lora", "ctx512_bs16")]
    assert all(r["tokens_per_s"] > 0 for r in runs)
    assert all(r["pass"] for r in report["correctness"])
    assert [r["backend"] for r in report["speed"]] == ["cpu", "reference", "fla"]
    for name in ("training", "speed"):
        assert f"[{name}] " in proc.stdout  # each part's time, printed as it ends
    assert "[a] RWKV-PEFT" in proc.stdout and "[b] RWKV-LM" in proc.stdout and "time per part" in proc.stdout
