"""`rwkv-peft doctor` on this (CPU) machine: exit 0, every section on screen, clean --json, and exit 1
when a kernel computes wrong (a wrong CPU kernel put in place of the real one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peft_rwkv7.cli import main
from peft_rwkv7.ops import cpu, dispatch, wkv7_reference

ROOT = Path(__file__).resolve().parents[1]


def wrong_output(r, w, k, v, a, b, state=None):
    y, s = wkv7_reference(r, w, k, v, a, b, state)
    return y + 0.01 * y.detach(), s


def test_doctor_screen(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    labels = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    for label in ("python", "torch", "GPU", "bf16", "nvcc", "cpu", "cuda", "triton", "reference", "auto",
                  "peft", "bitsandbytes", "deepspeed", "wandb"):
        assert label in labels, f"no {label} line in:\n{out}"
    assert "  cpu          fp32 PASS" in out and "bf16 PASS" in out
    assert "cuda         skipped: no CUDA device" in out  # a CPU machine: not a failure
    assert "auto picks   fp32 -> cpu, bf16 -> cpu" in out
    assert out.rstrip().splitlines()[-1].startswith("verdict: OK")


def test_doctor_fails_on_a_wrong_kernel(capsys, monkeypatch):
    monkeypatch.setattr(dispatch, "_VERDICTS", {})  # fresh verdicts, restored after the test
    monkeypatch.setattr(cpu, "wkv7_cpu", wrong_output)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "  cpu          fp32 FAIL err 1.0e-02 > 1e-04 (y)" in out
    assert "auto picks   fp32 -> reference" in out
    assert out.rstrip().splitlines()[-1].startswith("verdict: FAIL - cpu kernel is WRONG in fp32")


def test_doctor_json_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "peft_rwkv7.cli", "doctor", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout holds the JSON object only (import chatter is swallowed)
    assert report["ok"] and report["problems"] == []
    assert report["device"]["cuda"] is False
    backends = {b["name"]: b for b in report["backends"]}
    assert backends["cpu"]["built"] and all(c["ok"] for c in backends["cpu"]["checks"].values())
    assert backends["cuda"]["built"] is None and backends["triton"]["built"] is None
    assert report["auto"] == {"fp32": "cpu", "bf16": "cpu"}
    assert set(report["packages"]) >= {"peft", "bitsandbytes", "deepspeed", "wandb"}


def test_doctor_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["doctor", "--help"])
    assert e.value.code == 0 and "--json" in capsys.readouterr().out
